"""Benchmarks as versioned data: one JSON file per benchmark in this folder.

A benchmark file says what is judged and how (the lm-evaluation-harness way: tasks are data)::

    {"name": "cooking", "version": "1", "title": "Cooking-200", "kind": "judge",
     "expected_items": 200, "input_images": "required", "prompts_format": "records",
     "calls":   [{"id": "sequence", "view": "sequence", "template": "duetgen_sequence"}, ...],
     "metrics": [{"name": "T-Com", "call": "sequence", "field": "text_completeness"}, ...]}

Design choices:
- A *call* is one kind of judge request; its ``view`` says what the judge sees (judge.py):
  ``sequence`` (one call per answer, every image), ``image`` (one call per generated image, only
  that output image shown), ``hidden_pair`` (CoMM's IRS: first a call that predicts each hidden
  image from text alone, then one call per image against its prediction).
- A *metric* is one score field of one call, or ``mean_of`` other metrics (InterleavedBench's
  Avg.). Image-level metrics are averaged over the answer's images first, so the bootstrap
  resamples answers, not correlated images of one answer.
- The file's sha256 is recorded with every run: editing a benchmark without bumping its version
  is still visible, and a resumed run refuses a changed benchmark.
- ``kind: "exact"`` benchmarks (ShapeWorld) have no judge calls: a program scores them.
- Loading checks every reference (templates, score fields, metric names) and names the file on error.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARK_DIR = Path(__file__).parent
VIEWS = ("sequence", "image", "hidden_pair")
INPUT_IMAGE_RULES = ("required", "forbidden", "any")
PROMPT_FORMATS = ("records", "interleavedbench_json", "none", "truth_records")
_NAME_RE = re.compile(r"^[a-z0-9_]+$")


class BenchmarkError(ValueError):
    """A benchmark file is malformed or refers to something that does not exist."""


@dataclass
class CallSpec:
    id: str  # referenced by metrics
    view: str  # what the judge sees: one of VIEWS
    template: str  # the scoring template (duetgen/eval/templates/<name>.json)
    predict_template: str | None = None  # hidden_pair only: the text-only prediction template


@dataclass
class MetricSpec:
    name: str  # as printed in the paper's tables ("T-Com", "IRS", ...)
    call: str | None = None  # the call whose score field this is
    field: str | None = None  # the score field in the template's JSON schema
    mean_of: list[str] | None = None  # or: the per-sample mean of these metrics
    description: str = ""


@dataclass
class Benchmark:
    name: str
    version: str
    title: str
    description: str
    source: str  # where the protocol comes from (paper, table)
    kind: str  # "judge" (MLLM judge) | "exact" (a program scores it)
    expected_items: int | None  # size of the official set; None when it varies
    input_images: str  # "required" | "forbidden" | "any": checked on every prompt
    prompts_format: str  # what --prompts reads
    calls: list[CallSpec] = field(default_factory=list)
    metrics: list[MetricSpec] = field(default_factory=list)
    sha256: str = ""  # of the benchmark file's bytes
    path: str = ""

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def call(self, call_id: str) -> CallSpec:
        for c in self.calls:
            if c.id == call_id:
                return c
        raise KeyError(call_id)

    def metric_names(self) -> list[str]:
        return [m.name for m in self.metrics]


def list_benchmarks() -> list[str]:
    return sorted(p.stem for p in BENCHMARK_DIR.glob("*.json"))


def load_benchmark(name: str) -> Benchmark:
    """Load ``duetgen/eval/benchmarks/<name>.json`` or a benchmark file given by path."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        path = p
    else:
        if not _NAME_RE.match(name):
            raise BenchmarkError(f"benchmark name {name!r} must be lower-case letters, digits and _")
        path = BENCHMARK_DIR / f"{name}.json"
        if not path.is_file():
            raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(list_benchmarks())}")
    raw = path.read_bytes()
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"benchmark file {path}: not valid JSON ({e})") from None
    bench = _from_dict(d, str(path))
    bench.sha256 = hashlib.sha256(raw).hexdigest()
    bench.path = str(path)
    _check_references(bench)
    return bench


