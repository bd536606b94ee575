"""Tests for optbrain.report: lossless JSON, CSV / markdown / text / HTML renderings, summary
arithmetic on a hand-made report, and the peak-memory tracker."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import torch

from optbrain.core.result import LayerResult
from optbrain.report import (
    CSV_COLUMNS,
    LayerRecord,
    Report,
    peak_memory_tracker,
    render_table,
)

NAN, INF = float("nan"), float("inf")


def make_report() -> Report:
    layers = [
        LayerRecord(
            "enc.0.q",
            "Linear",
            (10, 10),
            method="obc",
            tokens=128,
            damping=0.0123456789,
            sparsity=0.5,
            bits=4,
            pattern="unstructured",
            predicted_loss=1.5e-3,
            measured_loss=1.75e-3,
            seconds=0.25,
            peak_memory_mb=12.5,
            info={"block_size": 128, "cond": NAN},
        ),
        LayerRecord(
            "a<b&c",
            "Conv2d",
            (20, 2, 5),  # 200 weights: one group's slice of a grouped conv
            group=1,
            method="auto→sparsegpt",
            tokens=64,
            damping=0.5,
            fallback="eig",
            sparsity=0.25,
            bits=8,
            pattern="2:4",
            group_size=16,
            predicted_loss=NAN,
            seconds=1.5,
        ),
        LayerRecord(
            "head, final",
            "Linear",
            (5, 20),
            status="skipped",
            reason='fewer than 16 tokens, "dead" inputs',
        ),
        LayerRecord(
            "tail",
            "Linear",
            (4, 4),
            method="gptq",
            bits=3,
            predicted_loss=INF,
            measured_loss=-INF,
            seconds=0.5,
            peak_memory_mb=40.0,
        ),
    ]
    return Report(
        layers,
        model="tiny<model>",
        recipe={"sparsity": 0.5, "targets": ["Linear", "Conv2d"], "damp": 0.01},
        metrics={"accuracy": {"dense": 0.9, "compressed": 0.875}, "ppl": 12.5},
        metadata={"wall_seconds": 3.25, "calibration_samples": 128, "odd": [INF, -INF, NAN]},
    )


# --------------------------------------------------------------------------- JSON


def _no_bare_constants(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name} in output")


def test_json_round_trip_is_lossless(tmp_path):
    r = make_report()
    text = r.to_json()
    d = json.loads(text, parse_constant=_no_bare_constants)  # strict JSON: no bare NaN
    back = Report.from_dict(d)
    assert back == r
    assert math.isnan(back.layers[1].predicted_loss)
    assert back.layers[3].predicted_loss == INF and back.layers[3].measured_loss == -INF
    assert back.layers[0].measured_loss == 1.75e-3 and back.layers[1].measured_loss is None
    assert back.layers[2].bits is None and back.layers[2].reason == r.layers[2].reason
    assert back.layers[1].shape == (20, 2, 5) and isinstance(back.layers[1].shape, tuple)
    assert math.isnan(back.layers[0].info["cond"]) and math.isnan(back.metadata["odd"][2])
    # the typed fields use plain strings, the free-form dicts a tagged object
    assert d["layers"][1]["predicted_loss"] == "NaN"
    assert d["layers"][3]["measured_loss"] == "-Infinity"
    assert d["metadata"]["odd"][0] == {"$float": "Infinity"}

    path = tmp_path / "report.json"
    r.to_json(path)
    assert Report.load(path) == r


def test_equality_sees_differences():
    r, other = make_report(), make_report()
    assert r == other
    other.layers[0].sparsity = 0.5000001
    assert r != other
    other = make_report()
    other.layers[1].predicted_loss = 0.0  # NaN vs number
    assert r != other
    other = make_report()
    other.metadata["odd"][2] = 1.0
    assert r != other


def test_free_form_values_are_normalised_or_rejected():
    r = Report(metadata={"shape": (3, 4), "t": torch.tensor(2.5)})
    assert r.metadata == {"shape": [3, 4], "t": 2.5}
    assert Report.from_json(r.to_json()) == r
    words = Report(metadata={"s": "NaN", "t": "Infinity"})  # strings stay strings
    assert Report.from_json(words.to_json()).metadata == {"s": "NaN", "t": "Infinity"}
    with pytest.raises(TypeError, match="metadata"):
        Report(metadata={"bad": {1, 2}})


def test_from_dict_rejects_bad_input():
    d = make_report().to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        Report.from_dict({**d, "extra": 1})
    with pytest.raises(ValueError, match="newer"):
        Report.from_dict({**d, "version": 99})
    bad = json.loads(json.dumps(d))
    bad["layers"][0]["sparsity"] = "half"
    with pytest.raises(ValueError, match="sparsity"):
        Report.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["layers"][0]["colour"] = "red"
    with pytest.raises(ValueError, match="colour"):
        Report.from_dict(bad)
    with pytest.raises(ValueError, match="status"):
        LayerRecord("x", status="done")


# --------------------------------------------------------------------------- CSV


def _num(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def test_csv_one_row_per_layer_with_values(tmp_path):
    r = make_report()
    text = r.to_csv(tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text(encoding="utf-8") == text
    rows = list(csv.reader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert "info" not in rows[0] and len(rows) == 1 + len(r.layers)
    for row, rec in zip(rows[1:], r.layers, strict=True):
        d = dict(zip(CSV_COLUMNS, row, strict=True))
        assert d["name"] == rec.name and d["status"] == rec.status
        assert d["reason"] == (rec.reason or "")
        assert tuple(int(s) for s in d["shape"].split("x")) == rec.shape
        for f in ("sparsity", "damping", "seconds", "predicted_loss", "measured_loss"):
            got, want = _num(d[f]), getattr(rec, f)
            if want is None:
                assert got is None, f
            elif math.isnan(want):
                assert math.isnan(got), f
            else:
                assert got == want, f  # repr round-trips exactly
        assert _num(d["peak_memory_mb"]) == rec.peak_memory_mb
        assert (int(d["bits"]) if d["bits"] else None) == rec.bits
        assert (int(d["group"]) if d["group"] else None) == rec.group
        assert int(d["tokens"]) == rec.tokens
    assert float(rows[4][CSV_COLUMNS.index("predicted_loss")]) == INF


# --------------------------------------------------------------------------- markdown / text


def test_markdown_lists_layers_and_skip_reason():
    r = make_report()
    md = r.to_markdown()
    for rec in r.layers:
        assert f"`{rec.name}" in md  # names are code spans (grouped ones carry [gN])
    assert "`a<b&c[g1]`" in md
    assert "## Skipped layers" in md
    assert '- `head, final`: fewer than 16 tokens, "dead" inputs' in md
    assert "- `a<b&c[g1]`: eig" in md  # fallbacks are listed too
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]
    header = next(ln for ln in table if ln.startswith("| # |"))
    body = table[table.index(header) + 1 :]
    assert len(body) == len(r.layers)
    cells = lambda ln: len(re.split(r"(?<!\\)\|", ln))  # noqa: E731
    assert all(cells(ln) == cells(header) for ln in body)


def test_markdown_escapes_pipes_in_names():
    r = Report([LayerRecord("x|y", "Linear", (2, 2)), LayerRecord("z", "Linear", (2, 2))])
    md = r.to_markdown()
    assert "`x\\|y`" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| 0 ") or ln.startswith("| 1 ")]
    assert len(rows) == 2
    counts = {len(re.split(r"(?<!\\)\|", ln)) for ln in rows}
    assert len(counts) == 1


def test_render_table_is_aligned():
    r = make_report()
    text = render_table(r)
    lines = text.splitlines()
    header, rule = lines[0], lines[1]
    rows = lines[2 : 2 + len(r.layers)]
    for rec, ln in zip(r.layers, rows, strict=True):
        assert rec.label in ln
    # every column starts where the header's dash run starts
    starts = [m.start() for m in re.finditer(r"-+", rule)]
    status_col = starts[-1]
    assert header[status_col:].startswith("status")
    for ln in rows:
        assert ln[status_col:].startswith(("compressed", "skipped"))
        assert ln[status_col - 2 : status_col] == "  "
    assert "skipped: fewer than 16 tokens" in text
    assert "overall sparsity: 24.04%" in text  # 100 / 416
    assert "accuracy: 0.9 → 0.875" in text


# --------------------------------------------------------------------------- HTML

_VOID = {"meta", "input", "br", "hr", "img", "link", "col", "wbr", "area", "base", "source"}


class _StrictParser(HTMLParser):
    """Records nesting errors: every non-void element must be closed, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def _parse(page: str) -> _StrictParser:
    p = _StrictParser()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, f"unclosed: {p.stack}"
    return p


