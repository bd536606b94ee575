"""The exact solver (``method="obc"``): ExactOBS pruning, OBQ quantization, OBC compound.

Options (``prune_layer(..., lazy=32)`` etc.): ``lazy``, ``shrink``, ``memory``, ``kernel``
(engine speed knobs, see ``EngineConfig``; results do not depend on them beyond rounding),
``max_sparsity`` (how far the unstructured/block trace runs, default 1.0: every level),
``per_row`` (same sparsity in every row instead of the layer-wide selection), ``guard`` (default
True: never worse per row than GPTQ / SparseGPT on the same problem, see ``core.methods.guard``;
False: the greedy alone), ``refit_scales`` (default False; True: after the solve, every
quantized row takes the least-squares scales of its codes where that lowers its loss,
``core.grid.refit_scales``, before the guard, whose references are refitted too; never worse on
the layer loss: 1% lower per channel, 5% in groups of 32 on an ill-conditioned 64×128 layer —
but smollm2-135m 4-bit per channel asymmetric came out at perplexity 18.69 with it vs 18.62
without, so it is not the default), ``clip_search`` (default False; True: every row's grid is
chosen among the searched grid and shrunk min-max ranges by its loss after GPTQ's compensation,
``core.clip_search``, then OBQ runs on the chosen grids and GPTQ's result on them is one more
reference of the guard; quantization without pruning only; the budget database's levels keep
the default grids), ``slack`` (OBQ's choice rule, default ``SLACK`` = ¼; 0: plain greedy OBQ;
see ``core.obq``).

The per-part solves (``exact_nm``, ``exact_prune``, ``exact_quantize``) are public so that
``solve_obc_levels`` (the budget database: many levels of one layer) runs the same arithmetic,
sharing one ExactOBS trace and one N:M solve per pattern between all levels built on them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .. import ticks
from ..clip_search import clip_search
from ..columnwise import option_bool, upper_inverse_factor
from ..grid import QuantGrid, fit_layer_grid, refit_scales
from ..hessian import PreparedHessian, prepare_layer, row_losses
from ..obq import obq
from ..obs import DEFAULT_ENGINE, EngineConfig
from ..patterns import Pattern, parse_pattern
from ..result import LayerResult, layer_result, unchanged
from ..spec import DEFAULT_DAMP, CompressSpec, check_options, make_spec
from ..structured import check_structured_spec, solve_structured_spec
from ..trace import PruneTrace, obs_trace, prune_nm
from .column import check_clip_search
from .gptq import solve_gptq
from .guard import guard
from .sparsegpt import solve_sparsegpt

OPTIONS = (
    *("lazy", "shrink", "memory", "kernel"),
    *("max_sparsity", "per_row", "outliers", "guard", "slack", "refit_scales", "clip_search"),
)
#: OBQ's slack ``c`` by default (``core.obq``: the fix of greedy OBQ on ill-conditioned H).
SLACK = 0.25


def engine_config(options: dict[str, Any]) -> EngineConfig:
    kw = {k: options[k] for k in ("lazy", "shrink", "memory", "kernel") if k in options}
    try:
        return EngineConfig(**kw)
    except ValueError as e:
        raise ValueError(f"method 'obc': option {e}") from None


@dataclasses.dataclass(frozen=True)
class ObcOptions:
    """``method="obc"``'s options, validated (see the module docstring)."""

    engine: EngineConfig
    max_sparsity: float = 1.0
    per_row: bool = False
    outliers: bool = True
    guard: bool = True
    slack: float = SLACK
    refit_scales: bool = False
    clip_search: bool = False


