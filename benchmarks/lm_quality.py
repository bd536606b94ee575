"""Language-model quality at every budget, every method side by side, with wall times.

    python benchmarks/lm_quality.py --models smollm2-135m --budgets 50% --methods wanda sparsegpt
    python benchmarks/lm_quality.py --models minilm --budgets 50% --methods sparsegpt obc \\
        sparsegpt+dense

Models: smollm2-135m (perplexity on the zoo's held-out Wikipedia windows and on a second text,
gensim's ``lee_background.cor`` news text: the first ``--windows`` windows of 512 tokens) and minilm
(Lee-50 Pearson, WordSim353, SimLex999). Budgets: 50%, 60%, 2:4, 4-bit, 3-bit, 2:4+4-bit (per
output channel unless ``--group-size``; symmetric unless ``--asym``). Methods: magnitude, wanda,
sparsegpt, gptq, obc, auto;
``METHOD+dense`` runs sequential mode with dense targets (``calibration.targets: dense``),
``METHOD+indep`` independent mode (every layer's H from the dense model, one pass),
``METHOD+owl`` OWL's non-uniform sparsity per block (``allocation: owl``), ``METHOD+dp`` the
budget DP's sparsity per layer (``optbrain.budget.nonuniform.dp_sparsities``: a database of
SparseGPT levels s ± 0.1, ± 0.2 with model-level errors on 16 samples, then the recipe run as
usual; its time is included in the cell's), ``METHOD+refit`` every layer's kept weights refitted
to the dense outputs after the solvers (recipe ``refit: true``, ``optbrain.refit``); they combine.
Calibration: the zoo entry's (smollm2: sequential, 128 × 128 tokens; minilm: its default);
``--samples N`` changes the number of samples (smollm2: windows of 128 tokens), ``--damp`` the
relative damping of every layer's H, ``--calib-len L`` (smollm2) the calibration windows' length.
SmolLM2's weights sit on a 4-bit grid in blocks of 32 (GGUF Q4_1): 4-bit group-32 results are
flattering. Each cell: the metric(s) and the compression wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/__init__.py

import torch  # noqa: E402
from accuracy import BUDGETS, applicable, parse_options  # noqa: E402  (benchmarks/ is on sys.path)

from optbrain.app import zoo  # noqa: E402
from optbrain.app.runs import run_zoo  # noqa: E402
from optbrain.budget.nonuniform import dp_sparsities, with_sparsities  # noqa: E402

_ALL = {**BUDGETS, "60%": {"sparsity": 0.6}}  # accuracy.py's budgets, with 60%
BUDGETS = {k: _ALL[k] for k in ("50%", "60%", "2:4", "4-bit", "3-bit", "2:4+4-bit")}
METHODS = ["magnitude", "wanda", "sparsegpt", "gptq", "obc"]


@torch.no_grad()
def text_perplexity(model: torch.nn.Module, path: str, windows: int, seq: int = 512) -> float:
    """Perplexity of a causal LM on the first ``windows`` non-overlapping windows of a text."""
    from optbrain.app.zoo import smollm

    ids = smollm.tokenizer()(open(path, encoding="utf-8").read(), add_special_tokens=False)
    ids = torch.tensor(ids["input_ids"])
    k = min(windows, len(ids) // seq)
    ids = ids[: k * seq].view(k, seq)
    nll, count = 0.0, 0
    for x in ids:
        logits = model(input_ids=x[None], use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum"))
        count += len(x) - 1
    return math.exp(nll / count)


def second_text() -> str:
    from optbrain.app.zoo._text import gensim_test_data

    return str(gensim_test_data("smollm2-135m") / "lee_background.cor")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm"])
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--group-size", type=int, dest="group_size")
    ap.add_argument("--asym", action="store_true", help="asymmetric grids (sym: false)")
    ap.add_argument("--samples", type=int, help="calibration samples (default: the entry's)")
    ap.add_argument(
        "--calib-len", type=int, help="smollm2: calibration window length (default 128 tokens)"
    )
    ap.add_argument("--damp", type=float, help="relative damping of H (default 0.01)")
    ap.add_argument("--windows", type=int, default=16, help="windows of the second text")
    ap.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE")
    ap.add_argument("--json", help="append every cell as a JSON line here")
    ap.add_argument("--db-dir", help="+dp: keep the budget databases here (reused by reruns)")
    args = ap.parse_args()
    options = parse_options(args.option)
    for name in args.models:
        entry = zoo.get(name)
        dense = entry.load()
        dm = entry.evaluate(dense)
        lm = name.startswith("smollm")
        if lm:
            dm["text2_perplexity"] = text_perplexity(dense, second_text(), args.windows)
        print(
            f"### {name} dense: {json.dumps({k: round(v, 4) for k, v in dm.items()})}", flush=True
        )
        for budget in args.budgets:
            for spec in args.methods:
                method, _, variant = spec.partition("+")
                settings = dict(BUDGETS[budget])
                if not applicable(method, settings):
                    continue
                if "bits" in settings and args.group_size:
                    settings["group_size"] = args.group_size
                if "bits" in settings and args.asym:
                    settings["sym"] = False
                rule = {"method": method, **settings}
                if args.damp is not None:
                    rule["damp"] = args.damp
                if method in options:
                    rule["options"] = options[method]
                calib = dict(entry.recipe.get("calibration", {}))
                if args.samples:
                    calib["samples"] = args.samples
                variants = set(variant.split("+")) - {""}
                if variants - {"dense", "indep", "owl", "dp", "refit"}:
                    raise SystemExit(
                        f"unknown variant in {spec!r}: use +dense, +indep, +owl, +dp, +refit"
                    )
                if "dense" in variants:
                    calib.update(mode="sequential", targets="dense")
                if "indep" in variants:
                    calib.update(mode="independent")
                    calib.pop("targets", None)
                recipe: dict = {"rules": [rule], "calibration": calib}
                if "refit" in variants:  # the fixed-mask refit to the dense outputs (#16)
                    recipe["refit"] = True
                if "owl" in variants:  # OWL's per-block sparsities (pipeline/owl.py)
                    recipe["allocation"] = "owl"
                t_dp = 0.0
                if "dp" in variants:  # the budget DP's per-layer sparsities (budget/nonuniform)
                    t_dp = time.perf_counter()
                    per = dp_sparsities(
                        dense,
                        entry.calibration(calib.get("samples", 128), 0),
                        settings["sparsity"],
                        db_dir=args.db_dir and f"{args.db_dir}/{name}-{budget.strip('%')}",
                        inputs=entry.inputs,
                        quiet=False,
                    )
                    recipe = with_sparsities(recipe, per).to_dict()
                    t_dp = time.perf_counter() - t_dp
                t0 = time.perf_counter()
                batches = None
                if args.calib_len and lm:
                    n = calib.get("samples", 128)
                    batches = entry.calibration(n, 0, length=args.calib_len)  # type: ignore[call-arg]
                model, report = run_zoo(
                    name, recipe, None, quiet=True, dense=dense, dense_metrics=dm, batches=batches
                )
                metrics = {
                    k: v["compressed"] for k, v in report.metrics.items() if "compressed" in v
                }
                if lm:
                    metrics["text2_perplexity"] = text_perplexity(
                        model, second_text(), args.windows
                    )
                secs = report.metadata["compress_seconds"]
                used = sorted({r.method for r in report.layers if r.status == "compressed"})
                cell = {
                    "model": name,
                    "budget": budget,
                    "method": spec,
                    "seconds": round(secs + t_dp, 1),
                    "wall_seconds": round(time.perf_counter() - t0, 1),
                    "solvers": used,
                    **{k: round(v, 4) for k, v in metrics.items()},
                }
                print(json.dumps(cell), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(cell) + "\n")
                del model


if __name__ == "__main__":
    sys.exit(main())
