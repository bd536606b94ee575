"""The ``optbrain`` command, run in-process (``optbrain.app.cli.main``) on the digits zoo models,
plus one ``python -m optbrain`` subprocess: run directories, printed metrics that agree with
``report.json`` and with a fresh evaluation, bad flags (exit code 2, message on stderr) and a
one-budget ``optbrain demo``.

The digits models are trained once per session into a temporary ``$OPTBRAIN_CACHE``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import optbrain.app.demo
from optbrain.app import zoo
from optbrain.app.cli import main
from optbrain.io import load
from optbrain.pipeline.data import CalibrationError
from optbrain.recipe import Recipe

RUN_FILES = {"manifest.json", "compressed.safetensors", "report.json", "report.html", "recipe.yaml"}
METRIC_ROW = re.compile(r"^\| (\w+) \| ([0-9.]+|—) \| ([0-9.]+|—) \|$")


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("optbrain-cache")


@pytest.fixture(autouse=True)
def _env(zoo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTBRAIN_CACHE", str(zoo_cache))
    monkeypatch.chdir(tmp_path)  # default run directories (runs/...) land in the test's folder
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def metric_rows(text: str) -> dict[str, tuple[float | None, float | None]]:
    """``{metric: (first column, second column)}`` of the markdown metric tables printed."""
    out = {}
    for line in text.splitlines():
        m = METRIC_ROW.match(line.strip())
        if m and m.group(1) != "metric":
            out[m.group(1)] = tuple(None if v == "—" else float(v) for v in m.group(2, 3))
    return out


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, zoo_cache):
    """``optbrain compress --model digits-mlp --sparsity 0.5 --out DIR --quiet``, run once."""
    out = tmp_path_factory.mktemp("cli") / "mlp-sparse50"
    mp = pytest.MonkeyPatch()
    mp.setenv("OPTBRAIN_CACHE", str(zoo_cache))
    try:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            argv = "compress --model digits-mlp --sparsity 0.5 --quiet --out".split()
            code = main([*argv, str(out)])
    finally:
        mp.undo()
    return out, code, stdout.getvalue(), stderr.getvalue()


# ------------------------------------------------------------------------------ models


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == zoo.names()
    assert {"digits-cnn", "digits-mlp"} <= set(names)
    cnn_line = lines[names.index("digits-cnn")]
    assert zoo.get("digits-cnn").description in cnn_line


def test_python_m_optbrain_models(zoo_cache, capsys):
    assert main(["models"]) == 0
    in_process = capsys.readouterr().out
    env = {**os.environ, "OPTBRAIN_CACHE": str(zoo_cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "optbrain", "models"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == in_process
    assert "digits-cnn" in proc.stdout


# ------------------------------------------------------------------------------ compress


def test_compress_writes_the_run_directory(mlp_run):
    out, code, stdout, stderr = mlp_run
    assert code == 0
    assert stderr == ""  # --quiet: no progress line
    assert {p.name for p in out.iterdir()} == RUN_FILES
    report = json.loads((out / "report.json").read_text())
    layers = report["layers"]
    assert [r["name"] for r in layers] == ["1", "3", "5"]
    assert all(r["status"] == "compressed" and r["sparsity"] == 0.5 for r in layers)
    assert all(r["tokens"] == 128 for r in layers)  # --samples default
    # the saved weights are 50% zeros, layer by layer
    tensors = load_file(str(out / "compressed.safetensors"))
    for name in ("1", "3", "5"):
        assert float((tensors[f"{name}.weight"] == 0).float().mean()) == 0.5
    # the printed table is the report's metrics, and the dense number is a fresh evaluation
    rows = metric_rows(stdout)
    metrics = report["metrics"]
    costs = {"params", "macs", "latency_b1_ms", "latency_b32_ms"}  # measured, dense vs compressed
    assert set(rows) == set(metrics) == {"accuracy", "agreement", *costs}
    assert metrics["params"]["compressed"] == metrics["params"]["dense"]  # zeros, not shrunk
    for k, (dense, comp) in rows.items():
        for printed, stored in ((dense, metrics[k]["dense"]), (comp, metrics[k]["compressed"])):
            assert (printed is None) == (stored is None)
            if stored is not None:
                assert printed == pytest.approx(stored, abs=5e-5)
    entry = zoo.get("digits-mlp")
    dense = entry.load()
    assert entry.evaluate(dense)["accuracy"] == metrics["accuracy"]["dense"]
    # at 50% sparsity OBC keeps the MLP's accuracy within 2 points (measured: no change)
    assert metrics["accuracy"]["compressed"] >= metrics["accuracy"]["dense"] - 2
    # the recipe file reproduces the recipe recorded in the report
    assert Recipe.from_yaml(out / "recipe.yaml").to_dict() == report["recipe"]
    assert f"run written to {out}/" in stdout


def test_eval_prints_the_compressed_accuracy_of_the_report(mlp_run, capsys):
    out = mlp_run[0]
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    assert main(["eval", "--model", "digits-mlp", "--compressed", str(out)]) == 0
    rows = metric_rows(capsys.readouterr().out)
    assert rows["accuracy"][0] == pytest.approx(metrics["accuracy"]["dense"], abs=5e-5)
    assert rows["accuracy"][1] == pytest.approx(metrics["accuracy"]["compressed"], abs=5e-5)
    assert main(["eval", "--model", "digits-mlp", "--compressed", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["compressed"]["accuracy"] == metrics["accuracy"]["compressed"]
    assert got["compressed"]["agreement"] == metrics["agreement"]["compressed"]
    assert got["dense"]["accuracy"] == metrics["accuracy"]["dense"]
    # and the same number from the library: load the run into a fresh dense copy
    entry = zoo.get("digits-mlp")
    dense = entry.load()
    model = load(copy.deepcopy(dense), out)
    assert entry.evaluate(model)["accuracy"] == metrics["accuracy"]["compressed"]


def test_report_writes_html(mlp_run, tmp_path, capsys):
    out = mlp_run[0]
    html = tmp_path / "page.html"
    assert main(["report", str(out), "--html", str(html)]) == 0
    printed = capsys.readouterr().out
    assert f"HTML report: {html.resolve()}" in printed
    text = html.read_text()
    assert text.lstrip().lower().startswith("<!doctype html")
    assert "digits-mlp" in text and "<svg" in text
    assert "accuracy" in metric_rows(printed)
    # default: next to report.json
    (out / "report.html").unlink()
    assert main(["report", str(out), "--quiet"]) == 0
    assert (out / "report.html").read_text() == text


def test_compress_with_recipe_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "calibration: {samples: 64}\n"
        "rules:\n"
        "  - targets: ['1', '3']\n"
        "    method: magnitude\n"
        "    pattern: 2:4\n"
    )
    out = tmp_path / "run"
    code = main(["compress", "--model", "digits-mlp", "--recipe", str(recipe), "--out", str(out)])
    assert code == 0
    cap = capsys.readouterr()
    assert "[compress] 1/2 1" in cap.err and "[compress] 2/2 3" in cap.err  # not --quiet
    report = json.loads((out / "report.json").read_text())
    by = {r["name"]: r for r in report["layers"]}
    for name in ("1", "3"):
        assert by[name]["status"] == "compressed" and by[name]["pattern"] == "2:4"
        assert by[name]["method"] == "magnitude" and by[name]["tokens"] == 64
    assert by["5"]["status"] == "skipped"
    tensors = load_file(str(out / "compressed.safetensors"))
    assert "5.weight" not in tensors
    for name in ("1", "3"):
        w = tensors[f"{name}.weight"]
        assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    assert Recipe.from_yaml(out / "recipe.yaml") == Recipe.from_yaml(recipe)


def test_compress_allocation_owl(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compress", "--model", "digits-mlp", "--method", "sparsegpt", "--sparsity", "0.5"]
    assert (
        main([*argv, "--allocation", "owl", "--samples", "32", "--out", str(out), "--quiet"]) == 0
    )
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["allocation"] == "owl"
    sp = [r["sparsity"] for r in report["layers"] if r["status"] == "compressed"]
    assert len(sp) >= 2 and max(sp) - min(sp) > 0.01  # not uniform any more
    assert all(0.34 - 1e-3 <= s <= 0.66 + 1e-3 for s in sp), sp  # 0.5 ± 2λ
    assert (out / "recipe.yaml").read_text().count("allocation: owl") == 1


def test_compress_flags_mode_and_samples(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compress", "--model", "digits-mlp", "--bits", "4", "--group-size", "32"]
    argv += ["--mode", "sequential", "--samples", "32", "--targets", "3", "5", "--out", str(out)]
    assert main(argv + ["--quiet"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["calibration_mode"] == "sequential"
    by = {r["name"]: r for r in report["layers"]}
    assert by["1"]["status"] == "skipped"
    for name in ("3", "5"):
        r = by[name]
        assert r["status"] == "compressed" and r["bits"] == 4 and r["group_size"] == 32
        assert r["tokens"] == 32
    assert main(["eval", "--model", "digits-mlp", "--compressed", str(out), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["compressed"]["accuracy"]
    assert full == report["metrics"]["accuracy"]["compressed"]
    # --limit 100: the accuracy on the first 100 test digits, as the library computes it
    argv = ["eval", "--model", "digits-mlp", "--compressed", str(out), "--json", "--limit", "100"]
    assert main(argv) == 0
    part = json.loads(capsys.readouterr().out)["compressed"]["accuracy"]
    entry = zoo.get("digits-mlp")
    model = load(copy.deepcopy(entry.load()), out)
    assert part == entry.evaluate(model, limit=100)["accuracy"]
    assert part == round(part)  # a whole number of percent of 100 digits


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "--model", "digits-mlp", "--sparsity", "1.5"], r"sparsity .*1\.5"),
        (
            ["compress", "--model", "no-such-model", "--sparsity", "0.5"],
            "unknown model 'no-such-model'",
        ),
        (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'.*digits-cnn"),
        (["compress", "--model", "digits-mlp"], "say what to do"),
        (
            ["compress", "--model", "digits-mlp", "--recipe", "R", "--bits", "4"],
            r"--recipe.*\['bits'\]",
        ),
        (
            ["compress", "--model", "digits-mlp", "--recipe", "R", "--samples", "16"],
            r"--recipe.*\['samples'\]",
        ),
        (
            ["compress", "--model", "digits-mlp", "--recipe", "R", "--group-size", "8", "--asym"],
            r"--recipe.*\['asym', 'group_size'\]",
        ),
        (["compress", "--model", "digits-mlp", "--recipe", "missing.yaml"], "not found"),
        (["report", "no-such-dir"], "no-such-dir.*not found"),
    ],
    ids=[
        "sparsity",
        "model",
        "eval-model",
        "nothing",
        "recipe+bits",
        "recipe+samples",
        "recipe+grid",
        "recipe-file",
        "report",
    ],
)
def test_bad_flags_exit_2_with_message(argv, message, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: obc\nsparsity: 0.5\n")
    argv = [str(recipe) if a == "R" else a for a in argv]
    out = tmp_path / "run"
    if argv[0] == "compress":
        argv += ["--out", str(out)]
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert re.search(message, cap.err), cap.err
    assert cap.err.startswith(f"optbrain {argv[0]}: error: ")
    assert not out.exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", "digits-mlp", "--method", "nope", "--sparsity", "0.5"])
    assert e.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ demo

ROW = re.compile(r"^\| (.+?) \| (\w+) \| ([0-9.]+)% \| ([+-][0-9.]+) pt \| ([0-9.]+) \|$")


def test_demo_one_budget(monkeypatch, tmp_path, capsys):
    """The demo with one budget and two methods (the full one takes ~30 s): the table has an
    OBC and a magnitude row whose numbers agree with the header, the run directories and their
    reports. Layer ``10`` (the 1024-column Linear, slow for exact OBC) is left dense."""
    budget = {"sparsity": 0.5, "ignore": ["10"]}
    monkeypatch.setattr(
        optbrain.app.demo, "BUDGETS", [("50% unstructured", "sp50", budget, ["obc", "magnitude"])]
    )
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    head = re.search(r"^digits-cnn: .*dense test accuracy ([0-9.]+)%", text, re.M)
    assert head, text
    dense_acc = float(head.group(1))
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows[m.group(2)] = (m.group(1), float(m.group(3)), float(m.group(4)), float(m.group(5)))
    assert set(rows) == {"obc", "magnitude"}, text
    for method, (label, acc, drop, secs) in rows.items():
        assert label == "50% unstructured"
        assert 0 <= acc <= 100 and secs >= 0
        assert drop == pytest.approx(dense_acc - acc, abs=0.11)
        assert re.search(rf"^  50% unstructured\s+{method}\s+accuracy\s+{acc:5.1f}%", text, re.M)
        run = out / f"sp50-{method}"
        assert RUN_FILES <= {p.name for p in run.iterdir()}
        report = json.loads((run / "report.json").read_text())
        assert f"{report['metrics']['accuracy']['compressed']:.1f}" == f"{acc:.1f}"
        by = {r["name"]: r for r in report["layers"]}
        assert by["10"]["status"] == "skipped"
        assert all(by[n]["sparsity"] == 0.5 and by[n]["method"] == method for n in ("0", "3", "12"))
    # measured: OBC 99.4%, magnitude 99.0% (dense 99.6%); bound: OBC within 2 points of dense
    assert rows["obc"][1] >= dense_acc - 2
    assert str(out / "sp50-obc" / "report.html") in text


# ------------------------------------------------------------------- failures before compute


def _no_compute(monkeypatch):
    """Make any compute fail loudly: the checks under test must come first."""
    import optbrain.app.runs as runs

    def boom(*a, **k):
        raise AssertionError("compute started before the check")

    monkeypatch.setattr(runs, "run_zoo", boom)
    monkeypatch.setattr(runs, "run_zoo_budget", boom)


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        ("file", [], "--out .* is an existing file"),
        ("under-file", [], "cannot be created: .* is a file"),
        ("db-file", ["--target", "flops=0.5"], "is a file, not a budget database"),
        ("db-other", ["--target", "flops=0.5"], "not empty and not a budget database"),
        ("pattern", ["--pattern", "abc"], "pattern.*'abc'"),
        ("recipe-latin1", [], r"recipe file .*bad\.yaml is not UTF-8"),
    ],
)
def test_bad_paths_fail_before_compute(setup, extra, message, tmp_path, monkeypatch, capsys):
    _no_compute(monkeypatch)
    out = tmp_path / "run"
    argv = ["compress", "--model", "digits-mlp"]
    if setup == "file":
        out.write_text("x")
    if setup == "under-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "run"
    if setup in ("db-file", "db-other"):
        db = tmp_path / "db"
        if setup == "db-file":
            db.write_text("x")
        else:
            db.mkdir()
            (db / "notes.txt").write_text("mine")
        extra = [*extra, "--db", str(db)]
    if setup == "recipe-latin1":
        (tmp_path / "bad.yaml").write_bytes(
            "method: obc\nsparsity: 0.5 # caf\xe9\n".encode("latin-1")
        )
        extra = ["--recipe", str(tmp_path / "bad.yaml")]
    if setup != "pattern" and "--recipe" not in extra and "--target" not in extra:
        extra = [*extra, "--sparsity", "0.5"]
    assert main([*argv, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    if setup == "db-other":
        assert sorted(p.name for p in (tmp_path / "db").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("limit", ["0", "-5", "x"])
def test_limit_must_be_positive(limit, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "digits-mlp", "--limit", limit])
    assert e.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "exc, code, message",
    [
        (
            KeyboardInterrupt(),
            130,
            "interrupted; rerun the same command to resume (work finished so far is kept)",
        ),
        (OSError(28, "No space left on device"), 1, "No space left on device"),
        (
            CalibrationError("calibration batch 0 failed in forward: TypeError: bad input", 0),
            2,
            "error: calibration batch 0 failed in forward: TypeError: bad input",
        ),
    ],
)
def test_interrupt_and_os_errors_are_messages(exc, code, message, tmp_path, monkeypatch, capsys):
    import optbrain.app.runs as runs

    def raise_(*a, **k):
        raise exc

    monkeypatch.setattr(runs, "run_zoo", raise_)
    argv = ["compress", "--model", "digits-mlp", "--sparsity", "0.5", "--out", str(tmp_path / "r")]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_interrupted_budget_run_says_resume(tmp_path, monkeypatch, capsys):
    """A --target run keeps its layer database: the interrupt says a rerun resumes."""
    import optbrain.app.runs as runs

    def raise_(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "run_zoo_budget", raise_)
    argv = ["compress", "--model", "digits-mlp", "--target", "flops=0.5", "--out",
            str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_no_layer_compressed_exits_1_with_reason(tmp_path, capsys):
    """--group-size 7 fits none of the digits-mlp layers: the run says so and exits 1."""
    out = tmp_path / "run"
    argv = "compress --model digits-mlp --bits 4 --group-size 7 --samples 16 --limit 20 --quiet"
    assert main([*argv.split(), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no layer was compressed" in err and "group" in err


def test_reused_out_loses_an_earlier_runs_files(tmp_path, capsys):
    """A budget run's allocation.json and the other tensors slot do not survive a uniform run
    into the same directory."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "allocation.json").write_text("{}")
    (out / "compressed.b.safetensors").write_bytes(b"old")
    argv = "compress --model digits-mlp --sparsity 0.5 --samples 16 --limit 20 --quiet"
    assert main([*argv.split(), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == RUN_FILES


def test_compress_channels_writes_a_shrunk_run(tmp_path, capsys):
    """``--pattern channels``: the saved weights are physically smaller, the metrics show
    parameters / MACs / latency dense vs compressed, and eval reloads the shrunk model."""
    out = tmp_path / "cnn-channels"
    argv = ["compress", "--model", "digits-cnn", "--pattern", "channels", "--sparsity", "0.5"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shrink"]["ops"], "nothing was shrunk"
    removed = manifest["shrink"]["report"]["removed"]
    assert removed and all(v > 0 for v in removed.values())
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    for k in ("params", "macs"):
        assert metrics[k]["compressed"] < 0.8 * metrics[k]["dense"], k
    assert metrics["latency_b1_ms"]["compressed"] > 0 and "latency_b32_ms" in metrics
    capsys.readouterr()
    assert main(["eval", "--model", "digits-cnn", "--compressed", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["compressed"]["params"] == metrics["params"]["compressed"]
    assert got["compressed"]["accuracy"] == pytest.approx(metrics["accuracy"]["compressed"])
    assert got["dense"]["params"] == metrics["params"]["dense"]


def test_bad_preset_refused_even_with_flags_and_a_flag_over_a_preset_said(tmp_path, capsys):
    """--preset 150% is an error even when --sparsity would override it; a flag that overrides a
    preset's setting runs, with a note naming both."""
    argv = ["compress", "--model", "digits-mlp", "--sparsity", "0.5", "--preset", "150%",
            "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "preset must be one of" in err and "'150%'" in err and "Traceback" not in err
    argv = ["compress", "--model", "digits-mlp", "--preset", "w8a16", "--bits", "4",
            "--samples", "16", "--limit", "20", "--quiet",
            "--out", str(tmp_path / "r2")]  # fmt: skip
    assert main(argv) == 0
    assert "note: --bits 4 overrides --preset w8a16's bits=8" in capsys.readouterr().err
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert {r["bits"] for r in report["layers"] if r["status"] == "compressed"} == {4}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sparsity", "1.5"], "--sparsity must be a number in [0, 1)"),
        (["--bits", "99"], "--bits must be an integer in [1, 16]"),
        (["--bits", "4", "--group-size", "0"], "--group-size must be a positive integer"),
    ],
)
def test_flag_errors_name_the_flag(flags, message, tmp_path, capsys):
    argv = ["compress", "--model", "digits-mlp", *flags, "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "rules[0]" not in err, err


def test_compress_channels_with_refit(tmp_path, capsys):
    """``--refit``: every layer refitted to the dense outputs before shrink; the report says
    what it did, eval reloads the same shrunk model, and --refit with --recipe is refused."""
    out = tmp_path / "cnn-refit"
    argv = ["compress", "--model", "digits-cnn", "--pattern", "channels", "--sparsity", "0.5",
            "--refit", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "refit to the dense outputs:" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    refit = report["metadata"]["refit"]
    assert refit["layers"] and all(r["loss_after"] <= r["loss_before"] for r in refit["layers"])
    assert report["recipe"]["refit"] is True
    assert json.loads((out / "manifest.json").read_text())["shrink"]["ops"]
    capsys.readouterr()
    assert main(["eval", "--model", "digits-cnn", "--compressed", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["compressed"]["accuracy"] == pytest.approx(
        report["metrics"]["accuracy"]["compressed"]
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: obc\nsparsity: 0.5\n")
    argv = ["compress", "--model", "digits-cnn", "--recipe", str(recipe), "--refit",
            "--out", str(tmp_path / "x")]  # fmt: skip
    assert main(argv) == 2
    assert "--recipe cannot be combined with ['refit']" in capsys.readouterr().err