def check_obc(spec: CompressSpec) -> ObcOptions | None:
    """Every option of ``method="obc"`` for ``spec``, checked before any work: unknown names,
    wrong values and impossible combinations are a ValueError naming the option. None for the
    structured patterns (structured OBS takes no options)."""
    if spec.pattern.structured:
        check_structured_spec("obc", spec)
        return None
    opts = spec.options
    check_options("obc", opts, OPTIONS)
    max_sp = opts.get("max_sparsity", 1.0)
    if isinstance(max_sp, bool) or not isinstance(max_sp, int | float) or not 0 < max_sp <= 1:
        raise ValueError(f"method 'obc': max_sparsity must be in (0, 1], got {max_sp!r}")
    slack = opts.get("slack", SLACK)
    if (
        isinstance(slack, bool)
        or not isinstance(slack, int | float)
        or not (math.isfinite(slack) and slack >= 0)
    ):
        raise ValueError(f"method 'obc': slack must be a number >= 0, got {slack!r}")
    defaults = {"per_row": False, "outliers": True, "guard": True}
    defaults |= {"refit_scales": False, "clip_search": False}
    flags = {k: option_bool("obc", opts, k, d) for k, d in defaults.items()}
    if flags["clip_search"]:
        check_clip_search("obc", spec, static_groups=True)
    return ObcOptions(engine_config(opts), float(max_sp), slack=float(slack), **flags)