def test_html_is_well_formed_self_contained_and_escaped(tmp_path):
    r = make_report()
    page = r.to_html(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == page
    p = _parse(page)
    assert page.startswith("<!DOCTYPE html>")
    # four plots: loss, sparsity, bits, time — one <svg> each
    assert page.count("<svg") == 4
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        ET.fromstring(svg)  # each plot is well-formed XML too
    # no network: no URLs, no external resources
    assert "http://" not in page and "https://" not in page
    assert not any("src" in a or "href" in a for _, a in p.tags)
    assert not any(t == "link" for t, _ in p.tags)
    # text is escaped: the raw name never appears, its escaped form does
    assert "a<b&c" not in page and "tiny<model>" not in page
    assert "a&lt;b&amp;c" in page and "tiny&lt;model&gt;" in page
    for rec in r.layers:
        assert f"<code>{html.escape(rec.label)}</code>" in page
    assert "head, final" in page and "fewer than 16 tokens" in page
    assert page.count('class="layers"') == 1
    assert len(re.findall(r"<tr( class=\"skipped\")?><td class=\"n\"", page)) == len(r.layers)


def test_html_loss_scale_option():
    r = make_report()
    on = r.to_html(log_loss=True)
    off = r.to_html(log_loss=False)
    assert re.search(r'<input[^>]*id="logloss"[^>]*checked', on)
    assert not re.search(r'<input[^>]*id="logloss"[^>]*checked', off)
    for page in (on, off):  # both scales live in the one loss <svg>
        assert page.count('class="scale-log"') == 1 and page.count('class="scale-lin"') == 1
    # auto: losses spanning > 2 decades start on the log scale
    spread = Report(
        [LayerRecord(f"l{i}", "Linear", (2, 2), predicted_loss=10.0**-i) for i in range(5)]
    )
    assert re.search(r'id="logloss"[^>]*checked', spread.to_html())
    flat = Report(
        [LayerRecord(f"l{i}", "Linear", (2, 2), predicted_loss=1.0 + i) for i in range(5)]
    )
    assert not re.search(r'id="logloss"[^>]*checked', flat.to_html())


def test_html_bars_scale_with_values():
    # sparsity bars: height proportional to value on a 0–100 % axis
    r = Report(
        [
            LayerRecord("a", "Linear", (4, 4), sparsity=0.25),
            LayerRecord("b", "Linear", (4, 4), sparsity=0.75),
        ]
    )
    page = r.to_html()
    svg = re.findall(r"<svg.*?</svg>", page, re.S)[1]
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)" fill="#3b6fc4"', svg)]
    assert len(heights) == 2
    assert heights[1] == pytest.approx(3 * heights[0], rel=1e-2)


