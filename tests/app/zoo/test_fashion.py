"""fashion-cnn: trains once (cached), dense accuracy, a small compression, metrics."""

import copy
import math

import pytest
import torch

from optbrain.api import compress

pytestmark = pytest.mark.slow

TARGETS_OBC = ["layer2.conv1", "fc"]
TARGETS_GPTQ = ["layer3.conv2"]


@pytest.fixture(scope="module")
def entry():
    from optbrain.app.zoo import fashion, get

    try:
        fashion.data_dir()
    except ImportError as e:
        pytest.skip(f"Fashion-MNIST data absent ({e})")
    return get("fashion-cnn")


@pytest.fixture(scope="module")
def dense(entry):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return entry.load()  # first run: trains (~1.5 min on 2 cores) and caches
    finally:
        torch.set_num_threads(n)


def test_data_shapes_and_split():
    from optbrain.app.zoo import fashion

    try:
        Xtr, ytr, Xte, yte = fashion.data()
    except ImportError as e:
        pytest.skip(str(e))
    assert Xtr.shape == (60000, 1, 28, 28) and Xte.shape == (10000, 1, 28, 28)
    assert ytr.bincount().tolist() == [6000] * 10 and yte.bincount().tolist() == [1000] * 10
    # standardised with the training statistics
    assert abs(float(Xtr.mean())) < 1e-3 and abs(float(Xtr.std()) - 1) < 1e-3


def test_cache_reload_is_identical(entry, dense):
    again = entry.load()
    for (n, a), (_, b) in zip(dense.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_dense_accuracy(entry, dense):
    m = entry.evaluate(dense)
    assert m["accuracy"] >= 85.0  # measured 90.32 on the 10k test images
    assert set(entry.evaluate(dense, dense=dense, limit=200)) == {"accuracy", "agreement"}


def test_compress_and_evaluate(entry, dense, changes):
    model = copy.deepcopy(dense)
    recipe = {
        "rules": [
            {"targets": TARGETS_OBC, "method": "obc", "bits": 4},
            {"targets": TARGETS_GPTQ, "method": "gptq", "bits": 4},
        ],
        "calibration": {"samples": 32},
    }
    report = compress(model, entry.calibration(32, 0), recipe, inputs=entry.inputs, quiet=True)
    done = sorted(r.name for r in report.layers if r.status == "compressed")
    assert done == sorted(TARGETS_OBC + TARGETS_GPTQ)
    changed, others = changes(dense, model, TARGETS_OBC + TARGETS_GPTQ)
    assert changed == done and others == []
    # 4 bits per output channel: at most 16 distinct values in each row
    w = model.get_submodule("layer3.conv2").weight.reshape(64, -1)
    assert max(len(row.unique()) for row in w) <= 16

    d = entry.evaluate(dense, limit=2000)
    c = entry.evaluate(model, dense=dense, limit=2000)
    assert all(math.isfinite(v) for v in c.values())
    assert c["accuracy"] >= d["accuracy"] - 3.0  # measured: -0.15
    assert 95.0 <= c["agreement"] < 100.0  # measured 99.6