def exact_nm(
    Wc: torch.Tensor, prep: PreparedHessian, n: int, m: int, engine: EngineConfig = DEFAULT_ENGINE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ExactOBS N:M → ``(weight, keep, step_loss (rows, steps))``, compute dtype and device."""
    out = prune_nm(Wc, prep, n, m, engine=engine)
    removed = torch.zeros(Wc.shape, dtype=torch.bool, device=Wc.device)
    removed.scatter_(1, out.order, True)
    return out.weight, ~removed, out.step_loss


def exact_prune(
    Wc: torch.Tensor,
    prep: PreparedHessian,
    spec: CompressSpec,
    engine: EngineConfig,
    *,
    max_sparsity: float = 1.0,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PruneTrace | None]:
    """Prune with ExactOBS → ``(weight, keep, row_loss, trace or None)``, compute dtype; the
    unstructured/block trace runs to ``max_sparsity`` (at least ``spec.sparsity``)."""
    pat = spec.pattern
    if pat.kind == "nm":
        weight, keep, step_loss = exact_nm(Wc, prep, pat.n, pat.m, engine)
        return weight, keep, step_loss.sum(1).cpu(), None
    max_sp = max(max_sparsity, spec.sparsity or 0.0)
    trace = obs_trace(Wc, prep, pat, max_sparsity=max_sp, engine=engine)
    weight, keep, rl = trace.at(spec.sparsity or 0.0, per_row=per_row)
    return weight, keep, rl, trace


def exact_quantize(
    weight: torch.Tensor,
    keep: torch.Tensor | None,
    prep: PreparedHessian,
    spec: CompressSpec,
    engine: EngineConfig = DEFAULT_ENGINE,
    outliers: bool = True,
    slack: float = SLACK,
    grid: QuantGrid | None = None,
) -> tuple[torch.Tensor, QuantGrid, torch.Tensor]:
    """OBQ of the (kept) weights on ``grid`` (None: ``fit_layer_grid``) → ``(weight, grid,
    step_loss)``."""
    if grid is None:
        grid = fit_layer_grid(weight, prep.H, spec)
    out = obq(weight, prep, grid, keep=keep, engine=engine, outliers=outliers, slack=slack)
    return out.weight, grid, out.step_loss


def clip_reference(
    Wc: torch.Tensor, prep: PreparedHessian, spec: CompressSpec, base: QuantGrid
) -> LayerResult:
    """``clip_search`` for OBQ from ``base`` (``fit_layer_grid``'s grid): GPTQ over the
    candidate grids (``core.clip_search``) → the GPTQ result on the chosen grids (its ``grid``
    is the one OBQ then quantizes on; the result is also a reference of the guard). The
    request is checked by ``solve_obc``."""
    assert spec.bits is not None
    U, _ = upper_inverse_factor(prep.H, prep.Hinv)
    kw = {"sym": spec.sym, "group_size": spec.group_size}
    out = clip_search(Wc, torch.diagonal(prep.H), U, spec.bits, base, **kw)
    loss = float(out.row_loss.sum())
    return LayerResult(out.weight, None, loss, "gptq", grid=out.grid, info=out.info)


def searched_grid_reference(
    Wc: torch.Tensor,
    prep: PreparedHessian,
    g0: QuantGrid,
    clip: LayerResult,
    weight: torch.Tensor,
    obq_args: tuple[EngineConfig, bool, float],
) -> LayerResult | None:
    """``clip_search``'s second OBQ: the rows whose chosen grid is not the searched one ``g0``
    (``fit_layer_grid``'s, the search's base), quantized on ``g0``; the other rows keep
    ``weight`` (OBQ on the chosen grids). None when no row's grid changed. As a guard reference
    it makes every row's result the better of OBQ on either grid, so never worse than default
    OBC per row."""
    cg = clip.grid
    assert cg is not None
    scale, zero = g0.scale.to(cg.scale), g0.zero.to(cg.zero)
    rows = ((scale != cg.scale) | (zero != cg.zero)).any(1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    engine, outliers, slack = obq_args
    sub = QuantGrid(scale[rows], zero[rows], cg.bits, cg.sym, cg.group_size)
    out = obq(Wc[rows], prep, sub, engine=engine, outliers=outliers, slack=slack)
    w = weight.clone()
    w[rows] = out.weight.to(w)
    s2, z2 = cg.scale.clone(), cg.zero.clone()
    s2[rows], z2[rows] = scale[rows], zero[rows]
    grid = QuantGrid(s2, z2, cg.bits, cg.sym, cg.group_size)
    return LayerResult(w, None, 0.0, "obc", grid=grid)


def solve_obc(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """Exact OBS/OBQ/OBC for one layer; ``loss`` is the greedy's predicted loss."""
    opt = check_obc(spec)
    if opt is None:
        return solve_structured_spec("obc", W, H, spec)
    engine = opt.engine
    if not spec.prunes and not spec.quantizes:  # nothing asked: W unchanged, exactly
        return unchanged(W, "obc", spec, with_pattern=False)
    Wc, prep = prepare_layer(W, H, spec)
    keep, trace = None, None
    weight = Wc
    predicted = torch.zeros(W.shape[0], dtype=torch.float64)
    grid = None
    obq_args = (engine, opt.outliers, opt.slack)
    g0 = fit_layer_grid(Wc, prep.H, spec) if opt.clip_search else None
    clip = clip_reference(Wc, prep, spec, g0) if g0 is not None else None
    extra: list[tuple[str, LayerResult]] = []
    # progress: a compound's two greedy passes cost about the same (methods.auto.COST)
    half = 0.5 if spec.prunes and spec.quantizes else 1.0
    if spec.prunes:
        with ticks.part(0.0, half):
            weight, keep, predicted, trace = exact_prune(
                Wc, prep, spec, engine, max_sparsity=opt.max_sparsity, per_row=opt.per_row
            )
    if spec.quantizes:
        with ticks.part(1.0 - half, 1.0):
            weight, grid, step_loss = exact_quantize(
                weight, keep, prep, spec, *obq_args, clip.grid if clip else None
            )
            if clip:
                assert g0 is not None
                alt = searched_grid_reference(Wc, prep, g0, clip, weight, obq_args)
                extra = [("gptq clip_search", clip)] + ([("obc searched grid", alt)] if alt else [])
        # the pruned state is the optimum on {Ŵ_S = 0}, so the losses add (Pythagoras)
        predicted = predicted + step_loss.sum(1).cpu()
    measured = row_losses(Wc, weight, prep.H).cpu()
    info: dict[str, Any] = {}
    refits = grid is not None and opt.refit_scales
    if refits:
        assert grid is not None
        weight, grid, predicted, measured, info["scale_refit"] = refit(
            Wc, prep, weight, grid, predicted, measured
        )
    if opt.guard:
        weight, keep, grid, predicted, measured, info["guard"] = guarded(
            W, H, Wc, prep, spec, (weight, keep, grid, measured), predicted, trace, refits,
            extra=extra, per_row=opt.per_row,
        )  # fmt: skip
    if clip:
        info["clip_search"] = clip.info["clip_search"]
    info["measured_loss"] = float(measured.sum())
    return layer_result(
        "obc", spec, weight, keep, predicted, prep=prep, grid=grid, trace=trace, info=info
    )


def refit(
    Wc: torch.Tensor,
    prep: PreparedHessian,
    weight: torch.Tensor,
    grid: QuantGrid,
    predicted: torch.Tensor,
    measured: torch.Tensor,
) -> tuple[torch.Tensor, QuantGrid, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``refit_scales`` of a solved layer → ``(weight, grid, predicted, measured, info)``; a
    refitted row's predicted loss drops by exactly its measured gain."""
    weight, grid, taken, after = refit_scales(Wc, weight, grid, prep.H, before=measured)
    after = after.cpu()
    predicted = torch.where(taken, predicted - (measured - after), predicted)
    info = {"rows": int(taken.sum()), "loss_before": float(measured.sum())}
    info["loss_after"] = float(after.sum())
    return weight, grid, predicted, after, info


def guarded(
    W: torch.Tensor,
    H: torch.Tensor,
    Wc: torch.Tensor,
    prep: PreparedHessian,
    spec: CompressSpec,
    exact: tuple[torch.Tensor, torch.Tensor | None, QuantGrid | None, torch.Tensor],
    predicted: torch.Tensor,
    trace: PruneTrace | None,
    refits: bool = False,
    extra: Sequence[tuple[str, LayerResult]] = (),
    per_row: bool = False,
) -> tuple[Any, ...]:
    """``core.methods.guard`` against the fast solvers of ``spec`` → ``(weight, keep, grid,
    predicted row loss, measured row loss, guard info)``; rows taken from a reference have
    their measured loss as the predicted one. Quantization only: GPTQ in natural order, then
    with ``act_order``; pruning: SparseGPT. ``refits``: each reference gets ``refit`` too (as
    the exact result did), so the guard compares refitted rows with refitted rows and the
    result stays ≤ the refitted exact one row by row. ``info["rows_from_reference"]`` counts
    the rows finally taken from any reference (``info["references"]``: per reference).
    ``extra``: more ``(name, result)`` references after those (``clip_reference``)."""
    cur = exact
    info: dict[str, Any] = {}
    per: dict[str, int] = {}
    for ref_name, ref in [*_references(W, H, spec, per_row), *extra]:
        ref_w, ref_grid = ref.weight.to(Wc), ref.grid
        rl = row_losses(Wc, ref_w, prep.H).cpu()
        if refits and ref_grid is not None:
            ref_w, ref_grid, _, rl, _ = refit(Wc, prep, ref_w, ref_grid.to(Wc.device), rl, rl)
        ref_parts = (ref_w, ref.mask, ref_grid, rl)
        cur, step = guard(Wc, prep, cur, ref_parts, ref_name, trace, spec.quantizes)
        per[ref_name] = step["rows_from_reference"]
        if not info:
            info = step
        info["reference_loss" if len(per) == 1 else f"{ref_name} loss"] = step["reference_loss"]
    weight, keep, grid, rl = cur
    taken = rl != exact[3]
    info["rows_from_reference"] = (
        int(taken.sum()) if info["layout"] == "rows" else max(per.values())
    )
    info["references"] = per
    info["reference"] = next(iter(per))
    if bool(taken.any()):
        predicted = torch.where(taken, rl, predicted)
    return weight, keep, grid, predicted, rl, info


def _references(
    W: torch.Tensor, H: torch.Tensor, spec: CompressSpec, per_row: bool = False
) -> list[tuple[str, LayerResult]]:
    """The fast solvers of the same problem, default options: GPTQ (natural order, then act
    order) for quantization only; SparseGPT for pruning, with or without quantization (row
    scope when ``per_row``)."""
    if spec.prunes:  # per_row: the same count in every row, as SparseGPT's row scope
        opts = {"scope": "row"} if per_row else {}
        return [("sparsegpt", solve_sparsegpt(W, H, dataclasses.replace(spec, options=opts)))]
    natural = solve_gptq(W, H, dataclasses.replace(spec, options={}))
    act = solve_gptq(W, H, dataclasses.replace(spec, options={"act_order": True}))
    return [("gptq", natural), ("gptq act_order", act)]


class LevelLike(Protocol):
    """One level of ``solve_obc_levels``: unstructured ``sparsity`` (0: none) or an N:M
    ``pattern`` (None: none), plus ``bits`` (None: not quantized)."""

    sparsity: float
    pattern: str | None
    bits: int | None


def solve_obc_levels(
    W: torch.Tensor,
    H: torch.Tensor,
    levels: Sequence[LevelLike],
    *,
    damp: float = DEFAULT_DAMP,
    sym: bool = True,
    group_size: int | None = None,
    guard_levels: bool = True,
    scale_refit: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[torch.Tensor, torch.Tensor | None, QuantGrid | None, float]]:
    """Every (non-dense) level of one layer with the exact solver, computed in ``dtype``:
    ``[(weight, keep, grid, predicted loss)]`` in the order of ``levels``, weights in W's dtype.

    The arithmetic of ``compress_layer(method="obc")`` for each level (``scale_refit``: its
    ``refit_scales`` option), but the ExactOBS trace
    and the N:M solutions are computed once and shared by all levels that start from them.
    ``dtype``: pass ``methods.safe_dtype(W, H, torch.float32)`` to get the float64 promotion
    that ``methods.solve`` applies to layers whose saliencies would overflow float32.
    """
    spec = make_spec(W.shape[1], damp=damp, dtype=dtype)
    Wc, prep = prepare_layer(W, H, spec)
    trace = None
    if any(lv.sparsity for lv in levels):
        # the full trace, as compress_layer runs it (the last steps are cheap: the working set
        # has shrunk); stopping it early changes the rounding of the final lazy updates
        trace = obs_trace(Wc, prep, Pattern("unstructured"), max_sparsity=1.0)
    pruned: dict[str, tuple[torch.Tensor, torch.Tensor | None, float]] = {"": (Wc, None, 0.0)}
    out = []
    for lv in levels:
        key = f"s{lv.sparsity}" if lv.sparsity else (lv.pattern or "")
        if key not in pruned:
            if lv.sparsity:
                w, keep, rl = trace.at(lv.sparsity)  # type: ignore[union-attr]
                pruned[key] = (w, keep, float(rl.sum()))
            else:
                pat = parse_pattern(key)
                w, keep, step_loss = exact_nm(Wc, prep, pat.n, pat.m)
                pruned[key] = (w, keep, float(step_loss.sum()))
        weight, keep, loss = pruned[key]
        grid = None
        pat = lv.pattern or "unstructured"
        lspec = make_spec(W.shape[1], lv.sparsity or None, pat, damp=damp, dtype=dtype)
        if lv.bits is not None:
            lspec = dataclasses.replace(lspec, bits=lv.bits, sym=sym, group_size=group_size)
            weight, grid, step_loss = exact_quantize(weight, keep, prep, lspec)
            loss = loss + float(step_loss.sum())
        measured = row_losses(Wc, weight, prep.H).cpu()
        if grid is not None and scale_refit:  # as method "obc" does with refit_scales=True
            weight, grid, _, after, _ = refit(Wc, prep, weight, grid, measured, measured)
            loss, measured = loss - float((measured - after).sum()), after
        if guard_levels and (lspec.prunes or lspec.quantizes):  # as method "obc" does
            tr = trace if lv.sparsity else None
            weight, keep, grid, pred, _, _ = guarded(
                W, H, Wc, prep, lspec, (weight, keep, grid, measured), measured, tr,
                grid is not None and scale_refit,
            )  # fmt: skip
            if not torch.equal(pred, measured):  # rows from the reference: their measured loss
                loss = loss + float((pred - measured).sum())
        out.append((weight.to(W.dtype), keep, grid, loss))
    return out
