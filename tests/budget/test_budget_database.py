"""The per-layer database: exact levels equal compress_layer, errors re-measured, interrupted
builds resume to a bit-identical database, fingerprints reject other models and settings."""

import copy
import json

import pytest
import torch

from optbrain._files import TMP_SUFFIX
from optbrain.adapters import adapter_for
from optbrain.budget import (
    DatabaseError,
    DatabaseMismatchError,
    DbSettings,
    Level,
    build_database,
    plan_allocation,
)
from optbrain.core.hessian import row_losses
from optbrain.core.layer import compress_layer
from optbrain.pipeline import collect_hessians


def test_levels_equal_compress_layer_obc(tiny_db):
    """Each stored level is exactly what compress_layer(method="obc") gives for it, although
    the database shares one ExactOBS trace (and one N:M solve) between levels."""
    model, calib, db = tiny_db
    H = collect_hessians(model, {"fc": model.fc, "c2": model.c2}, calib)
    for name in ("fc", "c2"):
        adapter = adapter_for(model.get_submodule(name))
        for g in range(adapter.groups):
            W, Hg = adapter.weight(g), H[name][g].hessian()
            for lid in ("s0.25", "s0.75", "2:4", "b4", "s0.5+b4", "2:4+b8"):
                if lid not in db.record(name)["levels"]:
                    continue
                lv = Level.parse(lid)
                ref = compress_layer(
                    W,
                    Hg,
                    sparsity=lv.sparsity or None,
                    pattern=lv.pattern or "unstructured",
                    bits=lv.bits,
                )
                got = db.level_weights(name, lid)[g]
                assert torch.equal(got["weight"], ref.weight), (name, g, lid)
                if ref.mask is not None:
                    assert torch.equal(got["mask"].bool(), ref.mask)
                if ref.grid is not None:
                    assert torch.equal(got["scale"], ref.grid.scale.float())
                entry = db.record(name)["levels"][lid]
                assert entry["bits"] == lv.bits


def test_errors_are_the_measured_losses(tiny_db):
    model, calib, db = tiny_db
    H = collect_hessians(model, {"c2": model.c2}, calib)["c2"]
    adapter = adapter_for(model.c2)
    rec = db.record("c2")
    assert rec["levels"]["dense"]["loss"] == 0.0 and rec["levels"]["dense"]["model_loss"] == 0.0
    for lid in ("s0.5", "b4", "s0.5+b4"):
        ws = db.level_weights("c2", lid)
        loss = sum(
            float(row_losses(adapter.weight(g), ws[g]["weight"], H[g].hessian()).sum())
            for g in range(2)
        )
        assert rec["levels"][lid]["loss"] == pytest.approx(loss, rel=1e-12)
        assert rec["levels"][lid]["loss"] > 0
    # more pruning, more loss (greedy trace prefixes)
    losses = [rec["levels"][s]["loss"] for s in ("s0.25", "s0.5", "s0.75")]
    assert losses == sorted(losses)


def test_model_level_error_is_output_mse_with_only_that_layer_swapped(tiny_db, tiny):
    model, calib, db = tiny_db
    m = copy.deepcopy(model)
    with torch.no_grad():
        dense = [m(x) for x in calib]
        adapter = adapter_for(m.fc)
        adapter.set_weight(0, db.level_weights("fc", "s0.75")[0]["weight"])
        num = sum(
            float(((m(x).double() - d.double()) ** 2).sum())
            for x, d in zip(calib, dense, strict=True)
        )
    mse = num / sum(d.numel() for d in dense)
    assert db.record("fc")["levels"]["s0.75"]["model_loss"] == pytest.approx(mse, rel=1e-9)
    # building the database (weights swapped in and out) left the model as it was
    fresh = tiny[0]().state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def _files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_interrupted_build_resumes_to_an_identical_database(tiny_db, tiny, tmp_path):
    make_tiny, make_calibration = tiny
    _, _, full = tiny_db
    model, calib = make_tiny(), make_calibration()
    settings = DbSettings(solver="obc", model_level=True)
    levels = [lv.id for lv in full.levels]
    root = tmp_path / "db"
    done = []

    def crash_after_two(name):
        done.append(name)
        if len(done) == 2:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        build_database(
            model, calib, root, levels, settings=settings, seed=1, on_layer=crash_after_two
        )
    assert done == ["c1", "c2"]
    # a half-written temporary file of the third layer, as a crash mid-write would leave
    stale = root / "layers" / f".0002.safetensors.123.0{TMP_SUFFIX}"
    stale.write_bytes(b"partial")
    resumed = []
    build_database(model, calib, root, levels, settings=settings, seed=1, on_layer=resumed.append)
    assert resumed == ["fc", "out"]  # the complete layers were skipped
    a, b = _files(full.root), _files(root)
    assert not stale.exists()  # the killed writer's temporary file was deleted, never read
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k  # bit-identical tensors and JSON
    # a finished database is reused as it is
    again = []
    build_database(model, calib, root, None, settings=settings, seed=1, on_layer=again.append)
    assert again == []


