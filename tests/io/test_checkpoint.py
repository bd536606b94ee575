"""``optbrain.save`` → ``optbrain.load`` on a fresh copy is bit-exact (batch-norm statistics
included); masks and grids in the file describe the weights; truncated, tampered, incomplete or
foreign checkpoints are rejected with a ``CheckpointError`` saying what is wrong, leaving the
model untouched."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from optbrain._files import SEAL, seal
from optbrain.api import compress
from optbrain.core.grid import QuantGrid
from optbrain.io import CheckpointError, load, save
from optbrain.io.checkpoint import MANIFEST, REPORT, TENSORS


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (``tests/conftest.py``)."""


def _images(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, 3, 8, 8, generator=g), 3, stride=1)  # (n, 3, 6, 6)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def cnn_groups() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Flatten(),
        nn.Linear(8 * 36, 5),
    )


def cnn_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 5),
    )


def _train_bn_stats(model: nn.Module) -> nn.Module:
    """Give the batch norms non-trivial running statistics (as after training)."""
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(_images(100 + i, 32) * (1 + i))
    return model.eval()


def _setup(kind: str):
    """(dense model, compressed copy, held-out input) for one kind of model / recipe."""
    if kind == "mlp-50%":
        dense, recipe = mlp().eval(), {"method": "obc", "sparsity": 0.5}
        g = torch.Generator().manual_seed(1)
        calib = [torch.randn(32, 12, generator=g) for _ in range(2)]
        test = torch.randn(64, 12, generator=g)
    elif kind == "mlp-2:4+4bit-groups":
        dense = mlp().eval()
        recipe = {"method": "obc", "pattern": "2:4", "bits": 4, "group_size": 4, "sym": False}
        g = torch.Generator().manual_seed(1)
        calib = [torch.randn(32, 12, generator=g) for _ in range(2)]
        test = torch.randn(64, 12, generator=g)
    elif kind == "cnn-groups-4bit":
        dense, recipe = cnn_groups().eval(), {"method": "gptq", "bits": 4}
        calib, test = [_images(1, 32)], _images(2, 16)
    elif kind == "cnn-bn-recalibrated":
        dense = _train_bn_stats(cnn_bn())
        recipe = {"method": "obc", "sparsity": 0.6, "bn_recalibration": True}
        calib, test = [_images(1, 32), _images(3, 32)], _images(2, 16)
    elif kind == "gpt2-conv1d":
        transformers = pytest.importorskip("transformers")
        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0
        )
        dense = transformers.GPT2LMHeadModel(cfg).eval()
        recipe = {"method": "obc", "sparsity": 0.5, "bits": 4}
        calib = [{"input_ids": torch.randint(0, 32, (4, 8))}]
        test = {"input_ids": torch.randint(0, 32, (4, 8))}
    else:  # pragma: no cover
        raise AssertionError(kind)
    model = copy.deepcopy(dense)
    compress(model, calib, recipe, quiet=True)
    return dense, model, test


@torch.no_grad()
def _out(model: nn.Module, x) -> torch.Tensor:
    o = model(**x) if isinstance(x, dict) else model(x)
    return o.logits if hasattr(o, "logits") else o


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k


KINDS = ["mlp-50%", "mlp-2:4+4bit-groups", "cnn-groups-4bit", "cnn-bn-recalibrated", "gpt2-conv1d"]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_is_bit_exact(kind, tmp_path):
    dense, model, test = _setup(kind)
    assert not torch.equal(_out(model, test), _out(dense, test))  # compression did something
    run = save(model, tmp_path / "run")
    assert {p.name for p in run.iterdir()} == {TENSORS, MANIFEST, REPORT}
    fresh = load(copy.deepcopy(dense), run)
    assert torch.equal(_out(fresh, test), _out(model, test))
    _assert_state(fresh, model.state_dict())
    # the report travels with the run
    report = json.loads((run / REPORT).read_text())
    assert report["layers"] == model.__dict__["_optbrain"]["report"]["layers"]
    # saving the loaded model writes the same tensors again, byte for byte
    again = save(fresh, tmp_path / "again")
    t0, t1 = load_file(str(run / TENSORS)), load_file(str(again / TENSORS))
    assert t0.keys() == t1.keys()
    assert all(torch.equal(t0[k], t1[k]) and t0[k].dtype == t1[k].dtype for k in t0)
    assert (run / TENSORS).read_bytes() == (again / TENSORS).read_bytes()