def test_html_many_layers_and_empty_report():
    many = Report([LayerRecord(f"blocks.{i}.mlp", "Linear", (8, 8), seconds=i) for i in range(150)])
    _parse(many.to_html())
    empty = Report()
    page = empty.to_html()
    _parse(page)
    assert "<svg" not in page
    assert empty.summary()["sparsity"] == 0.0


# --------------------------------------------------------------------------- summary


def test_summary_by_hand():
    s = make_report().summary()
    # numel: 100 (0.5), 200 (0.25), skipped 100, 16 (0.0) → zeros = 50 + 50 = 100
    assert (s["layers"], s["compressed"], s["skipped"], s["quantized"]) == (4, 3, 1, 3)
    assert s["params"] == 416 and s["params_compressed"] == 316
    assert s["sparsity"] == pytest.approx(100 / 416)
    assert s["sparsity_compressed"] == pytest.approx(100 / 316)
    assert s["mean_bits"] == pytest.approx((4 * 100 + 8 * 200 + 3 * 16) / 316)
    assert math.isnan(s["predicted_loss"])  # a NaN layer loss is not hidden
    assert s["measured_loss"] is None  # one compressed layer has none
    assert s["seconds"] == pytest.approx(0.25 + 1.5 + 0.5)
    assert s["peak_memory_mb"] == 40.0
    assert s["fallbacks"] == 1
    assert s["methods"] == {"obc": 1, "auto→sparsegpt": 1, "gptq": 1}


def test_summary_finite_totals():
    r = Report(
        [
            LayerRecord("a", "Linear", (3, 4), sparsity=0.5, predicted_loss=1.0, measured_loss=2),
            LayerRecord("b", "Linear", (6, 2), sparsity=0.0, predicted_loss=0.5, measured_loss=1),
        ]
    )
    s = r.summary()
    assert s["sparsity"] == pytest.approx(6 / 24)
    assert s["predicted_loss"] == 1.5 and s["measured_loss"] == 3.0
    assert s["mean_bits"] is None and s["peak_memory_mb"] is None


# --------------------------------------------------------------------------- records from results


