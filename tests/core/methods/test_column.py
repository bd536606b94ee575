"""core.methods.column: the clip_search option of GPTQ and OBC through ``compress_layer``."""

import pytest
import torch

from optbrain import compress_layer
from optbrain.core.hessian import prepare_hessian, row_losses


def _problem(seed: int, rows: int = 16, cols: int = 32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).sqrt()
    X = torch.randn(8 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    X[:, :3] *= 10
    return W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize(
    "kw",
    [{}, {"act_order": True}, {"group_size": 8, "static_groups": True}, {"search": False}],
)
def test_gptq_clip_search_is_never_worse_per_row(kw):
    W, H = _problem(0)
    Hd = prepare_hessian(H, 0.01).H
    base = compress_layer(W, H, bits=3, sym=False, method="gptq", **kw)
    clip = compress_layer(W, H, bits=3, sym=False, method="gptq", clip_search=True, **kw)
    a, b = row_losses(W, base.weight, Hd), row_losses(W, clip.weight, Hd)
    assert bool((b <= a * (1 + 1e-6) + 1e-9).all())
    assert b.sum() < 0.95 * a.sum()
    assert clip.grid.on_grid(clip.weight)
    assert sum(clip.info["clip_search"].values()) == W.shape[0]


@pytest.mark.parametrize("seed", range(6))
def test_obc_clip_search_beats_its_references(seed):
    """Per row ≤ GPTQ on the chosen grids (the guard's extra reference) and ≤ plain GPTQ."""
    W, H = _problem(seed)
    Hd = prepare_hessian(H, 0.01).H
    clip = compress_layer(W, H, bits=3, sym=False, method="obc", clip_search=True)
    gclip = compress_layer(W, H, bits=3, sym=False, method="gptq", clip_search=True)
    gptq = compress_layer(W, H, bits=3, sym=False, method="gptq")
    rl = row_losses(W, clip.weight, Hd)
    for ref in (gclip, gptq):
        assert bool((rl <= row_losses(W, ref.weight, Hd) * (1 + 1e-6) + 1e-9).all())
    assert "gptq clip_search" in clip.info["guard"]["references"]
    assert clip.info["clip_search"] == gclip.info["clip_search"]
    assert clip.grid.on_grid(clip.weight)


@pytest.mark.parametrize("bits,group_size", [(3, None), (4, None), (3, 8)])
def test_obc_clip_search_is_never_worse_than_default_obc_per_row(bits, group_size):
    """Rows whose chosen grid differs from the searched one are also solved by OBQ on the
    searched grid (a guard reference), so every row is ≤ default OBC's. Measured on these six
    heavy-tailed 16×32 layers: 0.91–0.98 of default OBC's layer loss per channel at 3 and 4
    bits (groups of 8: equal on some seeds); asserted: per row never worse, and below 0.99 on
    every seed per channel."""
    for seed in range(6):
        W, H = _problem(seed)
        Hd = prepare_hessian(H, 0.01).H
        kw = {"bits": bits, "sym": False, "method": "obc", "group_size": group_size}
        a = row_losses(W, compress_layer(W, H, **kw).weight, Hd)
        clip = compress_layer(W, H, clip_search=True, **kw)
        b = row_losses(W, clip.weight, Hd)
        assert bool((b <= a * (1 + 1e-6) + 1e-9).all())
        assert b.sum() <= (0.99 if group_size is None else 1.0) * a.sum()
        assert clip.grid.on_grid(clip.weight)
        assert "obc searched grid" in clip.info["guard"]["references"]


def test_clip_search_bad_requests_fail_before_work():
    W, H = _problem(0)
    with pytest.raises(ValueError, match="static_groups=True"):
        compress_layer(W, H, bits=3, group_size=8, method="gptq", clip_search=True)
    with pytest.raises(ValueError, match="clip_search chooses quantization grids"):
        compress_layer(W, H, sparsity=0.5, bits=4, method="obc", clip_search=True)
    with pytest.raises(ValueError, match="clip_search"):
        compress_layer(W, H, sparsity=0.5, bits=4, method="sparsegpt", clip_search=True)
    with pytest.raises(ValueError, match="True or False"):
        compress_layer(W, H, bits=4, method="gptq", clip_search="yes")