def test_damaged_layer_is_detected_and_rebuilt(tiny, tmp_path):
    make_tiny, make_calibration = tiny
    model, calib = make_tiny(), make_calibration()
    root = tmp_path / "db"
    levels = ["s0.5", "b4"]
    db = build_database(model, calib, root, levels, settings=DbSettings(solver="obc"))
    path = root / "layers" / "0002.safetensors"
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"\0" * 8)
    with pytest.raises(DatabaseError, match="checksum"):
        db.level_weights("fc", "s0.5")
    rebuilt = []
    build_database(
        model, calib, root, levels, settings=DbSettings(solver="obc"), on_layer=rebuilt.append
    )
    assert rebuilt == ["fc"] and path.read_bytes() == original


def test_fingerprint_mismatch_is_rejected(tiny_db, tiny):
    make_tiny, make_calibration = tiny
    model, calib, db = tiny_db
    settings = DbSettings(solver="obc", model_level=True)

    other = make_tiny()
    with torch.no_grad():
        other.fc.weight[0, 0] += 1e-3
    with pytest.raises(DatabaseMismatchError, match="other weights"):
        build_database(other, calib, db.root, None, settings=settings, seed=1)
    with pytest.raises(DatabaseMismatchError, match="calibration"):
        build_database(model, make_calibration(seed=2), db.root, None, settings=settings, seed=1)
    with pytest.raises(DatabaseMismatchError, match="calibration samples"):
        build_database(model, calib[:2], db.root, None, settings=settings, seed=1)
    with pytest.raises(DatabaseMismatchError, match="levels"):
        build_database(model, calib, db.root, ["s0.5"], settings=settings, seed=1)
    with pytest.raises(DatabaseMismatchError, match="damp"):
        build_database(
            model,
            calib,
            db.root,
            None,
            settings=DbSettings(solver="obc", damp=0.1, model_level=True),
            seed=1,
        )  # noqa: E501
    with pytest.raises(DatabaseMismatchError, match="seed"):
        build_database(model, calib, db.root, None, settings=settings, seed=7)
    # an unknown seed is not a mismatch (the data's checksum decides)
    build_database(model, calib, db.root, None, settings=settings, seed=None)
    # same model and data: reused; a database with model-level errors serves layer-wise too
    again = build_database(model, calib, db.root, None, settings=DbSettings(solver="obc"), seed=1)
    assert again.levels == db.levels
    fp = json.loads((db.root / "fingerprint.json").read_text())
    assert fp["calibration"]["samples"] == 96 and fp["levels"][0] == "dense"


def test_model_level_errors_are_added_to_an_existing_database(tiny_db, tiny, tmp_path):
    make_tiny, make_calibration = tiny
    _, _, full = tiny_db  # built with model-level errors from the start
    model, calib = make_tiny(), make_calibration()
    levels = [lv.id for lv in full.levels]
    root = tmp_path / "db"
    plain = build_database(model, calib, root, levels, settings=DbSettings(solver="obc"), seed=1)
    assert "model_loss" not in plain.record("fc")["levels"]["s0.5"]
    with pytest.raises(ValueError, match="model-level"):
        plan_allocation(plain, "flops=0.5", "model")
    solved = []
    settings = DbSettings(solver="obc", model_level=True)
    up = build_database(model, calib, root, None, settings=settings, seed=1, on_layer=solved.append)
    assert solved == []  # nothing re-solved: errors measured on the stored weights
    assert up.fingerprint["settings"]["model_level"] is True
    a, b = _files(full.root), _files(root)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_model_level_samples_bound_the_measurement(tiny, tmp_path):
    make_tiny, make_calibration = tiny
    model, calib = make_tiny(), make_calibration()
    st = DbSettings(solver="obc", model_level=True, model_level_samples=40)
    db = build_database(model, calib, tmp_path / "db", ["s0.75"], settings=st)
    few = [calib[0], calib[1][:8]]  # the first 40 samples
    m = copy.deepcopy(model)
    with torch.no_grad():
        dense = [m(x) for x in few]
        adapter_for(m.fc).set_weight(0, db.level_weights("fc", "s0.75")[0]["weight"])
        num = sum(float(((m(x) - d).double() ** 2).sum()) for x, d in zip(few, dense, strict=True))
    mse = num / sum(d.numel() for d in dense)
    assert db.record("fc")["levels"]["s0.75"]["model_loss"] == pytest.approx(mse, rel=1e-9)
    with pytest.raises(ValueError, match="model_level_samples"):
        DbSettings(model_level_samples=0)


def test_exact_levels_of_a_huge_layer_are_solved_in_float64(tmp_path):
    """A layer whose OBS saliencies overflow float32 (|W| ~ 1e17): ``methods.solve`` promotes it
    to float64, and the database's exact levels do the same, so they stay finite and equal
    ``compress_layer(method="obc")``'s (in float32 a saliency overflows and one weight of the
    50% level came out different)."""
    from optbrain.core.methods import safe_dtype

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e17)
    calib = [torch.randn(32, 16) for _ in range(2)]
    db = build_database(
        model, calib, tmp_path / "db", ["s0.5", "b4"], settings=DbSettings(solver="obc")
    )
    W = model[0].weight.detach()
    H = collect_hessians(model, {"0": model[0]}, calib)["0"][0].hessian()
    assert safe_dtype(W, H, torch.float32) == torch.float64
    for lid, kw in (("s0.5", {"sparsity": 0.5}), ("b4", {"bits": 4})):
        got = db.level_weights("0", lid)[0]["weight"]
        ref = compress_layer(W, H, method="obc", **kw)
        assert bool(torch.isfinite(got).all()) and got.dtype == W.dtype
        torch.testing.assert_close(got, ref.weight, rtol=1e-5, atol=0.0)
