"""Run directories survive a writer killed at any moment (old or new version loads, never a
checksum error), reproduce their bytes, and every mutated file (truncation, bit flip, edited
JSON, hostile safetensors header) is a ``CheckpointError`` with the model left untouched."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
from forking import killable_child
from torch import nn

from optbrain._files import SEAL, TMP_SUFFIX, seal, sha256_bytes
from optbrain.api import compress
from optbrain.io import CheckpointError, load, save
from optbrain.io.checkpoint import MANIFEST, REPORT, TENSORS, TENSORS_B


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def _compressed(sparsity: float) -> tuple[nn.Module, nn.Module]:
    dense = _mlp()
    model = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 12, generator=g) for _ in range(4)]
    recipe = {"rules": [{"targets": ["*"], "method": "magnitude", "sparsity": sparsity}]}
    compress(model, batches, recipe, quiet=True)
    return dense, model


@pytest.fixture(scope="module")
def two_runs():
    """The dense model and two different compressed versions of it (50% and 75%)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense, a = _compressed(0.5)
        _, b = _compressed(0.75)
    finally:
        torch.set_num_threads(n)
    return dense, a, b


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_same_model_same_bytes(two_runs, tmp_path):
    """10 saves of one model: one SHA-256 for the tensors file (safetensors' own writer gave 2),
    and the manifest differs only in the report's timestamps."""
    _, a, _ = two_runs
    digests = set()
    for i in range(10):
        run = save(a, tmp_path / f"r{i}")
        digests.add(sha256_bytes((run / TENSORS).read_bytes()))
    assert len(digests) == 1
    m = json.loads((tmp_path / "r0" / MANIFEST).read_text())
    assert m["environment"] == {"torch": torch.__version__, "threads": torch.get_num_threads()}


def test_resave_alternates_slots_and_never_touches_the_committed_file(two_runs, tmp_path):
    dense, a, b = two_runs
    run = save(a, tmp_path / "run")
    first = (run / TENSORS).read_bytes()
    save(b, run)
    assert (run / TENSORS_B).is_file() and not (run / TENSORS).exists()
    assert json.loads((run / MANIFEST).read_text())["tensors"] == TENSORS_B
    assert _same(_weights(load(copy.deepcopy(dense), run)), _weights(b))
    save(a, run)
    assert (run / TENSORS).read_bytes() == first and not (run / TENSORS_B).exists()
    # a killed writer's temporary file is ignored by load and deleted by the next save
    stale = run / f".{TENSORS}.1.2{TMP_SUFFIX}"
    stale.write_bytes(b"half")
    assert _same(_weights(load(copy.deepcopy(dense), run)), _weights(a))
    save(b, run)
    assert not stale.exists()


# --------------------------------------------------------------------------------- kill test


def test_killed_at_30_random_moments_loads_old_or_new(two_runs, tmp_path):
    """A forked writer re-saves A and B into one directory without pause; SIGKILL at 30 random
    moments; after each, the directory loads as A or B (never a checksum error)."""
    dense, a, b = two_runs
    run = save(a, tmp_path / "run")
    versions = [_weights(a), _weights(b)]
    t0 = time.perf_counter()
    for _ in range(5):
        save(b, run)
        save(a, run)
    per_save = (time.perf_counter() - t0) / 10
    rng = random.Random(13)
    seen = set()
    for _ in range(30):
        pid = os.fork()
        if pid == 0:  # the writer: never returns
            try:
                killable_child()
                while True:
                    save(b, run)
                    save(a, run)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 4 * per_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = _weights(load(copy.deepcopy(dense), run))
        match = [i for i, v in enumerate(versions) if _same(got, v)]
        assert match, "the directory loaded as neither the old nor the new version"
        seen.add(match[0])
    assert seen == {0, 1}  # the kills landed at different stages


# --------------------------------------------------------------------------------- fuzz test


