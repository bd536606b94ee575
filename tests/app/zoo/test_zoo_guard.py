"""The per-row guarantee of method "obc" summed over every layer of the digits and fashion zoo
models: on each layer's real Hessian, no row above GPTQ's (quantization) / SparseGPT's
(pruning) at 4-bit, 3-bit, 2:4 and 50% unstructured."""

import pytest

from optbrain import compress_layer
from optbrain.adapters import adapter_for, find_layers
from optbrain.core.hessian import prepare_hessian, row_losses
from optbrain.pipeline import collect_hessians

pytestmark = pytest.mark.slow

BUDGETS = [
    ({"bits": 4}, "gptq"),
    ({"bits": 3}, "gptq"),
    ({"pattern": "2:4"}, "sparsegpt"),
    ({"sparsity": 0.5}, "sparsegpt"),
]


def _entry(name):
    from optbrain.app.zoo import fashion, get

    if name == "fashion-cnn":
        try:
            fashion.data_dir()
        except ImportError as e:
            pytest.skip(f"Fashion-MNIST data absent ({e})")
    return get(name)


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "fashion-cnn"])
def test_obc_never_above_the_fast_solver_on_every_zoo_layer(name):
    entry = _entry(name)
    model = entry.load()
    layers = find_layers(model)[0]
    hess = collect_hessians(model, layers, entry.calibration(128, 0), inputs=entry.inputs)
    totals = {}
    checked = 0
    for lname, module in layers.items():
        adapter = adapter_for(module)
        for g, acc in enumerate(hess[lname]):
            W, H = adapter.weight(g).detach(), acc.hessian().float()
            Hd = prepare_hessian(H, 0.01).H
            for kw, ref in BUDGETS:
                try:
                    r = compress_layer(W, H, **kw)
                except ValueError:  # 2:4 on a layer whose columns are not a multiple of 4
                    continue
                f = compress_layer(W, H, method=ref, **kw)
                rr, fr = row_losses(W, r.weight, Hd), row_losses(W, f.weight, Hd)
                if r.info["guard"]["layout"] == "rows":
                    bad = rr > fr * (1 + 1e-4) + 1e-6 * float(fr.mean())
                    assert not bool(bad.any()), (lname, kw, float((rr - fr).max()))
                assert float(rr.sum()) <= float(fr.sum()) * (1 + 1e-4) + 1e-9, (lname, kw)
                key = str(kw)
                t = totals.setdefault(key, [0.0, 0.0])
                t[0] += float(rr.sum())
                t[1] += float(fr.sum())
                checked += 1
    assert checked >= 3 * len(layers)
    for key, (obc, fast) in totals.items():  # summed over the model: never above
        assert obc <= fast * (1 + 1e-5), (key, obc, fast)
