"""The ``optbrain`` command: compress, eval, report, demo, export, bench (the last two: deploy)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .paths import check_out


def _recipe_from_args(args: argparse.Namespace) -> Any:
    from ..recipe import Recipe

    if args.recipe:
        rec = Recipe.coerce(args.recipe)
        flags = {
            k: getattr(args, k)
            for k in (
                "method",
                "preset",
                "sparsity",
                "pattern",
                "bits",
                "group_size",
                "damp",
                "targets",
                "ignore",
                "mode",
                "samples",
                "allocation",
            )
            if getattr(args, k, None) is not None
        }
        if args.asym:
            flags["asym"] = True
        for k in ("bn_recalibration", "refit"):
            if getattr(args, k, False):
                flags[k] = True
        if flags:
            raise ValueError(
                f"--recipe cannot be combined with {sorted(flags)}; put them in the recipe file"
            )
        return rec
    rule: dict[str, Any] = {"method": args.method or "auto"}
    for k in ("preset", "sparsity", "pattern", "bits", "group_size", "damp"):
        v = getattr(args, k, None)
        if v is not None:
            rule[k] = v
    if args.asym:
        rule["sym"] = False
    if "preset" in rule:  # a flag given with it wins: said, not silent
        from ..recipe_rules import expand_preset

        preset = expand_preset(rule["preset"], (), "--preset")
        for k in sorted(set(preset) & set(rule)):
            flag = "--asym" if k == "sym" else f"--{k.replace('_', '-')}"
            print(
                f"note: {flag} {rule[k]} overrides --preset {rule['preset']}'s {k}={preset[k]}",
                file=sys.stderr,
            )
    if "pattern" in rule:
        from ..core.spec import check_pattern

        check_pattern(rule["pattern"], plain=True)  # names the bad pattern
    asked = "sparsity" in rule or "bits" in rule or "preset" in rule
    if not asked and ":" not in str(rule.get("pattern")):
        raise ValueError("say what to do: --preset, --sparsity, --pattern N:M, --bits or --recipe")
    d: dict[str, Any] = {
        "rules": [{"targets": args.targets or ["*"], **rule}],
        "calibration": {
            "mode": args.mode or "independent",
            "samples": 128 if args.samples is None else args.samples,
        },
    }
    if args.ignore:
        d["ignore"] = args.ignore
    if getattr(args, "allocation", None):
        d["allocation"] = args.allocation
    for k in ("bn_recalibration", "refit"):
        if getattr(args, k, False):
            d[k] = True
    from ..recipe import RecipeError

    try:
        return Recipe.from_dict(d)
    except RecipeError as e:  # name the flag the user typed, not the recipe field it filled
        key = e.path[-1] if e.path else None
        flag = {"sym": "--asym", "samples": "--samples", "mode": "--mode"}.get(
            str(key), f"--{str(key).replace('_', '-')}"
        )
        field = ".".join(str(p) for p in e.path).replace(".0.", "[0].")
        msg = str(e)
        if key is not None and field and msg.startswith(field):
            msg = flag + msg[len(field) :]
        raise ValueError(msg) from None


def cmd_compress(args: argparse.Namespace) -> int:
    args.executor_obj = _executor_from_args(args)  # validated before any work
    try:
        return _cmd_compress(args)
    finally:
        if args.executor_obj is not None:
            args.executor_obj.close()  # a Ray started for the run is stopped


def _cmd_compress(args: argparse.Namespace) -> int:
    from ..report import render_table
    from .runs import run_zoo
    from .text import print_metrics

    if getattr(args, "offload", None):
        from .offload_cmd import cmd_compress_offload

        if args.mode is None and not args.recipe:
            args.mode = "sequential"  # block by block is what offload does

        return cmd_compress_offload(args, _recipe_from_args(args))
    if getattr(args, "target", None):  # a global budget: non-uniform levels (optbrain.budget)
        return cmd_compress_budget(args)
    if getattr(args, "levels", None):
        raise ValueError("--levels is the level grid of a --target budget; give --target too")
    from .sources import is_own_model

    if is_own_model(args.model):
        from .own_cmd import cmd_compress_own

        return cmd_compress_own(args, _recipe_from_args(args))
    if getattr(args, "calibration", None):
        raise ValueError("--calibration is for your own model; zoo models bring their data")
    recipe = _recipe_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / args.model
    check_out(out)
    _, report = run_zoo(
        args.model, recipe, out, quiet=args.quiet, limit=args.limit, executor=args.executor_obj
    )
    print(render_table(report))
    print_metrics(report)
    print(f"\nrun written to {out}/ (report: {out / 'report.html'})")
    return _nothing_compressed(report)


def _executor_from_args(args: argparse.Namespace) -> Any:
    """``--executor`` / ``--ray-address`` / ``--ray-workers`` as an executor (None: local);
    an unknown combination or Ray not installed is an error now, before any work."""
    name = getattr(args, "executor", None) or "local"
    address, workers = getattr(args, "ray_address", None), getattr(args, "ray_workers", None)
    if name == "local" and (address is not None or workers is not None):
        raise ValueError("--ray-address / --ray-workers need --executor ray")
    if name == "local":
        return None
    from ..pipeline.executor import make_executor

    return make_executor(name, address=address, workers=workers)


def _nothing_compressed(report: Any) -> int:
    """0 when some layer was compressed, else 1 with the reasons on stderr."""
    if any(r.compressed for r in report.layers):
        return 0
    why = sorted({f"{r.name}: {r.reason}" for r in report.layers if r.reason})
    print(
        "optbrain compress: error: no layer was compressed"
        + (":\n  " + "\n  ".join(why[:10]) if why else " (no layer matched the targets)"),
        file=sys.stderr,
    )
    return 1


def cmd_compress_budget(args: argparse.Namespace) -> int:
    """``optbrain compress --model M --target T [--db DIR]``: the budget path of the CLI."""
    from .runs import run_zoo_budget
    from .text import allocation_table, print_metrics

    clash = [
        f"--{k.replace('_', '-')}"
        for k in (
            "recipe", "method", "preset", "sparsity", "pattern", "bits", "group_size", "targets",
            "ignore",
        )
        if getattr(args, k, None) is not None
    ]  # fmt: skip
    if getattr(args, "mode", None) == "sequential":
        clash.append("--mode sequential (the database is built in independent mode)")
    if clash:
        raise ValueError(
            f"--target chooses the levels per layer itself; it cannot be combined with {clash}"
        )
    out = Path(args.out) if args.out else Path("runs") / args.model
    db = Path(args.db) if getattr(args, "db", None) else None
    check_out(out, db)
    from ..core.spec import DEFAULT_DAMP

    _, report = run_zoo_budget(
        args.model,
        args.target,
        out,
        db_dir=db,
        samples=128 if getattr(args, "samples", None) is None else args.samples,
        quiet=args.quiet,
        limit=args.limit,
        damp=DEFAULT_DAMP if getattr(args, "damp", None) is None else args.damp,
        sym=not getattr(args, "asym", False),
        levels=_levels_from_args(getattr(args, "levels", None)),
        bn_recalibration=bool(getattr(args, "bn_recalibration", False)),
        refit=bool(getattr(args, "refit", False)),
        executor=getattr(args, "executor_obj", None),
    )
    print(allocation_table(report))
    print_metrics(report)
    print(f"\nrun written to {out}/ (report: {out / 'report.html'})")
    return _nothing_compressed(report)


def _levels_from_args(levels: list[str] | None) -> list[Any] | None:
    """``--levels``: None, ``structured`` / ``default`` (the grids) or level ids (validated)."""
    from ..budget.levels import Level, default_levels, structured_levels

    if not levels:
        return None
    grids = {"structured": structured_levels, "default": default_levels}
    out: list[Any] = []
    for item in levels:
        for part in item.split(","):
            if part.strip().lower() in grids:
                out += grids[part.strip().lower()]()
            elif part.strip():
                out.append(Level.parse(part))
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from ..io import load
    from . import zoo
    from .sources import is_own_model

    if is_own_model(args.model):
        from .own_cmd import cmd_eval_own

        return cmd_eval_own(args)
    entry = zoo.get(args.model)
    dense = entry.load()
    metrics = {"dense": entry.evaluate(dense, limit=args.limit)}
    if args.compressed:
        import copy

        model = load(copy.deepcopy(dense), args.compressed)
        metrics["compressed"] = entry.evaluate(model, dense=dense, limit=args.limit)
    if args.compressed or args.costs:
        from ..pipeline.cost import compare_costs, model_costs
        from .runs import example_input

        example = example_input(entry.calibration(1, 0)[0], entry.inputs)
        if args.compressed:  # dense and compressed calls alternated
            dc, cc = compare_costs(dense, model, example)
            metrics["dense"].update(dc)
            metrics["compressed"].update(cc)
        else:
            metrics["dense"].update(model_costs(dense, example))
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        from .text import eval_table

        print(eval_table(metrics))
        if entry.notes:
            print(f"\nnote: {entry.notes}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import Report, render_table

    run = Path(args.run_dir)
    path = run / "report.json" if run.is_dir() else run
    if not path.is_file():
        raise ValueError(
            f"{path} not found: pass a run directory written by "
            "'optbrain compress' (or a report.json)"
        )
    report = Report.load(path)
    html = Path(args.html) if args.html else path.with_name("report.html")
    report.to_html(html)
    if not args.quiet:
        from .deploy_text import deployment_table
        from .text import print_metrics

        print(render_table(report))
        print_metrics(report)
        if deployment_table(report):
            print("\n" + deployment_table(report))
    print(f"\nHTML report: {html.resolve()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=Path(args.out), quiet=args.quiet)


def cmd_models(args: argparse.Namespace) -> int:
    from . import zoo

    for name in zoo.names():
        e = zoo.get(name)
        print(f"{name:20s} {e.description}" + (f"  [{e.notes}]" if e.notes else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .compress_args import add_compress_args, positive_int
    from .own_cmd import add_source_flags

    p = argparse.ArgumentParser(
        prog="optbrain",
        description="Post-training pruning and quantization with the Optimal Brain family "
        "(ExactOBS, OBQ, OBC, GPTQ, SparseGPT) and baselines.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compress",
        help="compress a zoo model or your own (HF directory, module:factory) into a run dir",
    )
    add_compress_args(c)
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser(
        "eval", help="print a model's metrics (zoo or your own), dense and compressed"
    )
    e.add_argument("--model", required=True, help="zoo name, HF directory or module:factory")
    e.add_argument("--data", help="evaluation data for your own model (as --calibration)")
    e.add_argument("--quiet", action="store_true", help="no progress line")
    e.add_argument("--verbose", action="store_true", help="progress lines also in logs")
    add_source_flags(e, data_flag=False)
    e.add_argument("--compressed", metavar="RUN_DIR", help="a run directory to evaluate")
    e.add_argument("--limit", type=positive_int, help="evaluate on the first N examples only")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument(
        "--costs",
        action="store_true",
        help="also measure parameters, MACs and torch latency (always with --compressed)",
    )
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="render a run's report as a table and an HTML page")
    r.add_argument("run_dir", help="run directory (or report.json)")
    r.add_argument("--html", help="where to write the HTML (default: RUN_DIR/report.html)")
    r.add_argument("--quiet", action="store_true", help="only write the HTML")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="train a digits CNN, compress it with OBC and baselines")
    d.add_argument("--out", default="runs/demo", help="where to write the runs")
    d.add_argument("--quiet", action="store_true", help="no progress lines")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="list the zoo models")
    m.set_defaults(func=cmd_models)

    from .deploy import add_parsers

    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``optbrain`` entry point (console script and ``python -m optbrain``)."""
    # OpenMP threads that spin while waiting make small tensor ops 10-100x slower whenever
    # another process competes for the cores (shared machines, CI); passive waiting costs little
    # on an idle machine. Set here, in the entry point, before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        parser = build_parser()  # imports torch: seconds, and Ctrl-C may come meanwhile
    except KeyboardInterrupt:
        print("\noptbrain: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    from ..pipeline.data import CalibrationError

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, CalibrationError) as e:
        print(f"optbrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: the message, not a traceback
        print(f"optbrain {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\noptbrain {args.command}: interrupted; {_after_interrupt(args)}", file=sys.stderr)
        return 130


def _after_interrupt(args: argparse.Namespace) -> str:
    """What a rerun of the interrupted command does: compress keeps its finished work
    (``--offload``: the blocks; ``--target``: the layer database; else the journal of solved
    layers in the run directory); other commands write nothing until they finish."""
    if args.command == "compress":
        return "rerun the same command to resume (work finished so far is kept)"
    return "nothing was written"


if __name__ == "__main__":
    sys.exit(main())