def _hostile_headers(data: bytes) -> list[bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    key = next(k for k in header if k != "__metadata__")

    def with_header(h: dict, pad: bool = True) -> bytes:
        hb = json.dumps(h).encode()
        if pad:
            hb += b" " * (-len(hb) % 8)
        return struct.pack("<Q", len(hb)) + hb + body

    out = [struct.pack("<Q", 2**62) + data[8:], struct.pack("<Q", len(data)) + data[8:]]
    out.append(struct.pack("<Q", 5) + b"{{{{{" + body)
    for change in (
        {"data_offsets": [0, 10**12]},
        {"data_offsets": [8, 4]},
        {"dtype": "Q99"},
        {"shape": [10**9, 10**9]},
        {"shape": [-1]},
        {"shape": "x"},
    ):
        h = json.loads(json.dumps(header))
        h[key].update(change)
        out.append(with_header(h))
    h = json.loads(json.dumps(header))
    h["__metadata__"] = {"a": {"nested": 1}}
    out.append(with_header(h))
    out.append(with_header({"x" * 10: "y"}))
    return out


def _mutate_json(obj, rng: random.Random):
    """Replace one random node of a JSON tree with something else (or delete it)."""
    paths = []

    def walk(o, path):
        paths.append(path)
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, path + [k])
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, path + [i])

    walk(obj, [])
    path = rng.choice(paths[1:])
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    choice = rng.choice([None, 0, -1, 1.5, "", "x", [], {}, [1, 2], {"a": 1}, True, "drop"])
    if choice == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = choice
    return obj


def _cases(run: Path, rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(description, file name, new bytes) mutations of a saved run."""
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    cases = []
    for name in (TENSORS, MANIFEST):
        data = files[name]
        for _ in range(8):
            cut = rng.randrange(len(data))
            cases.append((f"truncate {name} at {cut}", name, data[:cut]))
        for _ in range(12):
            b = bytearray(data)
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
            cases.append((f"flip a bit of {name} at {i}", name, bytes(b)))
    manifest = json.loads(files[MANIFEST])
    for k in range(40):
        edited = _mutate_json(json.loads(json.dumps(manifest)), rng)
        resealed = k % 2 == 0 and SEAL in edited
        text = json.dumps(
            seal({k2: v for k2, v in edited.items() if k2 != SEAL}) if resealed else edited
        )
        cases.append((f"edit manifest #{k} resealed={resealed}", MANIFEST, text.encode()))
    for i, hostile in enumerate(_hostile_headers(files[TENSORS])):
        forged = seal(
            {**{k: v for k, v in manifest.items() if k != SEAL}, "sha256": sha256_bytes(hostile)}
        )
        cases.append((f"hostile header #{i}", TENSORS, hostile))
        cases.append(
            (
                f"hostile header #{i} (forged manifest)",
                MANIFEST + "+" + TENSORS,
                json.dumps(forged).encode() + b"\0" + hostile,
            )
        )
    cases.append(("manifest 100k deep", MANIFEST, b"[" * 100_000 + b"]" * 100_000))
    cases.append(("manifest not UTF-8", MANIFEST, b"\xff\xfe" + files[MANIFEST]))
    return cases


def test_fuzzed_runs_are_checkpoint_errors_never_partial(two_runs, tmp_path):
    dense, a, _ = two_runs
    run = save(a, tmp_path / "run")
    saved = _weights(a)
    originals = {p.name: p.read_bytes() for p in run.iterdir()}
    cases = _cases(run, random.Random(2026))
    assert len(cases) > 100
    target = copy.deepcopy(dense)
    before = _weights(target)
    errors = 0
    for what, name, data in cases:
        for fname, raw in originals.items():
            (run / fname).write_bytes(raw)
        if "+" in name:
            m, t = name.split("+")
            mbytes, tbytes = data.split(b"\0", 1)
            (run / m).write_bytes(mbytes)
            (run / t).write_bytes(tbytes)
        else:
            (run / name).write_bytes(data)
        try:
            load(target, run)
        except CheckpointError as e:
            errors += 1
            assert str(e), what
            assert _same(_weights(target), before), f"{what}: partial apply"
            assert "_optbrain" not in target.__dict__, what
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        # a load that passed applied the complete, unmodified run (a harmless resealed edit)
        assert _same(_weights(target), saved), f"{what}: loaded something else"
        target = copy.deepcopy(dense)
    assert errors >= len(cases) - 25  # almost every mutation is refused (resealed edits of
    # free-form parts such as the recipe or report may load, and then load everything)


def test_fuzz_is_reproducible(two_runs, tmp_path):
    _, a, _ = two_runs
    run = save(a, tmp_path / "run")
    one = _cases(run, random.Random(5))
    two = _cases(run, random.Random(5))
    assert [(w, n, sha256_bytes(d)) for w, n, d in one] == [
        (w, n, sha256_bytes(d)) for w, n, d in two
    ]


def test_report_json_is_a_copy(two_runs, tmp_path):
    """The report applied comes from the sealed manifest; report.json is a copy for people,
    so a damaged copy cannot change what loads."""
    dense, a, _ = two_runs
    run = save(a, tmp_path / "run")
    (run / REPORT).write_text('{"layers": [')
    m = load(copy.deepcopy(dense), run)
    assert m.__dict__["_optbrain"]["report"] == json.loads((run / MANIFEST).read_text())["report"]
