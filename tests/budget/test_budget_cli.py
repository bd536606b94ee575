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
