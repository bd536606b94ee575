"""``optbrain compress --model M --target ...``: the CLI's budget path, end to end."""

import json

import pytest

from optbrain.app.cli import main


def test_cli_target_writes_a_loadable_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    argv = ["compress", "--model", "digits-mlp", "--target", "flops=0.3", "--samples", "64"]
    assert main([*argv, "--out", str(out), "--quiet", "--limit", "100"]) == 0
    printed = capsys.readouterr().out
    assert "| layer | level |" in printed and "achieved" in printed
    alloc = json.loads((out / "allocation.json").read_text())
    assert alloc["achieved_cost"] <= alloc["budget"] and alloc["metric"] == "flops"
    assert (out / "db" / "fingerprint.json").is_file()
    assert "Budget allocation" in (out / "report.html").read_text()
    # a second budget reuses the database; eval loads the saved run
    assert main([*argv[:3], "--target", "size=0.2", "--samples", "64", "--out", str(out),
                 "--quiet", "--limit", "100"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "--model", "digits-mlp", "--compressed", str(out), "--limit", "100"]) == 0
    assert "compressed" in capsys.readouterr().out


def test_cli_target_rejects_per_layer_settings(capsys):
    argv = ["compress", "--model", "digits-mlp", "--target", "flops=0.3", "--sparsity", "0.5"]
    assert main(argv) == 2
    assert "--target" in capsys.readouterr().err


def test_cli_levels_flag(capsys):
    from optbrain.app.cli import _levels_from_args

    got = [lv.id for lv in _levels_from_args(["c0.25,c0.5+b8", "b4"])]
    assert got == ["c0.25", "c0.5+b8", "b4"]
    assert any(lv.channels for lv in _levels_from_args(["structured"]))
    assert _levels_from_args(None) is None
    argv = ["compress", "--model", "digits-mlp", "--sparsity", "0.5", "--levels", "c0.5"]
    assert main(argv) == 2
    assert "--target" in capsys.readouterr().err
    argv = ["compress", "--model", "digits-mlp", "--target", "flops=0.5", "--levels", "c0.5+s0.5"]
    assert main(argv) == 2
    assert "not both" in capsys.readouterr().err