def test_record_from_layer_result():
    res = LayerResult(
        weight=torch.zeros(3, 8),
        mask=None,
        loss=0.125,
        method="sparsegpt",
        sparsity=0.5,
        damping=0.03,
        fallback="damp",
        seconds=0.75,
        info={"pattern": "2:4", "scope": "row", "tensor": torch.ones(3)},
    )
    rec = LayerRecord.from_result(res, name="fc", type="Linear", tokens=256, measured_loss=0.13)
    assert rec.shape == (3, 8) and rec.pattern == "2:4" and rec.method == "sparsegpt"
    assert (rec.predicted_loss, rec.damping, rec.fallback) == (0.125, 0.03, "damp")
    assert rec.info == {"scope": "row"}  # tensors dropped, pattern promoted to a field
    assert Report.from_json(Report([rec]).to_json()).layers[0] == rec


# --------------------------------------------------------------------------- peak memory


_PEAK_SCENARIO = """
import json, time, torch
from optbrain.report.memory import SAMPLE_SECONDS, peak_memory_tracker
big, small = 192, 48  # MB; both above glibc's mmap threshold (32 MB at most), so RSS tracks them
hold = 20 * SAMPLE_SECONDS  # the sampler sees a peak held for several periods
with peak_memory_tracker() as outer:
    x = torch.ones(big * 1024 * 1024 // 4)  # written: pages are resident
    time.sleep(hold)
    del x  # > 32 MB: glibc returns it to the OS, RSS drops again
    with peak_memory_tracker("cpu") as inner:
        y = torch.ones(small * 1024 * 1024 // 4)
        time.sleep(hold)
        del y
print(json.dumps([vars(inner), vars(outer)]))
"""


def test_peak_memory_tracker_cpu():
    # in a fresh process: after many tests the allocator keeps freed memory (and libraries may
    # move malloc's mmap threshold), so RSS would not follow these allocations here
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCENARIO], capture_output=True, text=True, check=True
    )
    inner, outer = (SimpleNamespace(**d) for d in json.loads(out.stdout))
    big, small = 192, 48
    assert inner.mb is not None and inner.mb >= 0 and inner.peak_mb >= inner.start_mb
    assert inner.method == "sampled" and outer.method == "sampled"
    assert 0.9 * small <= inner.mb < 0.9 * big  # inner peak excludes the earlier big one
    # ... and the inner tracker did not lose the outer peak (far above the inner one; on a
    # loaded machine the sampled RSS was seen at 0.76 of the big array, hence not 0.9)
    assert outer.mb >= 0.6 * big > 2 * small


def test_peak_memory_tracker_fills_on_exception():
    with pytest.raises(RuntimeError):
        with peak_memory_tracker() as mem:
            raise RuntimeError("boom")
    assert mem.peak_mb is not None and mem.method == "sampled"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_tracker_cuda():
    with peak_memory_tracker("cuda") as mem:
        x = torch.ones(32 * 1024 * 1024 // 4, device="cuda")
        del x
    assert mem.method == "cuda"
    assert mem.mb == pytest.approx(32, abs=1)


# ------------------------------------------------- wall time, norm layers, long labels ----
def test_total_time_is_the_runs_wall_time_and_solving_is_listed_beside_it():
    r = make_report()
    assert r.summary()["seconds"] == pytest.approx(2.25)  # no wall time recorded: Σ layers
    r.metadata["seconds"] = 7.5  # compress records its wall time (forwards + solves)
    s = r.summary()
    assert s["seconds"] == 7.5 and s["solve_seconds"] == pytest.approx(2.25)
    text = render_table(r)
    assert "total time (s): 7.500" in text and "of which solving (s): 2.250" in text


def test_charts_fold_out_norm_layers_and_keep_long_labels_readable():
    from optbrain.report.charts import layer_plots, short_label

    r = make_report()
    r.layers.append(LayerRecord("transformer.h.0.ln_1", "LayerNorm", (32,), status="skipped",
                                reason="unsupported"))  # fmt: skip
    r.layers.append(LayerRecord("model.layers.0.input_layernorm", "LlamaRMSNorm", (32,),
                                status="skipped", reason="unsupported"))  # fmt: skip
    plots = layer_plots(r, None)
    svg = plots.loss
    assert "ln_1" not in svg and "input_layernorm" not in svg and "enc.0.q" in svg
    assert plots.time.count('class="xl"') == 4  # the four non-norm layers
    assert short_label("model.layers.11.self_attn.q_proj") == "…layers.11.self_attn.q_proj"
    assert short_label("enc.0.q") == "enc.0.q"
    long = "a" * 40
    assert short_label(long) == "…" + "a" * 27 and len(short_label(long)) == 28
