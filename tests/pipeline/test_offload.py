"""Layer-by-layer offload of a synthetic Llama saved in several safetensors shards: the same
weights as an in-memory sequential run, resumable after a kill, loadable by transformers."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

RECIPE = {
    "rules": [{"method": "gptq", "bits": 4}],
    "ignore": ["lm_head"],
    "calibration": {"mode": "sequential", "samples": 4},
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 3-layer Llama (hidden 32, FFN 64, vocab 96) saved in shards of at most 40 kB."""
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, max_shard_size="40kB")
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(2)]
    return path, calib


def _in_memory(path, calib):
    import optbrain

    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    report = optbrain.compress(model, calib, RECIPE, quiet=True)
    return model, report


def test_offload_equals_in_memory_run(tiny_llama, tmp_path):
    import optbrain

    path, calib = tiny_llama
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(path.glob("*.safetensors"))) >= 3  # several shards
    ref, ref_report = _in_memory(path, calib)
    report = optbrain.compress(path, calib, RECIPE, offload=tmp_path / "off", quiet=True)
    out = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "off" / "model", local_files_only=True
    )
    got, want = out.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    done = {r.name: r for r in report.layers if r.compressed}
    assert len(done) == 3 * 7  # q k v o gate up down per block
    for r in ref_report.layers:
        if r.compressed:
            assert done[r.name].predicted_loss == r.predicted_loss
    skipped = {r.name: r.reason for r in report.layers if not r.compressed}
    assert "lm_head" in skipped
    assert report.metadata["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "off" / "report.json").read_text())["layers"]


def test_offload_resumes_after_a_kill(tiny_llama, tmp_path, monkeypatch):
    import optbrain
    from optbrain.pipeline import offload

    path, calib = tiny_llama
    full = tmp_path / "full"
    optbrain.compress(path, calib, RECIPE, offload=full, quiet=True)
    written = []
    real = offload._write_block

    def crash_after_one(*a):
        real(*a)
        written.append(a[0])
        if len(written) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(offload, "_write_block", crash_after_one)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        optbrain.compress(path, calib, RECIPE, offload=part, quiet=True)
    assert not (part / "model").exists()
    written.clear()
    monkeypatch.setattr(offload, "_write_block", lambda *a: (written.append(a[0]), real(*a)))
    optbrain.compress(path, calib, RECIPE, offload=part, quiet=True)
    assert [p.name for p in written] == ["0002"]  # blocks 0 and 1 were not redone
    for k in range(3):
        a = (full / "blocks" / f"{k:04d}.safetensors").read_bytes()
        assert a == (part / "blocks" / f"{k:04d}.safetensors").read_bytes()


def test_offload_refuses_bad_input(tiny_llama, tmp_path):
    import optbrain

    path, calib = tiny_llama
    with pytest.raises(ValueError, match="sequential"):
        optbrain.compress(path, calib, {"bits": 4}, offload=tmp_path / "a")
    other = {**RECIPE, "rules": [{"method": "gptq", "bits": 3}]}
    optbrain.compress(path, calib, RECIPE, offload=tmp_path / "b", quiet=True)
    with pytest.raises(ValueError, match="another recipe"):
        optbrain.compress(path, calib, other, offload=tmp_path / "b", quiet=True)
    with pytest.raises(ValueError, match="not a loaded nn.Module"):
        optbrain.compress(torch.nn.Linear(2, 2), calib, RECIPE, offload=tmp_path / "c")
    with pytest.raises(ValueError, match="no config"):
        optbrain.compress(tmp_path, calib, RECIPE, offload=tmp_path / "d")
