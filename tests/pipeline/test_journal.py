"""The compress journal: a run interrupted after k layers resumes with those k replayed (not
solved again) and ends bit-identical to an uninterrupted run, in sequential and independent
mode; another run's journal is kept beside it and never replayed; a damaged layer, a leftover
without its key and a change of model code are solved again."""

import json

import pytest
import torch
from torch import nn

import optbrain.pipeline.compress as pc
from optbrain import compress
from optbrain.pipeline.journal import KEY, Journal, discard


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, d: int = 12, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layers:
            x = b(x)
        return self.head(x)


def make() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Net().eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(16, 12, generator=g) for _ in range(4)]


def recipe(mode: str) -> dict:
    return {"method": "obc", "sparsity": 0.5, "bits": 4, "calibration": {"mode": mode}}


def layers_of(base) -> list:
    """The layer records of the one run journaled in ``base``."""
    (run,) = [d for d in base.iterdir() if (d / KEY).is_file()]
    return sorted((run / "layers").glob("*.json"))


class Stop(KeyboardInterrupt):
    pass


@pytest.fixture
def counting(monkeypatch):
    """``solve_layer`` counted; ``calls["stop"] = k`` raises an interrupt at the k-th call."""
    calls = {"n": 0, "stop": None}
    real = pc.solve_layer

    def solve(*args, **kw):
        calls["n"] += 1
        if calls["stop"] is not None and calls["n"] == calls["stop"]:
            raise Stop
        return real(*args, **kw)

    monkeypatch.setattr(pc, "solve_layer", solve)
    return calls


def _same(record) -> dict:
    """A record without what differs between two solves of the same layer (time, memory)."""
    d = record.to_dict()
    return {k: v for k, v in d.items() if k not in ("seconds", "peak_memory_mb")}


@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_interrupted_run_resumes_bit_identical(tmp_path, counting, mode):
    ref_model, calib = make()
    ref = compress(ref_model, calib, recipe(mode), quiet=True)
    layers = len(ref.layers)
    assert layers == 7 and counting["n"] == 7

    model, _ = make()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    counting.update(n=0, stop=4)
    with pytest.raises(Stop):
        compress(model, calib, recipe(mode), quiet=True, journal=tmp_path / "j")
    for k, v in model.state_dict().items():  # the model is put back as it was
        assert torch.equal(v, dense[k]), k
    assert len(layers_of(tmp_path / "j")) == 3

    counting.update(n=0, stop=None)
    rep = compress(model, calib, recipe(mode), quiet=True, journal=tmp_path / "j")
    assert counting["n"] == layers - 3  # the 3 journaled layers are replayed, not solved
    assert rep.metadata.pop("journal") == str(layers_of(tmp_path / "j")[0].parent.parent)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert [_same(r) for r in rep.layers] == [_same(r) for r in ref.layers]
    mine, theirs = model._optbrain.layers, ref_model._optbrain.layers
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].plan == theirs[name].plan
        for a, b in zip(mine[name].groups, theirs[name].groups, strict=True):
            assert torch.equal(a.mask, b.mask) and torch.equal(a.scale, b.scale), name

    counting.update(n=0)  # a finished journal: everything replayed
    again, _ = make()
    compress(again, calib, recipe(mode), quiet=True, journal=tmp_path / "j")
    assert counting["n"] == 0
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ref_model.state_dict().items())


def test_another_runs_journal_is_kept_and_not_replayed(tmp_path, counting, capsys):
    """Another recipe into the same journal directory solves everything, leaves the first run's
    journal as it was (a rerun of that command still resumes it) and says so; discard removes
    only its own run, and the directory once empty."""
    model, calib = make()
    first = compress(model, calib, recipe("sequential"), quiet=True, journal=tmp_path / "j")
    before = sorted(p.read_bytes() for p in layers_of(tmp_path / "j"))
    other, _ = make()
    counting.update(n=0)
    rec = {**recipe("sequential"), "sparsity": 0.25}
    rep = compress(other, calib, rec, journal=tmp_path / "j")
    assert counting["n"] == len(rep.layers)  # nothing replayed from the 50% run
    assert "also holds 1 interrupted run(s) of other settings" in capsys.readouterr().err
    discard(rep.metadata["journal"])
    assert sorted(p.read_bytes() for p in layers_of(tmp_path / "j")) == before
    counting.update(n=0)
    again, _ = make()
    compress(again, calib, recipe("sequential"), quiet=True, journal=tmp_path / "j")
    assert counting["n"] == 0
    discard(first.metadata["journal"])
    assert not (tmp_path / "j").exists()


