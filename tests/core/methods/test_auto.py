"""method="auto": OBC inside the time budget, GPTQ / SparseGPT outside, the choice recorded."""

import pytest
import torch
from fast_reference import make_problem

from optbrain import compress_layer, prune_layer, quantize_layer
from optbrain.core.methods.auto import COST, DEFAULT_BUDGET, estimate_obc_seconds
from optbrain.core.spec import make_spec

CASES = [
    ({"bits": 4}, "gptq"),
    ({"sparsity": 0.5}, "sparsegpt"),
    ({"pattern": "2:4"}, "sparsegpt"),
    ({"pattern": "block4", "sparsity": 0.5}, "sparsegpt"),
    ({"sparsity": 0.5, "bits": 3}, "sparsegpt"),
]


@pytest.mark.parametrize("kw,fast", CASES)
def test_small_layer_runs_obc_and_zero_budget_the_fast_solver(kw, fast):
    W, H, _ = make_problem(0, rows=8, cols=32)
    W, H = W.float(), H.float()
    auto = compress_layer(W, H, method="auto", **kw)
    obc = compress_layer(W, H, method="obc", **kw)
    assert auto.method == "obc" and auto.info["auto"]["solver"] == "obc"
    assert auto.info["auto"]["time_budget"] == DEFAULT_BUDGET
    assert torch.equal(auto.weight, obc.weight) and auto.loss == obc.loss
    auto0 = compress_layer(W, H, method="auto", time_budget=0, block_size=8, **kw)
    ref = compress_layer(W, H, method=fast, block_size=8, **kw)
    assert auto0.method == fast and auto0.info["auto"]["solver"] == fast
    assert torch.equal(auto0.weight, ref.weight) and auto0.loss == ref.loss
    est = auto0.info["auto"]["estimated_obc_seconds"]
    assert est == estimate_obc_seconds(8, 32, make_spec(32, **kw)) and est > 0


def test_budget_decides_before_running():
    """A budget below the modelled OBC time picks GPTQ (options for OBC are ignored); with the
    default 30 s budget, layers of LLM size are far outside and small ones inside."""
    W, H, _ = make_problem(1, rows=64, cols=128)
    W, H = W.float(), H.float()
    est = estimate_obc_seconds(64, 128, make_spec(128, bits=4))
    r = quantize_layer(W, H, 4, method="auto", time_budget=est / 2, act_order=True, lazy=16)
    assert r.method == "gptq" and r.info["act_order"] is True
    assert r.info["auto"] == {
        "solver": "gptq",
        "estimated_obc_seconds": est,
        "time_budget": est / 2,
    }
    assert r.grid.on_grid(r.weight)
    r = quantize_layer(W, H, 4, method="auto", time_budget=est * 2, block_size=8)
    assert r.method == "obc"
    assert estimate_obc_seconds(4096, 4096, make_spec(4096, bits=4)) > 50 * DEFAULT_BUDGET
    assert estimate_obc_seconds(256, 512, make_spec(512, pattern="2:4")) < DEFAULT_BUDGET


def test_cost_model_shape():
    """Monotone in rows and cols; compound = prune + quantize; cubic in cols for large layers."""
    q, p = make_spec(512, bits=4), make_spec(512, sparsity=0.5)
    both = make_spec(512, sparsity=0.5, bits=4)
    assert estimate_obc_seconds(256, 512, both) == pytest.approx(
        estimate_obc_seconds(256, 512, q) + estimate_obc_seconds(256, 512, p)
    )
    assert estimate_obc_seconds(512, 512, q) > estimate_obc_seconds(256, 512, q)
    big, bigger = make_spec(4096, bits=4), make_spec(8192, bits=4)
    r = estimate_obc_seconds(4096, 8192, bigger) / estimate_obc_seconds(4096, 4096, big)
    assert 7 < r <= 16
    assert set(COST) == {"quant", "unstructured", "nm", "block"}


@pytest.mark.parametrize(
    "call",
    [
        lambda W, H: quantize_layer(W, H, 4, method="auto", time_budget=-1),
        lambda W, H: quantize_layer(W, H, 4, method="auto", time_budget="fast"),
        lambda W, H: prune_layer(W, H, 0.5, method="auto", budget=3),
    ],
)
def test_invalid_options_name_the_method(call):
    W, H, _ = make_problem(0, rows=4, cols=8)
    with pytest.raises(ValueError, match="auto"):
        call(W, H)


AUTO_BAD = [
    # (settings, options, what the error names): each is wrong for one of the two solvers auto
    # may pick, so it must fail whatever the layer's size (time_budget inside and outside)
    ({"pattern": "2:4", "bits": 4}, {"clip_search": True}, "clip_search"),  # obc rejects
    ({"bits": 4, "group_size": 8}, {"clip_search": True}, "static_groups"),  # gptq rejects
    ({"bits": 4}, {"guard": "x"}, "guard"),  # an obc option, only obc reads it
    ({"bits": 4}, {"act_order": "garbage"}, "act_order"),  # a gptq option
    ({"bits": 4}, {"block_size": -3}, "block_size"),
    ({"sparsity": 0.5}, {"scope": "column"}, "scope"),  # a sparsegpt option
    ({"sparsity": 0.25, "pattern": "channels"}, {"lazy": 0}, "takes no options"),
]


@pytest.mark.parametrize("kw,options,what", AUTO_BAD)
@pytest.mark.parametrize("budget", [0.0, 1e-9, DEFAULT_BUDGET])
def test_auto_option_errors_do_not_depend_on_the_layer_size(kw, options, what, budget):
    """One answer per recipe: an option a possible solver rejects is an error before any work,
    whichever solver this layer's size would pick (time_budget 0: the fast solver only)."""
    W, H, _ = make_problem(0, rows=8, cols=32)
    W, H = W.float(), H.float()
    fast_only = budget == 0.0 and "guard" in options  # obc can never run: its options unread
    if fast_only or (budget == 0.0 and what == "clip_search"):
        compress_layer(W, H, method="auto", time_budget=budget, **kw, **options)
        return
    with pytest.raises(ValueError, match=what) as e:
        compress_layer(W, H, method="auto", time_budget=budget, **kw, **options)
    assert "auto" in str(e.value) or "takes no options" in str(e.value)


def test_auto_infinite_budget_checks_obc_only():
    """time_budget=inf always runs OBC: a GPTQ-only restriction does not apply."""
    W, H, _ = make_problem(0, rows=8, cols=32)
    W, H = W.float(), H.float()
    r = quantize_layer(W, H, 4, group_size=8, method="auto", time_budget=float("inf"),
                       clip_search=True)  # fmt: skip
    assert r.method == "obc" and "clip_search" in r.info
