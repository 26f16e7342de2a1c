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
- ``kind: "exact"`` benchmarks (ShapeWorld) have no judge calls: a program scores them, the module
  the file names as ``scorer`` (``exact_scorer``: ``METRICS``, ``truth_category(truth)``,
  ``score_item(truth, output, open_output_image)``). That name is the only place the evaluation package
  learns of a world with exact answers: eval imports no ShapeWorld code.
  ``kind: "external"`` benchmarks (GenEval) are scored by the benchmark's own program, run beside
  this project; the harness reads its per-image results and aggregates them.
- Editing benchmarks (ImgEdit, GEdit-Bench) use the ``edit`` view (the instruction, the source
  image and the edited image) and ``edited_image`` (the edited image alone). A call may take its
  template per category (ImgEdit: one prompt per edit type, same score fields).
- A metric is one score field, or the ``min`` / ``mean`` of several fields of one call (VIEScore's
  SC and PQ, ImgEdit's score), or a per-item ``min`` / ``mean`` / ``geomean`` of other metrics
  (GEdit's O = sqrt(SC x PQ)). ``skip_categories`` / ``only_categories`` leave a metric unscored
  (``not_applicable``) on some categories (InterleavedBench does not score text on its editing and
  subject-driven tasks). ``mean_of`` is the mean of the component metrics' means (InterleavedBench's
  Avg.); ``aggregate: "mean_over_categories"`` makes a metric's overall value the mean of its
  per-category means (GenEval's and ImgEdit's Overall, GEdit's averages over task groups).
- ``tasks`` (CoMM): the benchmark's tasks kept apart; a run judges one (``--task``, the file's
  default when not given), and a task whose judge prompts the file does not have is refused with
  the reason written in the file.
- Loading checks every reference (templates, score fields, metric names) and names the file on error.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

BENCHMARK_DIR = Path(__file__).parent
VIEWS = ("sequence", "image", "hidden_pair", "edit", "edited_image")
INPUT_IMAGE_RULES = ("required", "forbidden", "any")
PROMPT_FORMATS = ("records", "interleavedbench_json", "none", "truth_records", "imgedit_json", "gedit_dataset",
                  "geneval_metadata")
KINDS = ("judge", "exact", "external")
FIELD_REDUCE = ("min", "mean")
OF_REDUCE = ("min", "mean", "geomean")
_NAME_RE = re.compile(r"^[a-z0-9_]+$")


class BenchmarkError(ValueError):
    """A benchmark file is malformed or refers to something that does not exist."""


@dataclass
class CallSpec:
    id: str  # referenced by metrics
    view: str  # what the judge sees: one of VIEWS
    template: str  # the scoring template (duetgen/eval/templates/<name>.json)
    predict_template: str | None = None  # hidden_pair only: the text-only prediction template
    templates: dict[str, str] | None = None  # category -> template, when the prompt depends on the category
    resize_edited_to_source: bool = False  # edit views: the edited image resized to the source's size first
    cap_by_first: list[str] | None = None  # score fields in order; a reply scoring a later one above the first is unparsable

    def template_for(self, category: str) -> str:
        if self.templates is None:
            return self.template
        if category not in self.templates:
            raise KeyError(category)
        return self.templates[category]

    def all_templates(self) -> list[str]:
        names = [self.template] + list((self.templates or {}).values()) + [self.predict_template]
        return list(dict.fromkeys(n for n in names if n))


@dataclass
class MetricSpec:
    name: str  # as printed in the paper's tables ("T-Com", "IRS", ...)
    call: str | None = None  # the call whose score field this is
    field: str | None = None  # the score field in the template's JSON schema
    mean_of: list[str] | None = None  # or: the mean of these metrics' means (summary level, not per item)
    description: str = ""
    fields: list[str] | None = None  # or: several score fields of the call, reduced per unit
    reduce: str | None = None  # fields: "min" | "mean"; of: "min" | "mean" | "geomean"
    of: list[str] | None = None  # or: a per-item reduction of other metrics
    skip_categories: list[str] | None = None  # not scored on these categories (state not_applicable)
    only_categories: list[str] | None = None  # scored only on these categories
    aggregate: str = "mean"  # "mean" over items | "mean_over_categories" (mean of the category means)


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
    tasks: dict | None = None  # {"default": "task4", "judged": [...], "refused": {task: reason}} (CoMM)
    scorer: str | None = None  # "exact" only: the module that scores an item (e.g. "duetgen.shapeworld.judge")
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

    def mean_of(self) -> dict[str, list[str]]:
        """Summary-level metrics: name -> components (absent from the per-item lines)."""
        return {m.name: list(m.mean_of) for m in self.metrics if m.mean_of is not None}

    def over_categories(self) -> frozenset:
        return frozenset(m.name for m in self.metrics if m.aggregate == "mean_over_categories")

    def item_metric_names(self) -> list[str]:
        return [m.name for m in self.metrics if m.mean_of is None]

    def task(self, task: str | None) -> str | None:
        """The task a run judges (CoMM): ``task`` or the default; a refused or unknown one raises."""
        if self.tasks is None:
            if task is not None:
                raise BenchmarkError(f"benchmark {self.name!r} has no tasks; drop --task")
            return None
        task = task or self.tasks["default"]
        if task in self.tasks.get("refused", {}):
            raise BenchmarkError(f"benchmark {self.name!r}: {task} is not judged here: {self.tasks['refused'][task]} "
                                 f"(judged: {', '.join(self.tasks['judged'])})")
        if task not in self.tasks["judged"]:
            raise BenchmarkError(f"benchmark {self.name!r}: unknown task {task!r} "
                                 f"(judged: {', '.join(self.tasks['judged'])}; refused: {', '.join(self.tasks.get('refused', {}))})")
        return task


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
    except (ValueError, RecursionError) as e:
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
               "prompts_format", "calls", "metrics", "tasks", "paper", "scorer"}
    unknown = set(d) - allowed
    if unknown:
        raise BenchmarkError(f"benchmark file {where}: unknown key(s) {sorted(unknown)}")
    for k in ("name", "version", "title", "kind", "input_images", "prompts_format", "metrics"):
        if k not in d:
            raise BenchmarkError(f"benchmark file {where}: missing {k!r}")
    if d["kind"] not in KINDS:
        raise BenchmarkError(f"benchmark file {where}: kind must be one of {KINDS}, got {d['kind']!r}")
    if d["input_images"] not in INPUT_IMAGE_RULES:
        raise BenchmarkError(f"benchmark file {where}: input_images must be one of {INPUT_IMAGE_RULES}")
    if d["prompts_format"] not in PROMPT_FORMATS:
        raise BenchmarkError(f"benchmark file {where}: prompts_format must be one of {PROMPT_FORMATS}")
    calls = []
    for i, c in enumerate(d.get("calls") or []):
        call_keys = {"id", "view", "template", "predict_template", "templates", "resize_edited_to_source", "cap_by_first"}
        if not isinstance(c, dict) or set(c) - call_keys or "template" not in c:
            raise BenchmarkError(f"benchmark file {where}: calls[{i}] must be an object with id, view, template "
                                 f"(optional: {sorted(call_keys - {'id', 'view', 'template'})})")
        if c.get("view") not in VIEWS:
            raise BenchmarkError(f"benchmark file {where}: calls[{i}].view must be one of {VIEWS}, got {c.get('view')!r}")
        if (c["view"] == "hidden_pair") != bool(c.get("predict_template")):
            raise BenchmarkError(f"benchmark file {where}: calls[{i}]: predict_template is required for "
                                 "view 'hidden_pair' and only allowed there")
        if c.get("templates") is not None and not (isinstance(c["templates"], dict) and c["templates"]
                                                  and all(isinstance(v, str) for v in c["templates"].values())):
            raise BenchmarkError(f"benchmark file {where}: calls[{i}].templates must map categories to template names")
        calls.append(CallSpec(c["id"], c["view"], c["template"], c.get("predict_template"), c.get("templates"),
                              bool(c.get("resize_edited_to_source", False)), c.get("cap_by_first")))
    metrics = []
    for i, m in enumerate(d["metrics"]):
        if not isinstance(m, dict) or "name" not in m:
            raise BenchmarkError(f"benchmark file {where}: metrics[{i}] must be an object with a name")
        metric_keys = {"name", "call", "field", "mean_of", "description", "fields", "reduce", "of", "skip_categories",
                       "only_categories", "aggregate"}
        if set(m) - metric_keys:
            raise BenchmarkError(f"benchmark file {where}: metrics[{i}]: unknown key(s) {sorted(set(m) - metric_keys)}")
        spec = MetricSpec(m["name"], m.get("call"), m.get("field"), m.get("mean_of"), m.get("description", ""),
                          m.get("fields"), m.get("reduce"), m.get("of"), m.get("skip_categories"),
                          m.get("only_categories"), m.get("aggregate", "mean"))
        kinds = [k for k in ("field", "fields", "of", "mean_of") if m.get(k) is not None]
        if len(kinds) > 1:
            raise BenchmarkError(f"benchmark file {where}: metric {spec.name!r}: give one of field, fields, of, mean_of "
                                 f"(got {kinds})")
        if spec.fields is not None and spec.reduce not in FIELD_REDUCE:
            raise BenchmarkError(f"benchmark file {where}: metric {spec.name!r}: fields need reduce in {FIELD_REDUCE}")
        if spec.of is not None and spec.reduce not in OF_REDUCE:
            raise BenchmarkError(f"benchmark file {where}: metric {spec.name!r}: of needs reduce in {OF_REDUCE}")
        if spec.aggregate not in ("mean", "mean_over_categories"):
            raise BenchmarkError(f"benchmark file {where}: metric {spec.name!r}: aggregate must be 'mean' or "
                                 "'mean_over_categories'")
        metrics.append(spec)
    if (d["kind"] == "exact") != isinstance(d.get("scorer"), str):
        raise BenchmarkError(f"benchmark file {where}: an exact benchmark names its scorer module (\"scorer\"), "
                             "and only an exact one")
    if d["kind"] == "judge" and not calls:
        raise BenchmarkError(f"benchmark file {where}: a judge benchmark needs at least one call")
    tasks = d.get("tasks")
    if tasks is not None:
        if not (isinstance(tasks, dict) and isinstance(tasks.get("judged"), list) and tasks.get("default") in tasks["judged"]
                and isinstance(tasks.get("refused", {}), dict)):
            raise BenchmarkError(f"benchmark file {where}: tasks must be {{default, judged: [...], refused: {{task: reason}}}} "
                                 "with the default among the judged")
    return Benchmark(name=d["name"], version=str(d["version"]), title=d["title"], description=d.get("description", ""),
                     source=d.get("source", ""), kind=d["kind"], expected_items=d.get("expected_items"),
                     input_images=d["input_images"], prompts_format=d["prompts_format"], calls=calls, metrics=metrics,
                     tasks=tasks, scorer=d.get("scorer"))


