"""A zoo run killed part-way resumes from its journal: ``optbrain compress`` interrupted after
some layers, then rerun, solves only the rest, writes the same run as an uninterrupted one and
deletes the journal once the run is saved."""

import pytest

import optbrain.pipeline.compress as pc
from optbrain.app.cli import main
from optbrain.app.runs import JOURNAL
from optbrain.io.checkpoint import read_manifest


def test_interrupted_compress_resumes_from_the_journal(tmp_path, monkeypatch, capsys):
    real, calls = pc.solve_layer, {"n": 0, "stop": 2}

    def solve(*args, **kw):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(pc, "solve_layer", solve)
    argv = "compress --model digits-mlp --method obc --sparsity 0.5 --bits 4 --samples 32 "
    argv += "--limit 50 --quiet --out"
    ref, out = tmp_path / "ref", tmp_path / "run"
    calls["stop"] = None
    assert main([*argv.split(), str(ref)]) == 0
    layers = calls["n"]
    assert layers >= 3 and not (ref / JOURNAL).exists()

    calls.update(n=0, stop=2)
    assert main([*argv.split(), str(out)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len(list((out / JOURNAL).glob("*/layers/*.json"))) == 1

    calls.update(n=0, stop=None)
    assert main([*argv.split(), str(out)]) == 0
    assert calls["n"] == layers - 1  # the journaled layer was replayed
    assert not (out / JOURNAL).exists()
    a, b = read_manifest(ref), read_manifest(out)
    assert a["tensors"] == b["tensors"]  # sha256 of the run's tensors: bit-identical


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (``tests/conftest.py``)."""