def test_a_run_refuses_another_model_of_the_same_shapes(tmp_path):
    """The manifest holds a fingerprint of the weights compression leaves alone: a model of the
    same architecture with other weights is refused, unchanged; the model it came from loads."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    model = copy.deepcopy(dense)
    compress(model, [torch.randn(32, 8)], {"rules": [{"targets": ["0"], "sparsity": 0.5}]},
             quiet=True)  # fmt: skip
    run = save(model, tmp_path / "run")
    assert json.loads((run / MANIFEST).read_text())["dense_fingerprint"]
    other = copy.deepcopy(dense)
    with torch.no_grad():
        other[2].bias.add_(1e-3)  # a layer the run did not compress
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointError, match="made from another model"):
        load(other, run)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    # the compressed layer's own dense weights may differ (they are replaced): still loads
    mine = copy.deepcopy(dense)
    with torch.no_grad():
        mine[0].weight.mul_(2)
    out = load(mine, run)
    assert torch.equal(out[0].weight, model[0].weight)


def test_bn_recalibration_is_saved_and_needed(tmp_path):
    """The re-estimated batch-norm statistics differ from the dense ones and are in the file:
    loading the weights alone would not reproduce the outputs."""
    dense, model, test = _setup("cnn-bn-recalibrated")
    for name in ("1", "4"):
        d, c = dense.get_submodule(name), model.get_submodule(name)
        assert not torch.allclose(d.running_mean, c.running_mean)
        assert not torch.allclose(d.running_var, c.running_var)
    run = save(model, tmp_path / "run")
    manifest = json.loads((run / MANIFEST).read_text())
    assert set(manifest["buffers"]) == {"1", "4"}
    tensors = load_file(str(run / TENSORS))
    assert torch.equal(tensors["4.running_var"], model[4].running_var)
    weights_only = copy.deepcopy(dense)
    with torch.no_grad():
        for name in manifest["layers"]:
            weights_only.get_submodule(name).weight.copy_(model.get_submodule(name).weight)
    assert not torch.allclose(_out(weights_only, test), _out(model, test))
    assert torch.equal(_out(load(copy.deepcopy(dense), run), test), _out(model, test))


def test_masks_and_grids_in_the_file_describe_the_weights(tmp_path):
    """Per group: the mask marks exactly the kept weights (pruned ones are 0) and every weight
    is a level of the saved grid (scale / zero / bits / group size)."""
    dense, model, _ = _setup("mlp-2:4+4bit-groups")
    fresh = load(copy.deepcopy(dense), save(model, tmp_path / "run"))
    layers = fresh.__dict__["_optbrain"]["layers"]
    assert set(layers) == {"0", "2", "4"}
    for name, entry in layers.items():
        W = fresh.get_submodule(name).weight.detach()
        (grp,) = entry["groups"]
        mask = grp["mask"]
        assert mask.dtype == torch.bool and mask.shape == W.shape
        assert bool((W[~mask] == 0).all())
        assert float(mask.float().mean()) == 0.5  # 2:4
        grid = QuantGrid(grp["scale"], grp["zero"], grp["bits"], grp["sym"], grp["group_size"])
        assert grid.bits == 4 and grid.group_size == 4 and grid.sym is False
        assert grid.scale.shape == (W.shape[0], W.shape[1] // 4)
        assert grid.on_grid(W)
        assert not grid.on_grid(W + 0.3 * grid.columns(W.shape[1])[0])  # the check can fail


def test_grouped_conv_groups_are_saved_per_group(tmp_path):
    dense, model, _ = _setup("cnn-groups-4bit")
    run = save(model, tmp_path / "run")
    manifest = json.loads((run / MANIFEST).read_text())
    assert [len(manifest["layers"][n]["groups"]) for n in ("0", "2", "4", "6")] == [1, 2, 8, 1]
    fresh = load(copy.deepcopy(dense), run)
    w = fresh[4].weight.detach()  # depthwise: group g is output channel g, 9 columns
    for g, grp in enumerate(fresh.__dict__["_optbrain"]["layers"]["4"]["groups"]):
        grid = QuantGrid(grp["scale"], grp["zero"], grp["bits"], grp["sym"], grp["group_size"])
        assert grid.on_grid(w[g].reshape(1, 9))


def test_save_needs_a_compressed_model(tmp_path):
    with pytest.raises(ValueError, match="not compressed"):
        save(mlp(), tmp_path / "run")


# ------------------------------------------------------------------------------ rejections


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    dense, model, test = _setup("mlp-50%")
    run = save(model, tmp_path_factory.mktemp("ckpt") / "run")
    return dense, run


def _copy_run(run: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in run.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_manifest(run: Path, fn, reseal: bool = True) -> None:
    """Edit the manifest; ``reseal``: recompute its self-hash like a deliberate forger (so the
    checks behind the seal are reached); without, the seal refuses the edit."""
    m = json.loads((run / MANIFEST).read_text())
    fn(m)
    (run / MANIFEST).write_text(json.dumps(seal(m) if reseal else m))


def _truncate(run: Path) -> None:
    data = (run / TENSORS).read_bytes()
    (run / TENSORS).write_bytes(data[: len(data) // 2])


def _flip_byte(run: Path) -> None:
    data = bytearray((run / TENSORS).read_bytes())
    data[-5] ^= 0x01  # a bit inside the last tensor's data
    (run / TENSORS).write_bytes(bytes(data))


def _truncate_with_matching_checksum(run: Path) -> None:
    import hashlib

    _truncate(run)
    digest = hashlib.sha256((run / TENSORS).read_bytes()).hexdigest()
    _edit_manifest(run, lambda m: m.__setitem__("sha256", digest))


def _rename_layer(m: dict) -> None:
    m["layers"]["7"] = m["layers"].pop("2")


def _rename_tensor(m: dict) -> None:
    m["layers"]["2"]["weight"] = "2.weight_typo"


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


CORRUPTIONS = {
    "truncated tensors": (_truncate, "does not match its checksum"),
    "flipped byte": (_flip_byte, "does not match its checksum"),
    "truncated, checksum forged": (_truncate_with_matching_checksum, "cannot be read"),
    "no tensors file": (lambda r: (r / TENSORS).unlink(), f"has no {TENSORS}"),
    "no manifest": (lambda r: (r / MANIFEST).unlink(), f"has no {MANIFEST}"),
    "manifest not JSON": (
        lambda r: (r / MANIFEST).write_text((r / MANIFEST).read_text()[:40]),
        "is not valid JSON",
    ),
    "manifest other format": (
        lambda r: _edit_manifest(r, _set("format", "x")),
        "not an optbrain manifest",
    ),
    "manifest newer version": (lambda r: _edit_manifest(r, _set("version", 99)), "version 99"),
    "manifest without layers": (
        lambda r: _edit_manifest(r, lambda m: m.pop("layers")),
        "lacks 'layers'",
    ),
    "manifest edited checksum": (
        lambda r: _edit_manifest(r, _set("sha256", "0" * 64)),
        "does not match its checksum",
    ),
    "manifest names a missing layer": (
        lambda r: _edit_manifest(r, _rename_layer),
        "layer '7' of the checkpoint is not in this model",
    ),
    "manifest layer without groups": (
        lambda r: _edit_manifest(r, lambda m: m["layers"]["2"].pop("groups")),
        r"manifest.json is malformed.*KeyError: 'groups'",
    ),
    "manifest layer without plan": (
        lambda r: _edit_manifest(r, lambda m: m["layers"]["4"].pop("plan")),
        r"manifest.json is malformed.*'plan'",
    ),
    "manifest without recipe": (
        lambda r: _edit_manifest(r, lambda m: m.pop("recipe")),
        r"manifest.json is malformed.*'recipe'",
    ),
    "manifest layers not a mapping": (
        lambda r: _edit_manifest(r, _set("layers", [])),
        "manifest.json lists no compressed layer",
    ),
    "manifest edited, not resealed": (
        lambda r: _edit_manifest(r, _set("layers", {}), reseal=False),
        "does not match its own hash",
    ),
    "manifest one layer removed, not resealed": (
        lambda r: _edit_manifest(r, lambda m: m["layers"].pop("2"), reseal=False),
        "does not match its own hash",
    ),
    "manifest without seal": (
        lambda r: _edit_manifest(r, lambda m: m.pop(SEAL), reseal=False),
        "carries no",
    ),
    "manifest with no layers, resealed": (
        lambda r: _edit_manifest(r, _set("layers", {})),
        "lists no compressed layer",
    ),
    "manifest nested 100k deep": (
        lambda r: (r / MANIFEST).write_text("[" * 100_000 + "]" * 100_000),
        "nested too deeply",
    ),
    "manifest names a missing tensor": (
        lambda r: _edit_manifest(r, _rename_tensor),
        "'2.weight_typo' is missing",
    ),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_damaged_run_is_rejected_and_model_unchanged(what, saved_mlp, tmp_path):
    dense, run = saved_mlp
    bad = _copy_run(run, tmp_path / "bad")
    damage, message = CORRUPTIONS[what]
    damage(bad)
    target = copy.deepcopy(dense)
    before = _state(target)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        load(target, bad)
    _assert_state(target, before)
    assert "_optbrain" not in target.__dict__
    # the undamaged run still loads into the same object
    load(target, run)
    assert "_optbrain" in target.__dict__


def test_not_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load(mlp(), tmp_path / "nowhere")


def test_wrong_model_is_rejected_and_unchanged(saved_mlp):
    """A model with other shapes (wider hidden layer): the message names the layer and both
    shapes; the earlier layers that would fit are not written either."""
    _, run = saved_mlp
    torch.manual_seed(1)
    other = nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 4)
    )
    before = _state(other)
    with pytest.raises(CheckpointError, match=r"layer '2'.*\(16, 24\).*\(20, 24\)"):
        load(other, run)
    _assert_state(other, before)
    assert "_optbrain" not in other.__dict__

    other64 = mlp().double()
    with pytest.raises(CheckpointError, match="float32.*float64"):
        load(other64, run)


def test_edited_batch_norm_entries_are_rejected(tmp_path):
    dense, model, _ = _setup("cnn-bn-recalibrated")
    run = save(model, tmp_path / "run")
    _edit_manifest(run, lambda m: m["buffers"]["1"].__setitem__(0, "1.running_meen"))
    target = copy.deepcopy(dense)
    before = _state(target)
    with pytest.raises(CheckpointError, match="buffer '1.running_meen' is missing"):
        load(target, run)
    _assert_state(target, before)


def test_batch_norm_missing_from_model_is_rejected(tmp_path):
    dense, model, _ = _setup("cnn-bn-recalibrated")
    run = save(model, tmp_path / "run")
    no_bn = copy.deepcopy(dense)
    no_bn[4] = nn.Identity()
    before = _state(no_bn)
    with pytest.raises(CheckpointError, match="batch norm '4'"):
        load(no_bn, run)
    _assert_state(no_bn, before)


# --------------------------------------------------------------------------- version-1 runs


def _as_version_1(run: Path, dst: Path) -> Path:
    """The run in the layout optbrain wrote before manifests were sealed (format version 1):
    compressed.safetensors, an unsealed manifest without tensors/report, report.json beside."""
    dst.mkdir()
    m = json.loads((run / MANIFEST).read_text())
    (dst / TENSORS).write_bytes((run / m["tensors"]).read_bytes())
    (dst / REPORT).write_bytes((run / REPORT).read_bytes())
    v1 = {k: m[k] for k in ("format", "sha256", "layers", "buffers", "recipe")}
    (dst / MANIFEST).write_text(json.dumps({**v1, "version": 1}, indent=1))
    return dst


@pytest.mark.parametrize("kind", ["mlp-2:4+4bit-groups", "cnn-bn-recalibrated"])
def test_version_1_runs_still_load_bit_exact(kind, tmp_path):
    dense, model, test = _setup(kind)
    v1 = _as_version_1(save(model, tmp_path / "run"), tmp_path / "v1")
    fresh = load(copy.deepcopy(dense), v1)
    _assert_state(fresh, model.state_dict())
    assert fresh.__dict__["_optbrain"]["report"] == json.loads((v1 / REPORT).read_text())


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(layers={}),
        lambda m: m["layers"].pop(next(iter(m["layers"]))),
        lambda m: next(iter(m["layers"].values()))["groups"][0].pop("mask"),
    ],
    ids=["no-layers", "one-layer-dropped", "mask-dropped"],
)
def test_version_1_manifest_edits_that_drop_tensors_are_refused(edit, saved_mlp, tmp_path):
    dense, run = saved_mlp
    v1 = _as_version_1(run, tmp_path / "v1")
    m = json.loads((v1 / MANIFEST).read_text())
    edit(m)
    (v1 / MANIFEST).write_text(json.dumps(m))
    model = copy.deepcopy(dense)
    before = _state(model)
    with pytest.raises(CheckpointError, match="lists no compressed layer|does not name"):
        load(model, v1)
    _assert_state(model, before)
