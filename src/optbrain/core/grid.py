"""Quantization grids: symmetric / asymmetric, per output channel or per group, MSE scale search.

A grid maps a weight ``w`` in row ``r`` and column ``c`` to::

    q(w) = scale[r, g] · (clamp(round(w / scale[r, g]) + zero[r, g], 0, maxq) − zero[r, g])

with ``g = c // group_size`` (a single group per row when ``group_size`` is None) and
``maxq = 2**bits − 1``. Symmetric grids use ``zero = (maxq + 1) / 2`` (so ``4`` bits give the
levels ``-8..7 · scale``); asymmetric grids use an integer zero point. Zero is always on the grid,
so a pruned weight stays exactly zero after quantization.

The scale search shrinks the min-max range by factors ``1, 1 − 1/grid_points, ...`` down to
``1 − max_shrink`` and keeps, per (row, group), the range with the least
``Σ_c weight_c · (q(w_c) − w_c)²`` — with ``weight = diag H`` this is the layer loss of the
rounding when inputs are uncorrelated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import CompressSpec, check_bits

ROW_CHUNK = 1 << 18  # weights per chunk of rows in the scale search (cache-sized temporaries)


@dataclass(frozen=True)
class QuantGrid:
    """Per-(row, group) grid. scale, zero: ``(rows, groups)``; maxq = 2**bits − 1."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    sym: bool
    group_size: int | None

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def columns(self, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column ``(scale, zero)``, each ``(rows, cols)``."""
        if self.group_size is None:
            return self.scale.expand(-1, cols), self.zero.expand(-1, cols)
        g = torch.arange(cols, device=self.scale.device) // self.group_size
        return self.scale[:, g], self.zero[:, g]

    def quantize(self, W: torch.Tensor) -> torch.Tensor:
        """``q(W)`` for ``W (rows, cols)``, in W's dtype."""
        scale, zero = self.columns(W.shape[1])
        return quantize_values(W, scale.to(W.dtype), zero.to(W.dtype), self.maxq)

    def codes(self, W: torch.Tensor) -> torch.Tensor:
        """Integer codes in ``[0, maxq]`` of ``W (rows, cols)`` (W assumed on the grid)."""
        scale, zero = self.columns(W.shape[1])
        return torch.clamp(torch.round(W / scale) + zero, 0, self.maxq).to(torch.int32)

    def on_grid(self, W: torch.Tensor, atol: float = 1e-5) -> bool:
        """Whether every entry of ``W`` is a grid level (relative to its scale)."""
        scale, zero = self.columns(W.shape[1])
        q = quantize_values(W, scale.to(W.dtype), zero.to(W.dtype), self.maxq)
        return bool(((q - W).abs() <= atol * scale.to(W.dtype).abs().clamp_min(1e-12)).all())

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> QuantGrid:
        return QuantGrid(
            self.scale.to(device=device, dtype=dtype),
            self.zero.to(device=device, dtype=dtype),
            self.bits,
            self.sym,
            self.group_size,
        )


def quantize_values(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Round ``x`` onto the grid given by broadcastable ``scale`` and ``zero``."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def _scale_zero(
    xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    tiny = (xmax - xmin) <= 0
    xmin = torch.where(tiny, xmin - 1, xmin)
    xmax = torch.where(tiny, xmax + 1, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def fit_grid(
    W: torch.Tensor,
    bits: int,
    *,
    sym: bool = True,
    group_size: int | None = None,
    search: bool = True,
    grid_points: int = 100,
    max_shrink: float = 0.8,
    weight: torch.Tensor | None = None,
) -> QuantGrid:
    """Fit a grid to ``W (rows, cols)``: per output channel, or per ``group_size`` columns.

    ``weight (cols,)`` weighs each column's rounding error in the scale search (pass ``diag H``
    for a Hessian-aware search); None weighs columns equally. ``search=False`` is plain min-max.
    The range always includes 0 (``xmin <= 0 <= xmax``).
    """
    bits = check_bits(bits)
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (rows, cols), got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if group_size is not None:
        if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1:
            raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
        group_size = int(group_size)
        if cols % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide the {cols} columns of W")
        if group_size >= cols:
            group_size = None
    step = max(1, ROW_CHUNK // max(cols, 1))
    if step < rows:  # every (row, group) is fitted on its own: chunks keep temporaries small
        parts = [
            _fit(W[i : i + step], bits, sym, group_size, search, grid_points, max_shrink, weight)
            for i in range(0, rows, step)
        ]
        return QuantGrid(
            scale=torch.cat([p.scale for p in parts]),
            zero=torch.cat([p.zero for p in parts]),
            bits=bits,
            sym=sym,
            group_size=group_size,
        )
    return _fit(W, bits, sym, group_size, search, grid_points, max_shrink, weight)


def fit_layer_grid(
    W: torch.Tensor, H: torch.Tensor, spec: CompressSpec, search: bool = True
) -> QuantGrid:
    """The grid every layer solver starts from: ``fit_grid(W, spec.bits, weight=diag H)`` with
    the spec's ``sym`` / ``group_size``."""
    assert spec.bits is not None
    return fit_grid(
        W,
        spec.bits,
        sym=spec.sym,
        group_size=spec.group_size,
        search=search,
        weight=torch.diagonal(H),
    )


def _fit(
    W: torch.Tensor,
    bits: int,
    sym: bool,
    group_size: int | None,
    search: bool,
    grid_points: int,
    max_shrink: float,
    weight: torch.Tensor | None,
) -> QuantGrid:
    rows, cols = W.shape
    maxq = 2**bits - 1
    Wf = W.float() if W.dtype not in (torch.float32, torch.float64) else W
    gs = cols if group_size is None else group_size
    G = Wf.reshape(rows, cols // gs, gs)  # (rows, groups, gs)
    xmin = G.min(-1).values.clamp(max=0)
    xmax = G.max(-1).values.clamp(min=0)
    scale, zero = _scale_zero(xmin, xmax, maxq, sym)
    if search:
        if weight is None:
            wcol = torch.ones(cols, dtype=Wf.dtype, device=W.device)
        else:
            wcol = weight.to(Wf.dtype).reshape(cols).clamp_min(0)
        wcol = wcol.reshape(cols // gs, gs)
        best = torch.full_like(scale, float("inf"))
        steps = max(1, int(max_shrink * grid_points))
        for i in range(steps + 1):
            p = 1.0 - i / grid_points
            s, z = _scale_zero(p * xmin, p * xmax, maxq, sym)
            q = quantize_values(G, s[..., None], z[..., None], maxq)
            err = (((q - G) ** 2) * wcol).sum(-1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return QuantGrid(scale=scale, zero=zero, bits=bits, sym=sym, group_size=group_size)


def refit_scales(
    W: torch.Tensor,
    W_hat: torch.Tensor,
    grid: QuantGrid,
    H: torch.Tensor,
    before: torch.Tensor | None = None,
    chunk: int = 1 << 23,
) -> tuple[torch.Tensor, QuantGrid, torch.Tensor, torch.Tensor]:
    """The least-squares scales of fixed codes: ``(W_hat', grid', taken (rows,) bool, row
    losses of W_hat' (rows,) float64)``; ``before``: the row losses of ``W_hat`` when the
    caller has them (``row_losses(W, W_hat, H)``, computed here otherwise).

    ``W_hat (rows, cols)`` lies on ``grid`` with integer offsets ``c = q − zero`` (pruned
    weights: ``c = 0``). With the codes fixed, the layer loss of row ``r`` is quadratic in the
    row's scales ``s_r (groups,)``: ``ŵ_r = C_r s_r`` with ``C_r = diag(c_r) E`` (``E (cols,
    groups)`` the one-hot group of each column), so::

        s_r* = argmin (w_r − C_r s)ᵀ H (w_r − C_r s) = (C_rᵀ H C_r)⁻¹ C_rᵀ H w_r

    (``groups × groups`` per row; per output channel ``s_r* = c_rᵀ H w_r / c_rᵀ H c_r``). The
    current scales are feasible, so the optimum is never worse; a row takes it only where every
    new scale is positive and its loss measured under ``H`` is lower (``taken``), else it keeps
    its own. Zero points and codes are unchanged, so ``grid'.codes(W_hat') = grid.codes(W_hat)``
    and the new weights are ``scale' · (q − zero)`` exactly as ``quantize_values`` writes them.
    Cost ``Θ(rows · cols²)``; grouped grids build ``C_rᵀ H C_r`` as block sums of
    ``(c_r c_rᵀ) ∘ H`` over as many rows at a time as fit ``chunk`` float64 entries (64 MiB)."""
    from .hessian import row_losses

    rows, cols = W.shape
    dev = W_hat.device
    grid = grid.to(dev)
    scale_c, zero_c = grid.columns(cols)
    q = torch.clamp(torch.round(W_hat / scale_c.to(W_hat)) + zero_c.to(W_hat), 0, grid.maxq)
    c = (q - zero_c.to(W_hat)).double()  # (rows, cols) integer offsets
    Hd = H.to(dev).double()
    Wd = W.to(dev).double()
    G = grid.scale.shape[1]
    gs = cols // G
    b = (c * (Wd @ Hd)).reshape(rows, G, gs).sum(-1)  # C_rᵀ H w_r  (rows, G)
    if G == 1:
        A = ((c @ Hd) * c).sum(1, keepdim=True).unsqueeze(-1)  # (rows, 1, 1)
    else:
        A = torch.empty(rows, G, G, dtype=torch.float64, device=dev)
        step = max(1, chunk // cols**2)
        for i in range(0, rows, step):  # A_r = block sums of (c_r c_rᵀ) ∘ H
            ci = c[i : i + step]
            P = ci[:, :, None] * Hd[None] * ci[:, None, :]  # (step, cols, cols)
            A[i : i + step] = P.reshape(-1, G, gs, G, gs).sum((2, 4))
    old = grid.scale.double()
    empty = torch.diagonal(A, dim1=1, dim2=2) <= 0  # a group of zero codes: keep its scale
    eye = torch.eye(G, dtype=torch.float64, device=dev).expand_as(A)
    A = torch.where(empty[:, :, None] | empty[:, None, :], eye * empty[:, :, None], A)
    b = torch.where(empty, old, b)
    s, info = torch.linalg.solve_ex(A, b.unsqueeze(-1))
    s = s.squeeze(-1)
    s = s.to(grid.scale.dtype)  # positive in the grid's own dtype (float16 may underflow)
    ok = (info == 0) & (s > 0).all(1) & torch.isfinite(s).all(1)
    new_scale = torch.where(ok[:, None], s, grid.scale)
    cand = QuantGrid(new_scale, grid.zero, grid.bits, grid.sym, grid.group_size)
    sc, zc = cand.columns(cols)
    W_new = (sc.to(W_hat) * (q - zc.to(W_hat))).to(W_hat.dtype)
    if before is None:
        before = row_losses(W, W_hat, H)
    before = before.to(dev)
    cand_loss = row_losses(W, W_new, H).to(dev)
    taken = ok & (cand_loss < before)
    t = taken[:, None]
    scale = torch.where(t, new_scale, grid.scale)
    out = QuantGrid(scale, grid.zero, grid.bits, grid.sym, grid.group_size)
    after = torch.where(taken, cand_loss, before)
    return torch.where(t, W_new, W_hat), out, taken.cpu(), after