def test_leftover_without_key_and_changed_code_are_solved_again(tmp_path, counting):
    """A run subdirectory whose key is gone (a kill before it was written, or mid-discard) is
    cleared, not refused; the same weights under other model code (ReLU -> GELU in a block's
    forward) get their own journal, not the other code's layers."""
    model, calib = make()
    rep = compress(model, calib, recipe("independent"), quiet=True, journal=tmp_path / "j")
    root = tmp_path / "j" / rep.metadata["journal"].rsplit("/", 1)[-1]
    (root / KEY).unlink()
    again, _ = make()
    counting.update(n=0)
    compress(again, calib, recipe("independent"), quiet=True, journal=tmp_path / "j")
    assert counting["n"] == len(rep.layers)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())

    class GeluBlock(Block):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    gelu, _ = make()
    for i, b in enumerate(gelu.layers):
        g = GeluBlock(12)
        g.load_state_dict(b.state_dict())
        gelu.layers[i] = g
    counting.update(n=0)
    compress(gelu, calib, recipe("independent"), quiet=True, journal=tmp_path / "j")
    assert counting["n"] == len(rep.layers)  # not the ReLU model's layers


def test_damaged_layer_is_solved_again(tmp_path, counting):
    model, calib = make()
    compress(model, calib, recipe("independent"), quiet=True, journal=tmp_path / "j")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    first = layers_of(tmp_path / "j")[0].with_suffix(".safetensors")
    data = bytearray(first.read_bytes())
    data[-1] ^= 1
    first.write_bytes(bytes(data))
    second = layers_of(tmp_path / "j")[1]
    second.write_text(second.read_text().replace('"sparsity"', '"sparsity_"', 1))
    again, _ = make()
    counting.update(n=0)
    compress(again, calib, recipe("independent"), quiet=True, journal=tmp_path / "j")
    assert counting["n"] == 2  # the flipped bit and the edited record: solved again
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ref.items())


def test_journal_in_a_directory_with_other_files_touches_nothing_else(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep")
    j = Journal(tmp_path / "d", {"k": 1})
    j.discard()
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["mine.txt"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        Journal(tmp_path / "f", {"k": 1})


def test_killed_at_12_random_moments_resumes_bit_identical(tmp_path):
    """A forked sequential compress is SIGKILLed at 12 random moments (three journals, each
    killed four times, each kill resuming the one before); every journaled layer reads back
    whole, and a final resume in this process gives the uninterrupted run's weights."""
    import os
    import random
    import signal
    import time

    from forking import killable_child

    warm, calib = make()  # the first call in a process pays for lazy imports: not timed
    compress(warm, calib, recipe("sequential"), quiet=True)
    ref_model, _ = make()  # one thread, as in the children (tests/pipeline/conftest.py)
    t0 = time.perf_counter()
    compress(ref_model, calib, recipe("sequential"), quiet=True)
    full = time.perf_counter() - t0
    rng, partial = random.Random(5), 0
    for k in range(12):
        root = tmp_path / f"j{k // 4}"
        pid = os.fork()
        if pid == 0:
            try:
                killable_child()
                model, _ = make()
                compress(model, calib, recipe("sequential"), quiet=True, journal=root)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 1.5 * full))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        keys = list(root.glob(f"*/{KEY}")) if root.is_dir() else []
        if keys:  # opened as a rerun would
            j = Journal(root, json.loads(keys[0].read_text()))
            partial += 0 < len(j.index) < 7
    assert partial > 0  # some kills landed mid-run
    for k in range(3):
        model, _ = make()
        compress(model, calib, recipe("sequential"), quiet=True, journal=tmp_path / f"j{k}")
        for name, v in ref_model.state_dict().items():
            assert torch.equal(model.state_dict()[name], v), (k, name)