def _from_dict(d: object, where: str) -> Benchmark:
    if not isinstance(d, dict):
        raise BenchmarkError(f"benchmark file {where}: must be a JSON object")
    allowed = {"name", "version", "title", "description", "source", "kind", "expected_items", "input_images",
               "prompts_format", "calls", "metrics"}
    unknown = set(d) - allowed
    if unknown:
        raise BenchmarkError(f"benchmark file {where}: unknown key(s) {sorted(unknown)}")
    for k in ("name", "version", "title", "kind", "input_images", "prompts_format", "metrics"):
        if k not in d:
            raise BenchmarkError(f"benchmark file {where}: missing {k!r}")
    if d["kind"] not in ("judge", "exact"):
        raise BenchmarkError(f"benchmark file {where}: kind must be 'judge' or 'exact', got {d['kind']!r}")
    if d["input_images"] not in INPUT_IMAGE_RULES:
        raise BenchmarkError(f"benchmark file {where}: input_images must be one of {INPUT_IMAGE_RULES}")
    if d["prompts_format"] not in PROMPT_FORMATS:
        raise BenchmarkError(f"benchmark file {where}: prompts_format must be one of {PROMPT_FORMATS}")
    calls = []
    for i, c in enumerate(d.get("calls") or []):
        if not isinstance(c, dict) or set(c) - {"id", "view", "template", "predict_template"}:
            raise BenchmarkError(f"benchmark file {where}: calls[{i}] must be an object with id, view, template")
        if c.get("view") not in VIEWS:
            raise BenchmarkError(f"benchmark file {where}: calls[{i}].view must be one of {VIEWS}, got {c.get('view')!r}")
        if (c["view"] == "hidden_pair") != bool(c.get("predict_template")):
            raise BenchmarkError(f"benchmark file {where}: calls[{i}]: predict_template is required for "
                                 "view 'hidden_pair' and only allowed there")
        calls.append(CallSpec(c["id"], c["view"], c["template"], c.get("predict_template")))
    metrics = []
    for i, m in enumerate(d["metrics"]):
        if not isinstance(m, dict) or "name" not in m:
            raise BenchmarkError(f"benchmark file {where}: metrics[{i}] must be an object with a name")
        if set(m) - {"name", "call", "field", "mean_of", "description"}:
            raise BenchmarkError(f"benchmark file {where}: metrics[{i}]: unknown key(s) "
                                 f"{sorted(set(m) - {'name', 'call', 'field', 'mean_of', 'description'})}")
        metrics.append(MetricSpec(m["name"], m.get("call"), m.get("field"), m.get("mean_of"), m.get("description", "")))
    if d["kind"] == "judge" and not calls:
        raise BenchmarkError(f"benchmark file {where}: a judge benchmark needs at least one call")
    return Benchmark(name=d["name"], version=str(d["version"]), title=d["title"], description=d.get("description", ""),
                     source=d.get("source", ""), kind=d["kind"], expected_items=d.get("expected_items"),
                     input_images=d["input_images"], prompts_format=d["prompts_format"], calls=calls, metrics=metrics)


def _check_references(b: Benchmark) -> None:
    """Every metric names an existing call and a score field of its template; names are unique."""
    from duetgen.eval.judge import VIEW_FIELDS, load_template, score_fields

    where = f"benchmark file {b.path}"
    ids = [c.id for c in b.calls]
    if len(set(ids)) != len(ids):
        raise BenchmarkError(f"{where}: duplicate call ids {ids}")
    names = b.metric_names()
    if len(set(names)) != len(names):
        raise BenchmarkError(f"{where}: duplicate metric names {names}")
    for c in b.calls:  # each view fills exactly the fields its templates ask for
        pairs = ([(c.predict_template, "hidden"), (c.template, "pair")] if c.view == "hidden_pair"
                 else [(c.template, c.view)])
        for name, view in pairs:
            t = load_template(name)
            if t.fields() != VIEW_FIELDS[view]:
                raise BenchmarkError(f"{where}: call {c.id!r}: template {name!r} uses fields {sorted(t.fields())}, "
                                     f"but view {view!r} fills {sorted(VIEW_FIELDS[view])}")
    for m in b.metrics:
        if m.mean_of is not None:
            bad = [x for x in m.mean_of if x not in names or x == m.name]
            if bad or not m.mean_of:
                raise BenchmarkError(f"{where}: metric {m.name!r}: mean_of names unknown metric(s) {bad}")
            continue
        if b.kind == "exact":  # scored by a program (toyworld_judge); the field is its metric key
            from duetgen.eval.toyworld_judge import METRICS

            if m.field not in METRICS:
                raise BenchmarkError(f"{where}: metric {m.name!r}: the exact judge has no metric {m.field!r} "
                                     f"(it has {list(METRICS)})")
            continue
        if m.call not in ids:
            raise BenchmarkError(f"{where}: metric {m.name!r}: unknown call {m.call!r} (calls: {ids})")
        t = load_template(b.call(m.call).template)
        if m.field not in score_fields(t):
            raise BenchmarkError(f"{where}: metric {m.name!r}: {t.name!r} has no score field {m.field!r} "
                                 f"(it has {sorted(score_fields(t))})")
