"""``optbrain.export(model, path, format=...)``: the packed safetensors run directory (version 3)
loads with ``optbrain.load`` to equal weights and state, is the promised fraction of the float32
bytes, and bad input is refused before anything is written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint import KINDS, _one_thread, _out, _setup  # noqa: F401 (autouse fixture)
from torch import nn

import optbrain
from optbrain.api import compress, compressed_state
from optbrain.io import CheckpointError, load
from optbrain.io.checkpoint import MANIFEST, TENSORS


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = compressed_state(a), compressed_state(b)
    assert sa.layers.keys() == sb.layers.keys()
    for name in sa.layers:
        assert sa.layers[name].plan == sb.layers[name].plan
        for ga, gb in zip(sa.layers[name].groups, sb.layers[name].groups, strict=True):
            for part in ("mask", "scale", "zero"):
                ta, tb = ga[part], gb[part]
                assert (ta is None) == (tb is None), (name, part)
                if ta is not None:
                    assert ta.dtype == tb.dtype and torch.equal(ta, tb), (name, part)
            assert (ga.bits, ga.sym, ga.group_size) == (gb.bits, gb.sym, gb.group_size)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_export_loads_to_equal_weights(kind, tmp_path):
    dense, model, test = _setup(kind)
    res = optbrain.export(model, tmp_path / "run", format="safetensors")
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert manifest["version"] == 3
    assert all(info.get("packed") for info in manifest["layers"].values())
    assert res.dense == {}
    back = load(copy.deepcopy(dense), tmp_path / "run")
    now, want = back.state_dict(), model.state_dict()
    assert now.keys() == want.keys()
    for k in want:
        assert torch.equal(now[k], want[k]), k
    assert torch.equal(_out(back, test), _out(model, test))
    _assert_same_state(back, model)
    # no float copy of a quantized weight in the file
    tensors = load_file(str(tmp_path / "run" / TENSORS))
    assert not any(k.endswith(".weight") for k in tensors)


def _big(recipe: dict) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 96)).eval()
    g = torch.Generator().manual_seed(1)
    compress(model, [torch.randn(64, 256, generator=g) for _ in range(2)], recipe, quiet=True)
    return model


@pytest.mark.parametrize(
    ("recipe", "bound", "floor"),
    [
        ({"method": "gptq", "bits": 4}, 0.14, 0.125),  # 4-bit per channel
        ({"method": "sparsegpt", "pattern": "2:4", "bits": 4}, 0.10, 0.09375),  # 2:4 + 4-bit
        ({"method": "gptq", "bits": 8}, 0.26, 0.25),
    ],
)
def test_packed_sizes_are_real(recipe, bound, floor, tmp_path):
    model = _big(recipe)
    res = optbrain.export(model, tmp_path / "run", format="safetensors")
    assert res.layer_fp32_bytes == (256 * 128 + 128 * 96) * 4
    assert floor < res.ratio <= bound  # codes (+ mask bits) + scales, nothing more
    # the file holds those bytes plus its header, nothing else
    file_bytes = (tmp_path / "run" / TENSORS).stat().st_size
    assert res.layer_bytes < file_bytes < res.layer_bytes + 8192
    assert res.files[TENSORS] == file_bytes


def test_a_weight_off_its_grid_is_stored_as_it_is(tmp_path):
    model = _big({"method": "gptq", "bits": 4})
    with torch.no_grad():
        model[2].weight[0, 0] += 1e-3  # edited after compression
    res = optbrain.export(model, tmp_path / "run", format="safetensors")
    assert list(res.dense) == ["2"]
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert manifest["layers"]["0"]["packed"] and "packed" not in manifest["layers"]["2"]
    fresh = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 96))
    back = load(fresh, tmp_path / "run")
    for k, v in model.state_dict().items():
        if k.endswith("weight"):
            assert torch.equal(back.state_dict()[k], v), k


def test_packed_run_from_another_model_is_refused_untouched(tmp_path):
    model = _big({"method": "gptq", "bits": 4})
    optbrain.export(model, tmp_path / "run", format="safetensors")
    other = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="layer '2'"):
        load(other, tmp_path / "run")
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])


def test_packed_tampered_values_are_refused(tmp_path):
    from safetensors.torch import save_file

    from optbrain._files import seal, sha256_file

    model = _big({"method": "gptq", "bits": 4})
    d = tmp_path / "run"
    optbrain.export(model, d, format="safetensors")
    tensors = load_file(str(d / TENSORS))
    tensors["0.g0.values"] = tensors["0.g0.values"][:-3].clone()  # truncated codes
    save_file(tensors, str(d / TENSORS))
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["sha256"] = sha256_file(d / TENSORS)  # consistent checksum: the shape check fires
    (d / MANIFEST).write_text(json.dumps(seal(manifest)))  # a deliberate forger's re-seal
    with pytest.raises(CheckpointError, match="0.g0.values"):
        load(nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 96)), d)


def test_bad_input_is_refused_before_writing(tmp_path):
    model = _big({"method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        optbrain.export(model, tmp_path / "a", format="gguf")
    with pytest.raises(ValueError, match="example_inputs"):
        optbrain.export(model, tmp_path / "b.onnx", format="onnx")
    with pytest.raises(ValueError, match="transformers"):
        optbrain.export(model, tmp_path / "c", format="compressed-tensors")
    with pytest.raises(ValueError, match="not compressed"):
        optbrain.export(nn.Linear(4, 4), tmp_path / "d", format="safetensors")
    assert list(tmp_path.iterdir()) == []