SCORER_FUNCTIONS = ("truth_category", "score_item")


def exact_scorer(bench: Benchmark) -> ModuleType:
    """The module that scores an exact benchmark's items (its ``scorer``), checked to have ``METRICS`` and
    ``SCORER_FUNCTIONS``."""
    try:
        module = importlib.import_module(bench.scorer)
    except ImportError as e:
        raise BenchmarkError(f"benchmark file {bench.path}: scorer {bench.scorer!r} cannot be imported ({e})") from None
    missing = [name for name in ("METRICS", *SCORER_FUNCTIONS) if not hasattr(module, name)]
    if missing:
        raise BenchmarkError(f"benchmark file {bench.path}: scorer {bench.scorer!r} has no {', '.join(missing)}")
    return module


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
                 else [(t, c.view) for t in c.all_templates()])
        fields_of = {tuple(score_fields(load_template(t))) for t, _ in pairs if c.view != "hidden_pair"}
        if len(fields_of) > 1:
            raise BenchmarkError(f"{where}: call {c.id!r}: its templates yield different score fields {sorted(fields_of)}")
        if c.cap_by_first is not None and not set(c.cap_by_first) <= set(score_fields(load_template(c.template))):
            raise BenchmarkError(f"{where}: call {c.id!r}: cap_by_first names fields the template does not score")
        for name, view in pairs:
            t = load_template(name)
            if t.fields() != VIEW_FIELDS[view]:
                raise BenchmarkError(f"{where}: call {c.id!r}: template {name!r} uses fields {sorted(t.fields())}, "
                                     f"but view {view!r} fills {sorted(VIEW_FIELDS[view])}")
    for m in b.metrics:
        if m.mean_of is not None or m.of is not None:
            key, parts = ("mean_of", m.mean_of) if m.mean_of is not None else ("of", m.of)
            earlier = names[:names.index(m.name)]
            bad = [x for x in parts if x not in earlier or x in b.mean_of()]
            if bad or not parts:
                raise BenchmarkError(f"{where}: metric {m.name!r}: {key} must name per-item metrics defined before it; "
                                     f"bad: {bad}")
            continue
        if b.kind == "external":  # a column of the external scorer's results; read by its reader
            continue
        if b.kind == "exact":  # scored by a program (the scorer module); the field is its metric key
            metrics = exact_scorer(b).METRICS
            if m.field not in metrics:
                raise BenchmarkError(f"{where}: metric {m.name!r}: the scorer {b.scorer!r} has no metric {m.field!r} "
                                     f"(it has {list(metrics)})")
            continue
        if m.call not in ids:
            raise BenchmarkError(f"{where}: metric {m.name!r}: unknown call {m.call!r} (calls: {ids})")
        t = load_template(b.call(m.call).template)
        for f in (m.fields or [m.field]):
            if f not in score_fields(t):
                raise BenchmarkError(f"{where}: metric {m.name!r}: {t.name!r} has no score field {f!r} "
                                     f"(it has {sorted(score_fields(t))})")
