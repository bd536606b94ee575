"""Budget databases: sealed records (an edited ``nnz`` is refused and the layer rebuilt), a
build SIGKILLed at 30 random moments always resumes to the same bytes, mutated files are
``CheckpointError``s, and a file or an unrelated directory is never built into."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from forking import killable_child

from optbrain._files import seal, sha256_bytes
from optbrain.budget import DbSettings, build_database
from optbrain.budget.store import Database, DatabaseError
from optbrain.io import CheckpointError

LEVELS = ["s0.5", "2:4", "b4"]
FAST = DbSettings(solver="fast")


_TINY: list = []  # (make_tiny, make_calibration) from the conftest's ``tiny`` fixture


def _build(root: Path, **kw) -> Database:
    make_tiny, make_calibration = _TINY[0]
    return build_database(
        make_tiny(), make_calibration(), root, LEVELS, settings=FAST, seed=1, **kw
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


_REF: dict = {}


@pytest.fixture
def reference(tiny, tmp_path_factory):
    """The reference database (built once per session, single-threaded by the conftest)."""
    if not _TINY:
        _TINY.append(tiny)
    if not _REF:
        root = tmp_path_factory.mktemp("ref") / "db"
        _build(root)
        _REF["v"] = (root, _files(root))
    return _REF["v"]


def test_rebuild_is_byte_identical(reference, tmp_path):
    _, ref = reference
    _build(tmp_path / "db")
    assert _files(tmp_path / "db") == ref


def test_edited_record_is_refused_and_rebuilt(reference, tmp_path):
    """nnz edited from 50% kept to 1 weight: the reader refuses the record (it would have
    priced the level at almost nothing); the next build recomputes exactly that layer."""
    root, ref = reference
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    for rel, raw in ref.items():
        (db_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (db_dir / rel).write_bytes(raw)
    path = db_dir / "layers" / "0002.json"
    rec = json.loads(path.read_text())
    true_nnz = rec["levels"]["s0.5"]["nnz"]
    rec["levels"]["s0.5"]["nnz"] = 1
    path.write_text(json.dumps(rec))
    db = Database(db_dir)
    with pytest.raises(DatabaseError, match="does not match its own hash"):
        db.record("fc")
    assert not db.is_complete("fc")
    rebuilt = []
    db = _build(db_dir, on_layer=rebuilt.append)
    assert rebuilt == ["fc"]
    assert db.record("fc")["levels"]["s0.5"]["nnz"] == true_nnz == 16 * 72 // 2
    assert _files(db_dir) == ref


def test_file_or_unrelated_directory_is_refused(reference, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DatabaseError, match="is a file"):
        _build(f)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(DatabaseError, match="not empty and not a budget database"):
        _build(other)
    assert [p.name for p in other.iterdir()] == ["cat.jpg"]  # nothing was written into it


def test_killed_build_at_30_random_moments_resumes_identically(reference, tmp_path):
    """A forked build is SIGKILLed at 30 random moments (six fresh builds, each killed five
    times, each kill resuming the previous one's directory); after each, every layer the
    reader calls complete verifies and equals the reference; a final resume gives the
    reference bytes."""
    _, ref = reference
    t0 = time.perf_counter()
    _build(tmp_path / "timing")
    full = time.perf_counter() - t0
    rng = random.Random(7)
    root = tmp_path / "db"
    partial = 0
    for k in range(30):
        if k % 5 == 0:  # six fresh builds, each killed 5 times
            root = tmp_path / f"db{k}"
        pid = os.fork()
        if pid == 0:
            try:
                killable_child()
                _build(root)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, full))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not (root / "fingerprint.json").is_file():
            continue
        db = Database(root)
        done = [n for n in db.layers if db.is_complete(n, verify=True)]
        partial += 0 < len(done) < len(db.layers)
        for name in db.layers:
            if name in done:
                db.tensors(name)  # checksum verified
                rel = str(db.stem(name).with_suffix(".json").relative_to(root))
                assert (root / rel).read_bytes() == ref[rel]
    assert partial > 0  # some kills landed mid-build
    for k in range(0, 30, 5):
        _build(tmp_path / f"db{k}")
        assert _files(tmp_path / f"db{k}") == ref


def test_fuzzed_database_files_are_checkpoint_errors(reference, tmp_path):
    """Truncations, bit flips, edited JSON and hostile safetensors bytes (with a record resealed
    to match them) in a layer or the fingerprint: reading is a ``CheckpointError`` (the
    ``DatabaseError`` subclass) with a message, or the layer counts as not built."""
    _, ref = reference
    rng = random.Random(11)
    targets = ["fingerprint.json", "layers/0001.json", "layers/0001.safetensors"]
    cases = []
    for rel in targets:
        data = ref[rel]
        for _ in range(10):
            cases.append((rel, data[: rng.randrange(len(data))]))
            b = bytearray(data)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            cases.append((rel, bytes(b)))
    rec = json.loads(ref["layers/0001.json"])
    for hostile in (
        b"\xff" * 8 + ref["layers/0001.safetensors"][8:],
        b"\x08" + b"\0" * 7 + b"{{{{{{{{",
    ):
        forged = seal(
            {
                **{k: v for k, v in rec.items() if k != "sha256_self"},
                "tensors_sha256": sha256_bytes(hostile),
            }
        )
        cases.append(("layers/0001.safetensors", hostile, json.dumps(forged).encode()))
    cases.append(("fingerprint.json", b"[" * 100_000))
    root = tmp_path / "db"
    refused = 0
    for case in cases:
        for rel, raw in ref.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(raw)
        rel, data = case[0], case[1]
        (root / rel).write_bytes(data)
        if len(case) == 3:
            (root / "layers/0001.json").write_bytes(case[2])
        try:
            db = Database(root)
            for name in db.layers:
                for lid in db.record(name)["levels"]:
                    db.level_weights(name, lid)
        except CheckpointError as e:
            assert str(e)
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{rel}: {type(e).__name__}: {e}")
        assert data == ref[rel], f"{rel}: a mutated file was read as valid"
    assert refused >= len(cases) - 2  # a truncation at full length / no-op flip cannot occur
