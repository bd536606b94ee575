"""The command line of issue #15: ``--executor`` / ``--ray-*`` checked before any work, and
``--offload`` on a synthetic sharded Llama giving the weights of the API's offloaded run."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from optbrain.app.cli import main


def test_ray_flags_without_ray_executor_are_refused(capsys):
    code = main(["compress", "--model", "digits-cnn", "--bits", "4", "--ray-workers", "2"])
    assert code == 2
    assert "need --executor ray" in capsys.readouterr().err


def test_missing_ray_is_an_error_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "run"
    code = main(["compress", "--model", "digits-cnn", "--bits", "4", "--executor", "ray",
                 "--out", str(out)])  # fmt: skip
    assert code == 2
    assert "pip install optbrain[ray]" in capsys.readouterr().err
    assert not out.exists()


def test_bad_ray_address_is_refused(capsys):
    pytest.importorskip("ray")
    code = main(["compress", "--model", "digits-cnn", "--bits", "4", "--executor", "ray",
                 "--ray-address", "nowhere"])  # fmt: skip
    assert code == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_offload_cli_equals_the_api(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import optbrain

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    src = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="30kB")
    ids = np.random.default_rng(0).integers(0, 64, size=(4, 16)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    code = main(["compress", "--model", str(src), "--calibration", str(tmp_path / "ids.npy"),
                 "--method", "gptq", "--bits", "4", "--ignore", "lm_head", "--samples", "4",
                 "--offload", str(tmp_path / "cli"), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "compressed model written to" in capsys.readouterr().out
    recipe = {
        "rules": [{"method": "gptq", "bits": 4}],
        "ignore": ["lm_head"],
        "calibration": {"mode": "sequential", "samples": 4},
    }
    calib = optbrain.calibration_from(tmp_path / "ids.npy", samples=4)
    optbrain.compress(src, calib, recipe, offload=tmp_path / "api", quiet=True)
    load = transformers.AutoModelForCausalLM.from_pretrained
    a = load(tmp_path / "cli" / "model", local_files_only=True).state_dict()
    b = load(tmp_path / "api" / "model", local_files_only=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    dense = load(src, local_files_only=True).state_dict()
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], dense[
        "model.layers.0.mlp.down_proj.weight"])  # fmt: skip
