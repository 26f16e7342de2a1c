"""HTML report and JSON summary of one or more runs of a benchmark (``duetgen eval report``).

    duetgen eval report runs/cooking-a runs/cooking-b --out report.html   # also writes report.json

The page holds, per benchmark: the metric table (mean and bootstrap 95% interval per run, the
paper's Table 1-3 layout), a bar chart with the intervals as error bars, the count of every
non-scored state (judge failures, missing predictions, answers without images), the judge's
provenance (model, endpoint, template versions and hashes, image preprocessing, k), per-category
tables, and a gallery: each item's input next to every run's output, with that item's scores.

Design choices:
- Summaries are recomputed from ``results.jsonl`` with the run's bootstrap seed, so a report of a
  run that was killed half-way shows what was judged so far (and says how much that is).
- One self-contained file: the chart (matplotlib, Agg canvas, no pyplot global state) and gallery
  thumbnails (longest side 256 px) are embedded as data URIs; records render through
  ``duetgen.data.view`` (every string escaped).
- Several runs must be of the same benchmark version; comparing across versions is refused.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from pathlib import Path

from duetgen.data.dataset import atomic_write_bytes
from duetgen.data.record import Message, Record, RecordError
from duetgen.data.view import esc, page_html, render_record_html
from duetgen.eval.benchmarks import Benchmark, BenchmarkError, load_benchmark
from duetgen.eval.harness import (BENCHMARK_COPY, RESULTS_FILE, RUN_FILE, HarnessError, RunConfig, build_items,
                                  build_summary, read_results)
from duetgen.eval.judge import load_template, score_range
from duetgen.eval.metrics import JUDGE_FAILURES, N_BOOT, SEED

THUMB_SIDE = 256
REPORT_CSS = """
table.metrics { border-collapse:collapse; margin:10px 0 18px; background:#fff; font-size:14px; }
table.metrics th, table.metrics td { border:1px solid #e3e6ec; padding:5px 9px; text-align:right; vertical-align:top; }
table.metrics th:first-child, table.metrics td:first-child { text-align:left; }
table.metrics th { background:#f1f3f7; font-weight:600; }
.ci { display:block; color:#667085; font-size:12px; }
.bad { color:#b42318; }
.note { color:#667085; font-size:13px; }
h2.section { font-size:17px; margin:26px 0 6px; }
h3.cat { font-size:15px; margin:16px 0 4px; }
.gallery-row { display:grid; gap:12px; margin:14px 0; align-items:start; }
.gallery-row > div { min-width:0; }
.gallery-row article.record { margin:0; }
.gallery-row h4 { margin:0 0 4px; font-size:13px; }
.scores { font-size:12px; color:#344054; margin:4px 0; }
pre.prov { background:#f8f9fb; border:1px solid #e3e6ec; border-radius:8px; padding:8px; font-size:12px;
           white-space:pre-wrap; overflow-wrap:anywhere; }
"""


class ReportError(ValueError):
    """The run directories cannot be reported together (or are not runs). Names the directory."""


# ----------------------------------------------------------------------------- loading
def load_run(run_dir: str | os.PathLike) -> dict:
    """run.json, the results in order, the benchmark and the recomputed summary of one run."""
    d = Path(run_dir)
    try:
        run = json.loads((d / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ReportError(f"{d}: not a run directory ({RUN_FILE}: {e})") from None
    b = run.get("settings", {}).get("benchmark") if isinstance(run, dict) and isinstance(run.get("settings"), dict) else None
    if not (isinstance(b, dict) and all(isinstance(b.get(k), str) for k in ("name", "version", "sha256"))):
        raise ReportError(f"{d}: {RUN_FILE} does not name its benchmark (settings.benchmark: name, version, sha256)")
    copy = d / BENCHMARK_COPY  # a benchmark given as a file: the run keeps it
    if not copy.is_file() and (Path(b["name"]).name != b["name"] or b["name"].endswith(".json")):
        raise ReportError(f"{d}: {RUN_FILE} names the benchmark {b['name']!r} by path without keeping a copy")
    bench = load_benchmark(str(copy) if copy.is_file() else b["name"])
    if (bench.version, bench.sha256) != (b["version"], b["sha256"]):
        raise ReportError(f"{d}: run of {b['name']}@{b['version']} ({b['sha256'][:12]}), but the installed benchmark "
                          f"file is {bench.id} ({bench.sha256[:12]})")
    results = list(read_results(d / RESULTS_FILE).values())
    coverage = {"items_judged": len(results)}
    try:
        boot = run.get("bootstrap", {})
        summary = build_summary(bench, run, results, coverage, boot.get("n_boot", N_BOOT), boot.get("seed", SEED))
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a run folder handed in, edited by hand
        raise ReportError(f"{d}: {RUN_FILE} or {RESULTS_FILE} is not what `duetgen eval run` writes "
                          f"({type(e).__name__}: {e})") from None
    return {"dir": d, "run": run, "bench": bench, "results": results, "summary": summary}


def metric_scale(bench: Benchmark, name: str) -> tuple[float, float]:
    m = next(x for x in bench.metrics if x.name == name)
    if bench.kind in ("exact", "external"):
        return 0.0, 1.0
    if m.mean_of is not None or m.of is not None:
        scales = [metric_scale(bench, x) for x in (m.mean_of or m.of)]
        return min(s[0] for s in scales), max(s[1] for s in scales)
    t = load_template(bench.call(m.call).template)
    scales = [score_range(t, f) for f in (m.fields or [m.field])]
    return min(s[0] for s in scales), max(s[1] for s in scales)


# ----------------------------------------------------------------------------- pieces of the page
def _fmt(row: dict) -> str:
    if row["mean"] is None:
        return '<span class="bad">n/a</span><span class="ci">n = 0</span>'
    lo, hi = row["ci95"]
    return f'{row["mean"]:.2f}<span class="ci">[{lo:.2f}, {hi:.2f}] n={row["n"]}</span>'


def metric_table(runs: list[dict], metrics: list[str], pick=lambda s: s["metrics"]) -> str:
    head = "".join(f"<th>{esc(m)}</th>" for m in metrics)
    rows = []
    for r in runs:
        cells = "".join(f"<td>{_fmt(pick(r['summary'])[m])}</td>" for m in metrics)
        rows.append(f"<tr><td>{esc(r['run']['name'])}</td>{cells}</tr>")
    return f'<table class="metrics"><tr><th>run</th>{head}</tr>{"".join(rows)}</table>'


def state_table(runs: list[dict], metrics: list[str]) -> str:
    """Per run and metric: how many items were not scored, and why."""
    states = [*JUDGE_FAILURES, "no_image", "missing", "undefined", "bad_image", "not_applicable"]
    head = "".join(f"<th>{esc(m)}</th>" for m in metrics)
    rows = []
    for r in runs:
        cells = []
        for m in metrics:
            st = r["summary"]["metrics"][m]["states"]
            bad = [f"{s} {st[s]}" for s in states if st.get(s)]
            cells.append(f'<td>{"<br>".join(esc(b) for b in bad) if bad else "&ndash;"}</td>')
        req = r["summary"]["judge_requests"]
        req_txt = " · ".join(f"{k} {v}" for k, v in req.items())
        rows.append(f"<tr><td>{esc(r['run']['name'])}<span class='ci'>{esc(req_txt)}</span></td>{''.join(cells)}</tr>")
    return f'<table class="metrics"><tr><th>run (judge requests)</th>{head}</tr>{"".join(rows)}</table>'


def bar_chart_png(runs: list[dict], bench: Benchmark) -> bytes:
    """Grouped bars (one per run) of each metric's mean, with the 95% interval as error bars."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):  # a run or metric name is text, "$" and all
        return _bar_chart_png(runs, bench)


def _bar_chart_png(runs: list[dict], bench: Benchmark) -> bytes:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = bench.metric_names()
    fig = Figure(figsize=(max(5.0, 1.1 * len(metrics) + 1.5), 3.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(metrics))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        rows = [r["summary"]["metrics"][m] for m in metrics]
        means = np.array([math.nan if row["mean"] is None else row["mean"] for row in rows])
        err = np.array([[0, 0] if row["mean"] is None else [row["mean"] - row["ci95"][0], row["ci95"][1] - row["mean"]]
                        for row in rows]).T  # (2, M)
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=err, capsize=3, label=r["run"]["name"])
    lo = min(metric_scale(bench, m)[0] for m in metrics)
    hi = max(metric_scale(bench, m)[1] for m in metrics)
    ax.set_ylim(lo, hi + 0.04 * (hi - lo))  # a little headroom so an interval at the top stays visible
    ax.set_xticks(x, metrics)
    ax.set_ylabel("mean (95% CI)")
    ax.set_title(f"{bench.title} ({bench.id})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _thumb_src(source, record_id: str):
    """``image_src`` for render_record_html: a JPEG thumbnail of the checked image, as a data URI."""
    def src(path: str) -> str:
        im = source.open_image(path, record_id=record_id)
        im.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return src


def _scores_line(line: dict | None) -> str:
    if line is None:
        return '<div class="scores bad">not judged yet</div>'
    bits = []
    for name, v in line["metrics"].items():
        if v["state"] == "not_applicable":
            continue
        bits.append(f"{esc(name)} {v['value']:.2f}" if v["state"] == "ok" else
                    f'<span class="bad">{esc(name)} {esc(v["state"])}</span>')
    return f'<div class="scores">{" · ".join(bits)}</div>'


def gallery(runs: list[dict], limit: int) -> str:
    """Items side by side: the input, then each run's output with its scores (first ``limit`` items)."""
    if runs[0]["bench"].kind == "external" and runs[0]["run"]["inputs"].get("images") is None:
        return ('<p class="note">No gallery: the images were scored by the benchmark\'s own program, and the run '
                'was not told where they are (give <code>--images OUT</code>, the folder <code>eval generate</code> '
                'wrote, to <code>eval run</code>).</p>')
    items_per_run = []
    for r in runs:
        inp = r["run"]["inputs"]
        cfg = RunConfig(benchmark=r["bench"].path, pred=inp["pred"], out=str(r["dir"]), prompts=inp["prompts"],
                        images=inp["images"], truth=inp.get("truth"), task=inp.get("task"),
                        language=inp.get("language"))
        try:
            items, _ = build_items(r["bench"], cfg)
        except (RecordError, HarnessError, BenchmarkError, OSError) as e:
            return f'<p class="note">Gallery not shown: the inputs of run {esc(r["run"]["name"])} cannot be read ({esc(e)}).</p>'
        items_per_run.append({it.id: it for it in items})
    ids = [i for i in items_per_run[0] if all(i in m for m in items_per_run)][:limit]
    lines = [{ln["id"]: ln for ln in r["results"]} for r in runs]
    cols = f"grid-template-columns: repeat({len(runs) + 1}, minmax(0, 1fr));"
    out = []
    for i in ids:
        first = items_per_run[0][i]
        cells = []
        if first.sample is not None:
            req = Record(id=i, messages=first.sample.input, source="input", meta={"category": first.category})
            cells.append(f"<div><h4>input</h4>{render_record_html(req, _thumb_src(first.sample.input_images, i))}</div>")
        else:
            cells.append(f'<div><h4>input</h4><p class="note">{esc(i)}: no prediction in the first run</p></div>')
        for r, items, ln in zip(runs, items_per_run, lines):
            it = items[i]
            head = f"<h4>{esc(r['run']['name'])}</h4>{_scores_line(ln.get(i))}"
            if it.sample is None:
                cells.append(f'<div>{head}<p class="note">missing prediction</p></div>')
                continue
            if it.error is not None:
                cells.append(f'<div>{head}<p class="note bad">{esc(it.error)}</p></div>')
                continue
            ans = Record(id=i, messages=[Message("assistant", it.sample.output or [])], source=r["run"]["name"])
            cells.append(f"<div>{head}{render_record_html(ans, _thumb_src(it.sample.output_images, i))}</div>")
        out.append(f'<div class="gallery-row" style="{cols}">{"".join(cells)}</div>')
    return "\n".join(out) or '<p class="note">No item is present in every run.</p>'


def _prompt_source(r: dict) -> str:
    src = r["run"]["settings"].get("prompt_source") or {"source": "project templates"}
    if src["source"] == "official prompt file":
        return f"the benchmark's official prompt file {src['path']} (sha256 {src['sha256'][:16]}...), replies read by line"
    return "the project's templates (duetgen/eval/templates)"


def provenance_block(r: dict) -> str:
    s = r["run"]["settings"]
    inv = r["run"].get("invocations", [])
    info = {"judge": s["judge"] if s["judge"] is not None else "exact program (no MLLM judge)",
            "prompt_source": s.get("prompt_source"), "templates": s["templates"], "benchmark": s["benchmark"], "inputs": r["run"]["inputs"],
            "invocations": inv}
    return (f"<details><summary>{esc(r['run']['name'])}: judge and run settings</summary>"
            f'<pre class="prov">{esc(json.dumps(info, indent=1))}</pre></details>')


# ----------------------------------------------------------------------------- the report
def write_report(run_dirs: list[str | os.PathLike], out: str | os.PathLike, gallery_items: int = 12) -> tuple[Path, Path]:
    """Write ``out`` (HTML) and ``out`` with suffix .json (the summaries); return both paths."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    bench = runs[0]["bench"]
    for r in runs[1:]:
        if r["bench"].id != bench.id:
            raise ReportError(f"{r['dir']}: a run of {r['bench'].id}, the first run is of {bench.id}; report them separately")
    metrics = bench.metric_names()
    out = Path(out)
    if out.is_dir() or not out.name:
        raise ReportError(f"--out {str(out)!r} is a folder; give the HTML page's path, e.g. report.html")
    if out.suffix.lower() == ".json":  # the summary goes to out with .json: one path for both lost the page
        raise ReportError(f"--out {str(out)!r}: give the HTML page's path (report.html); the JSON goes beside it")
    for r in runs:  # (--out RUN/summary.html replaced the run's own summary.json)
        if out.resolve().parent == Path(r["dir"]).resolve():
            raise ReportError(f"--out {str(out)!r} lies in the run directory {str(r['dir'])!r}, whose files it could "
                              "replace; write the report beside the runs")
    out.parent.mkdir(parents=True, exist_ok=True)

    body = [f'<p>{esc(bench.description)}<br><span class="note">Source: {esc(bench.source)}. Benchmark file '
            f'{esc(bench.id)}, sha256 {esc(bench.sha256[:16])}&hellip;</span></p>']
    body.append('<h2 class="section">Scores</h2>')
    body.append('<p class="note">Mean over the items scored, with the bootstrap 95% interval (percentile, '
                f'{N_BOOT} resamples, seed {SEED}) and n. Judge failures, missing predictions and answers without '
                'images are never scored; they are counted below.</p>')
    body.append(metric_table(runs, metrics))
    derived = [m for m in bench.metrics if m.mean_of is not None or m.aggregate == "mean_over_categories"]
    if derived:
        body.append('<p class="note">' + "; ".join(
            f"{esc(m.name)}: the mean of " + (f"the means of {esc(', '.join(m.mean_of))}" if m.mean_of is not None
                                              else "the per-category means") for m in derived) +
            " (as the benchmark defines it; interval: the same statistic bootstrapped).</p>")
    png = base64.b64encode(bar_chart_png(runs, bench)).decode("ascii")
    body.append(f'<img alt="bar chart of the metric means with 95% intervals" src="data:image/png;base64,{png}">')
    body.append('<h2 class="section">Items not scored</h2>')
    body.append(state_table(runs, metrics))
    for r in runs:
        cov = r["summary"]["coverage"]
        n_lines = len(r["results"])
        expected = bench.expected_items
        note = f"{n_lines} item(s) judged"
        if expected:
            note += f" of the benchmark's {expected}"
        if r["run"]["inputs"].get("prompts") is None and bench.kind == "judge" and bench.prompts_format != "none":
            note += " (no benchmark prompts were given: coverage unchecked)"
        body.append(f'<p class="note">{esc(r["run"]["name"])}: {esc(note)}; missing predictions: {cov["missing"]}.</p>')
    body.append('<h2 class="section">Judge</h2>')
    if bench.kind == "judge":
        body.append("".join(f'<p class="note">{esc(r["run"]["name"])}: judge prompts: {esc(_prompt_source(r))}</p>'
                            for r in runs))
    body.extend(provenance_block(r) for r in runs)
    cats = sorted({c for r in runs for c in r["summary"]["categories"]})
    if len(cats) > 1:
        body.append('<h2 class="section">Per category</h2>')
        for c in cats:
            present = [r for r in runs if c in r["summary"]["categories"]]
            n = ", ".join(f"{r['run']['name']}: {r['summary']['categories'][c]['n_items']}" for r in present)
            body.append(f'<h3 class="cat">{esc(c)} <span class="note">({esc(n)} items)</span></h3>')
            body.append(metric_table(present, metrics, pick=lambda s, c=c: s["categories"][c]["metrics"]))
    body.append('<h2 class="section">Gallery</h2>')
    body.append(gallery(runs, gallery_items))

    page = page_html(f"{bench.title}: evaluation report", f"<style>{REPORT_CSS}</style>\n" + "\n".join(body),
                     subtitle=" vs ".join(r["run"]["name"] for r in runs))
    atomic_write_bytes(out, page.encode("utf-8"))
    json_path = out.with_suffix(".json")
    summary = {"benchmark": {"name": bench.name, "version": bench.version, "sha256": bench.sha256},
               "runs": [dict(r["summary"], run_dir=str(r["dir"])) for r in runs]}
    atomic_write_bytes(json_path, (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
    return out, json_path
