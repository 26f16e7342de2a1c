"""Run a benchmark on a model's outputs and write a run directory; rerun the same command to resume.

    duetgen eval run --benchmark cooking --pred outputs/ --judge-url http://127.0.0.1:8000/v1 \\
        --judge-model Qwen2.5-VL-72B-Instruct --out runs/cooking-mymodel [--k 3]

A run directory holds:

    run.json            settings (benchmark id and sha256, templates, judge, preprocessing) + invocations
    results.jsonl       one line per benchmark item: every judged unit with its provenance, and the
                        per-item metric values and states
    summary.json        means with bootstrap 95% intervals, state counts, per-category tables
    score_cache.sqlite  the judge's content-addressed score cache (unless --cache points elsewhere)

Design choices:
- Resume is a rerun. Finished items are kept when their content hash still matches (the record
  and its image files); everything else is judged again through the score cache, so a request
  that completed before a kill is never sent twice. Items with an ``api_error`` are re-judged
  (those requests were never cached), so a rerun retries them and only them.
- Lines are appended (one write, flushed and fsync'ed) as items finish; a kill leaves at most a
  torn last line, which the next run drops. The final file is rewritten atomically in benchmark
  order, with nothing volatile in it (no timings, no cache flags): an interrupted-and-resumed run
  and an uninterrupted one write the same bytes.
- A run directory is bound to its settings: resuming with another judge, template, benchmark
  version or k is refused with a message naming what changed (use a new --out).
- When benchmark prompts are given, they are the item list and the judge sees their input (the
  prediction's user text must match); a benchmark item without a prediction is reported as
  ``missing``, a prediction outside the benchmark is an error. Without prompts the predictions
  define the items and coverage is reported as unchecked.
- ``kind: "exact"`` benchmarks (ShapeWorld) go through the same run directory, scored by the
  program its benchmark file names (``scorer``: ShapeWorld's judge) with its own rules (a missing prediction scores 0 there).
  ``kind: "external"`` benchmarks (GenEval) read the scores the benchmark's own program wrote
  (``--pred results.jsonl``): one item per prompt, its value the fraction of its images correct.
- CoMM keeps its tasks apart: a run judges one task (``--task``, task 4 by default, the paper's
  Table 2); the other tasks' folders are counted in the coverage, not judged.
- An item whose image file is missing or unreadable is ``bad_image`` with the reason in its line;
  the rest of the run goes on.
- ImgEdit is judged with the project's templates, or with the benchmark's own prompts when the
  user gives their copy (``--judge-prompts prompts.json``): those ask for prose ``Name: N`` lines,
  read with ImgEdit's rule (``LineScores``). Which source was used is in ``run.json`` and the
  summary (``settings.prompt_source``); the templates' hashes bind the run directory to it.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duetgen.data.dataset import MAX_RECORD_LINE_BYTES, Dataset, atomic_write_bytes, capped_lines
from duetgen.data.images import ImageError
from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart
from duetgen.eval.benchmarks import BENCHMARK_DIR, Benchmark, exact_scorer, load_benchmark
from duetgen.eval.benchmarks.readers import (GENEVAL_LAYOUT, ImageFolder, read_edit_predictions, read_gedit,
                                             read_geneval_results, read_imgedit, read_imgedit_judge_prompts,
                                             read_interleavedbench, read_predictions, read_records)
from duetgen.eval.judge import (Judge, JudgeConfig, LineScores, Sample, load_template, preprocess_image, score_fields,
                                score_range, sequence_parts)
from duetgen.eval.metrics import N_BOOT, SEED, summarize
from duetgen.llm.templates import PromptTemplate
from duetgen.progress import progress_bar

RUN_FORMAT = "duetgen-eval-run"
RUN_FILE, RESULTS_FILE, SUMMARY_FILE, CACHE_FILE = "run.json", "results.jsonl", "summary.json", "score_cache.sqlite"
BENCHMARK_COPY = "benchmark.json"  # a run of a benchmark given as a file keeps it, so its report can be made anywhere


class HarnessError(ValueError):
    """Bad inputs or settings for a run. The message names the input."""


@dataclass
class RunConfig:
    benchmark: str  # benchmark name (duetgen/eval/benchmarks/<name>.json) or a benchmark file
    pred: str  # the model's outputs: a DuetGen dataset directory or a CoMM results folder
    out: str  # the run directory; rerun with the same one to resume
    prompts: str | None = None  # benchmark inputs: a dataset directory, or InterleavedBench's JSON
    images: str | None = None  # image root of an InterleavedBench JSON (default: the JSON's folder)
    truth: str | None = None  # exact benchmarks (ShapeWorld): the ground-truth dataset
    name: str | None = None  # the model's name in reports (default: the pred folder's name)
    cache: str | None = None  # score cache file (default: <out>/score_cache.sqlite); share it between runs
    task: str | None = None  # CoMM: the task judged (default: the benchmark file's, task4)
    language: str | None = None  # GEdit-Bench: instruction_language of the rows judged (default "en"; "all")
    judge_prompts: str | None = None  # ImgEdit: the user's copy of its official prompts.json (else our templates)
    n_boot: int = N_BOOT  # bootstrap resamples for the 95% intervals
    seed: int = SEED  # bootstrap seed


@dataclass
class Item:
    id: str
    category: str
    sample: Sample | None  # the request and the model's answer; None when the prediction is missing
    truth: Record | None = None  # exact benchmarks: the ground-truth record
    error: str | None = None  # why the item cannot be judged (a missing or unreadable image): bad_image
    external: dict | None = None  # external benchmarks: the scorer's results for this item


@dataclass
class JudgePrompts:
    """A benchmark's own judge prompts, read from the user's copy of its prompt file (ImgEdit)."""

    path: str  # the file, resolved
    sha256: str  # of its bytes
    templates: dict[str, PromptTemplate]  # category (edit type) -> template
    reply: LineScores  # how their prose replies become the call's score fields

    def settings(self) -> dict:
        return {"source": "official prompt file", "path": self.path, "sha256": self.sha256, "reply": self.reply.settings()}


PROJECT_PROMPTS = {"source": "project templates"}  # settings.prompt_source of every other run


def read_judge_prompts(bench: Benchmark, cfg: RunConfig) -> JudgePrompts | None:
    """``cfg.judge_prompts`` as templates for the benchmark's edit call (ImgEdit only). Their replies
    fill the same score fields, in the same range, as the project's template for that call."""
    if cfg.judge_prompts is None:
        return None
    if bench.prompts_format != "imgedit_json":
        raise HarnessError(f"--judge-prompts reads ImgEdit's official prompt file (prompts.json); {bench.name!r} "
                           "is judged with the project's templates")
    templates = read_imgedit_judge_prompts(cfg.judge_prompts)
    own = load_template(bench.calls[0].template)
    names = score_fields(own)
    lo, hi = score_range(own, names[0])
    path = Path(cfg.judge_prompts).resolve()
    return JudgePrompts(str(path), hashlib.sha256(path.read_bytes()).hexdigest(), templates,
                        LineScores(tuple(names), int(lo), int(hi)))


# ----------------------------------------------------------------------------- building items
def split_record(rec: Record) -> tuple[list[Message], list]:
    """(request, answer): messages up to the last user turn, and every assistant part after it."""
    last_user = max((i for i, m in enumerate(rec.messages) if m.role == "user"), default=None)
    if last_user is None:
        raise RecordError(f"record {rec.id!r}: no user turn, so no request to judge")
    after = rec.messages[last_user + 1:]
    bad = [m.role for m in after if m.role != "assistant"]
    if bad:
        raise RecordError(f"record {rec.id!r}: a {bad[0]!r} turn follows the last user turn")
    return rec.messages[:last_user + 1], [p for m in after for p in m.content]


def _user_text(messages: list[Message]) -> str:
    return "\n".join(" ".join(m.text.split()) for m in messages if m.role == "user")


def _category(rec: Record) -> str:
    c = rec.meta.get("category")
    return c if isinstance(c, str) and c else "all"


def _check_images(items: list[Item]) -> None:
    """Mark items whose image files are missing (the rest of the run goes on)."""
    for it in items:
        s = it.sample
        if s is None:
            continue
        try:
            for p in s.input_image_parts:
                s.input_images.image_path(p.path, it.id)
            for p in s.output_image_parts:
                s.output_images.image_path(p.path, it.id)
        except ImageError as e:
            it.error = str(e)


def _read_prompts(bench: Benchmark, cfg: RunConfig):
    if bench.prompts_format == "interleavedbench_json" and Path(cfg.prompts).is_file():
        return read_interleavedbench(cfg.prompts, cfg.images)
    if bench.prompts_format == "imgedit_json":
        return read_imgedit(cfg.prompts, cfg.images)
    if bench.prompts_format == "gedit_dataset":
        return read_gedit(cfg.prompts, cfg.language or "en")
    return read_records(cfg.prompts)


def build_items(bench: Benchmark, cfg: RunConfig) -> tuple[list[Item], dict]:
    """The benchmark's items with their samples, and coverage info for the summary."""
    if bench.kind == "external":
        return _build_external_items(bench, cfg)
    if cfg.language is not None and bench.prompts_format != "gedit_dataset":
        raise HarnessError(f"--language is for GEdit-Bench; {bench.name!r} has no language subsets")
    task = bench.task(cfg.task)
    edit_layout = {"imgedit_json": "imgedit", "gedit_dataset": "gedit"}.get(bench.prompts_format)
    if edit_layout is not None:
        if cfg.prompts is None:
            raise HarnessError(f"benchmark {bench.name!r}: give --prompts (its edits: "
                               f"{'basic_edit.json' if edit_layout == 'imgedit' else 'the GEdit-Bench dataset copy'})")
        prompts, prompt_images = _read_prompts(bench, cfg)
        preds, pred_images, pred_format = read_edit_predictions(cfg.pred, prompts, edit_layout)
    else:
        preds, pred_images, pred_format = read_predictions(cfg.pred)
    other_tasks: dict[str, int] = {}
    if task is not None:  # CoMM: only the judged task's sample folders
        for r in preds:
            if r.meta.get("category") != task:
                other_tasks[r.meta.get("category")] = other_tasks.get(r.meta.get("category"), 0) + 1
        preds = [r for r in preds if r.meta.get("category") == task]
        if not preds:
            raise HarnessError(f"{cfg.pred}: no {task} sample folder (<data_id>_{task}/); found {other_tasks}")
    by_id: dict[str, Record] = {}
    for r in preds:
        if r.id in by_id:
            raise HarnessError(f"{cfg.pred}: prediction id {r.id!r} appears twice")
        by_id[r.id] = r

    if bench.kind == "exact":
        return _build_exact_items(bench, cfg, by_id, pred_images)
    if cfg.truth is not None:
        raise HarnessError(f"--truth is for exact benchmarks; {bench.name!r} is judged (use --prompts)")

    if edit_layout is not None:
        pass
    elif cfg.prompts is not None:
        if bench.prompts_format == "none":
            raise HarnessError(f"benchmark {bench.name!r} takes its inputs from the predictions; drop --prompts")
        prompts, prompt_images = _read_prompts(bench, cfg)
    elif cfg.images is not None:
        raise HarnessError("--images is the image root of --prompts; give --prompts too")
    else:
        prompts, prompt_images = None, None

    items: list[Item] = []
    if prompts is None:
        for r in preds:
            request, answer = split_record(r)
            items.append(Item(r.id, _category(r), Sample(r.id, _category(r), request, answer, pred_images, pred_images)))
    else:
        ids = {p.id for p in prompts}
        extra = [i for i in by_id if i not in ids]
        if extra:
            raise HarnessError(f"{cfg.pred}: {len(extra)} prediction(s) are not items of the benchmark prompts "
                               f"{cfg.prompts} (first: {extra[:5]})")
        for p in prompts:
            if p.id not in by_id:
                items.append(Item(p.id, _category(p), None))
                continue
            request, _ = split_record(p)
            pred_request, answer = split_record(by_id[p.id])
            if _user_text(pred_request) != _user_text(request):
                raise HarnessError(f"{cfg.pred}: prediction {p.id!r} answers a different request than the benchmark "
                                   f"item (user text differs): {_user_text(pred_request)[:80]!r} vs "
                                   f"{_user_text(request)[:80]!r}")
            items.append(Item(p.id, _category(p), Sample(p.id, _category(p), request, answer, prompt_images, pred_images)))

    for it in items:  # the benchmark's input rule (Cooking has a dish image, its Text-Input variant none)
        if it.sample is None:
            continue
        n = len(it.sample.input_image_parts)
        if bench.input_images == "required" and n == 0:
            raise HarnessError(f"item {it.id!r}: benchmark {bench.name!r} requires an input image, the request has none")
        if bench.input_images == "forbidden" and n:
            raise HarnessError(f"item {it.id!r}: benchmark {bench.name!r} has text-only inputs, the request has {n} image(s)")
    _check_images(items)
    coverage = {"pred_format": pred_format, "prompts_given": prompts is not None,
                "expected_items": bench.expected_items, "items": len(items),
                "missing": sum(it.sample is None for it in items),
                "bad_image": sum(it.error is not None for it in items)}
    if task is not None:
        coverage.update(task=task, other_tasks_not_judged=dict(sorted(other_tasks.items())))
    if bench.prompts_format == "gedit_dataset":
        coverage["language"] = cfg.language or "en"
    return items, coverage


def _build_external_items(bench: Benchmark, cfg: RunConfig) -> tuple[list[Item], dict]:
    """GenEval: one item per prompt folder of the scorer's results.jsonl (``--pred``). With
    ``--images OUT`` (the folder ``eval generate`` wrote, GenEval's layout) each item also carries
    its prompt and images, for the report's gallery; the scores never depend on them."""
    for flag, v in (("--prompts", cfg.prompts), ("--truth", cfg.truth), ("--task", cfg.task),
                    ("--language", cfg.language)):
        if v is not None:
            raise HarnessError(f"benchmark {bench.name!r} reads the scores its own program wrote (--pred results.jsonl); "
                               f"drop {flag}")
    groups = read_geneval_results(cfg.pred)
    tasks = sorted({c for m in bench.metrics for c in (m.only_categories or ())})
    for g in groups:  # a tag of no task would enter Overall (the mean over the categories present) unseen
        if g["category"] not in tasks:
            raise HarnessError(f"{cfg.pred}: prompt folder {g['id']} has tag {g['category']!r}, not a task of "
                               f"{bench.name!r} ({', '.join(tasks)})")
    items = [Item(g["id"], g["category"], None, external=g) for g in groups]
    if cfg.images is not None:
        folder = ImageFolder(cfg.images)
        first = Path(cfg.images) / groups[0]["id"] / "metadata.jsonl"
        if not first.is_file():
            raise HarnessError(f"--images {cfg.images}: {first} not found; expected GenEval's layout {GENEVAL_LAYOUT}")
        for it, g in zip(items, groups):
            prompt = g["prompt"] if isinstance(g["prompt"], str) else g["category"]
            it.sample = Sample(g["id"], g["category"], [Message("user", [TextPart(prompt)])],
                               [ImagePart(f"{g['id']}/samples/{Path(f).name}") for f in g["files"]], folder, folder)
        _check_images(items)
    return items, {"pred_format": "geneval_results", "prompts_given": False, "expected_items": bench.expected_items,
                   "items": len(items), "missing": 0, "images": sum(len(g["correct"]) for g in groups)}


def _build_exact_items(bench: Benchmark, cfg: RunConfig, by_id: dict, pred_images) -> tuple[list[Item], dict]:
    if cfg.truth is None:
        raise HarnessError(f"benchmark {bench.name!r} is scored against ground truth: give --truth DIR")
    if cfg.prompts is not None or cfg.images is not None:
        raise HarnessError(f"benchmark {bench.name!r} reads its inputs from --truth; drop --prompts/--images")
    scorer = exact_scorer(bench)
    truth_ds = Dataset(cfg.truth)
    items = []
    for t in truth_ds:
        kind = scorer.truth_category(t)
        request, _ = split_record(t)
        sample = None
        if t.id in by_id:
            _, answer = split_record(by_id[t.id])
            sample = Sample(t.id, kind, request, answer, truth_ds, pred_images)
        items.append(Item(t.id, kind, sample, truth=t))
    extra = sorted(set(by_id) - {it.id for it in items})
    if extra:
        raise HarnessError(f"{cfg.pred}: {len(extra)} prediction(s) have no ground-truth record in {cfg.truth} "
                           f"(first: {extra[:5]})")
    _check_images(items)
    return items, {"pred_format": "records", "prompts_given": True, "expected_items": len(items),
                   "items": len(items), "missing": sum(it.sample is None for it in items),
                   "bad_image": sum(it.error is not None for it in items)}


def item_hash(item: Item) -> str:
    """sha256 of what is judged: the records' parts and, per image, its path, size and mtime."""
    def parts_json(parts, source) -> list:
        out = []
        for p in parts:
            if isinstance(p, TextPart):
                out.append(["t", p.text])
            elif hasattr(source, "stat_key"):  # images inside a table (GEdit-Bench): their bytes' hash
                out.append(["i", p.path, *source.stat_key(p.path, item.id)])
            else:
                try:
                    st = source.image_path(p.path, item.id).stat()
                except ImageError:  # bad_image: judged as that state, hashed by its path alone
                    out.append(["i", p.path, None])
                    continue
                out.append(["i", p.path, st.st_size, st.st_mtime_ns])
        return out

    blob: dict[str, Any] = {"id": item.id, "category": item.category}
    if item.sample is not None:
        s = item.sample
        blob["input"] = [[m.role, parts_json(m.content, s.input_images)] for m in s.input]
        blob["output"] = parts_json(s.output, s.output_images)
    if item.truth is not None:
        blob["truth"] = item.truth.to_json()
    if item.external is not None:
        blob["external"] = item.external
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- judging one item
def _edit_fields(c, s: Sample, view: str) -> dict:
    """What an edit view shows: the instruction (the request's text), the source image (the
    request's first image) and the edited image (the answer's first image), optionally resized to
    the source's size first (GEdit-Bench does so before VIEScore)."""
    key = ("edited", c.resize_edited_to_source)
    if key not in s._bytes:
        edited = s.output_images.open_image(s.output_image_parts[0].path, record_id=s.id)
        if c.resize_edited_to_source:
            from PIL import Image

            source = s.input_images.open_image(s.input_image_parts[0].path, record_id=s.id)
            if edited.size != source.size:
                edited = edited.resize(source.size, Image.Resampling.BICUBIC)
        s._bytes[key] = preprocess_image(edited)
    if view == "edited_image":
        return {"edited": s._bytes[key]}
    instruction = "\n".join(p.text for m in s.input if m.role == "user" for p in m.content if isinstance(p, TextPart))
    return {"instruction": instruction, "source": s.image_bytes("input", 0), "edited": s._bytes[key]}


def _cap_by_first(unit: dict, fields: list[str]) -> dict:
    """The benchmark's rule that later criteria may not exceed the first (ImgEdit): a sample that
    breaks it did not answer as asked, so the unit is unparsable (never clipped into a score)."""
    if unit["state"] != "ok":
        return unit
    for smp in unit["samples"]:
        first = smp["scores"][fields[0]]
        over = [f for f in fields[1:] if smp["scores"][f] > first]
        if over:
            unit.update(state="unparsable", scores=None,
                        error=f"{over[0]} ({smp['scores'][over[0]]}) above {fields[0]} ({first}): the benchmark's "
                              "criteria may not exceed the first")
            return unit
    return unit


async def judge_item(bench: Benchmark, item: Item, judge: Judge, prompts: JudgePrompts | None = None) -> dict:
    """Every call of the benchmark on one item, then its metric values (see metric_values).
    ``prompts``: the benchmark's own prompts (ImgEdit's file) in place of the project's templates."""
    s = item.sample
    n_in, n_out = len(s.input_image_parts), len(s.output_image_parts)

    async def run_call(c):
        try:
            t = prompts.templates[item.category] if prompts is not None else load_template(c.template_for(item.category))
        except KeyError:
            known = sorted(prompts.templates if prompts is not None else c.templates)
            raise HarnessError(f"item {item.id!r}: category {item.category!r} has no template in call {c.id!r} "
                               f"(it has {known})") from None
        if c.view in ("edit", "edited_image"):
            if n_out == 0 or (c.view == "edit" and n_in == 0):
                return []
            unit = await judge.score(t, _edit_fields(c, s, c.view), reply=None if prompts is None else prompts.reply)
            return [_cap_by_first(unit, c.cap_by_first) if c.cap_by_first else unit]
        if c.view == "sequence":
            return [await judge.score(t, {"sequence": sequence_parts(s, "all"), "num_output_images": n_out})]
        if c.view == "image":
            return list(await asyncio.gather(*(
                judge.score(t, {"sequence": sequence_parts(s, j), "target": f"<Img_{n_in + j}>"}) for j in range(n_out))))
        # hidden_pair (CoMM IRS): 1) predict each hidden image from text alone, 2) score each image against it
        if n_out == 0:
            return {"predict": None, "pairs": []}
        pred = await judge.predict(load_template(c.predict_template),
                                   {"sequence": sequence_parts(s, "none"), "num_hidden": n_out,
                                    "first_hidden": n_in, "last_hidden": n_in + n_out - 1}, n_expected=n_out)
        if pred["state"] != "ok":
            return {"predict": pred, "pairs": []}
        pairs = await asyncio.gather(*(judge.score(t, {"description": d, "image": s.image_bytes("output", j)})
                                       for j, d in enumerate(pred["descriptions"])))
        return {"predict": pred, "pairs": list(pairs)}

    outs = await asyncio.gather(*(run_call(c) for c in bench.calls))
    calls = {c.id: o for c, o in zip(bench.calls, outs)}
    return {"id": item.id, "category": item.category, "calls": calls,
            "metrics": metric_values(bench, calls, item.category)}


def _reduce(values: list[float], how: str) -> float:
    if how == "min":
        return min(values)
    if how == "geomean":  # GEdit-Bench: O = sqrt(SC x PQ)
        return math.prod(values) ** (1 / len(values))
    return sum(values) / len(values)


def _units_value(units: list[dict], m) -> dict:
    if not units:
        return {"state": "no_image", "value": None}
    failed = [u for u in units if u["state"] != "ok"]
    if failed:
        return {"state": failed[0]["state"], "value": None}
    if m.fields is not None:  # several fields of one unit (VIEScore's min, ImgEdit's mean of three)
        values = [_reduce([u["scores"][f] for f in m.fields], m.reduce) for u in units]
    else:
        values = [u["scores"][m.field] for u in units]
    return {"state": "ok", "value": sum(values) / len(values)}


def _applies(m, category: str) -> bool:
    if m.skip_categories is not None and category in m.skip_categories:
        return False
    return m.only_categories is None or category in m.only_categories


def metric_values(bench: Benchmark, calls: dict, category: str) -> dict:
    """Per-item metric values. Sequence metrics: the unit's score. Image-level metrics: the mean over
    the answer's images (``no_image`` when it has none). Any failed unit makes the metric that state.
    A metric the benchmark does not score on this category is ``not_applicable``. ``mean_of``
    metrics are summary-level (the mean of their components' means) and absent here."""
    out: dict[str, dict] = {}
    for m in bench.metrics:
        if m.mean_of is not None or m.of is not None:
            continue
        if not _applies(m, category):
            out[m.name] = {"state": "not_applicable", "value": None}
            continue
        c = bench.call(m.call)
        units = calls[c.id]
        if c.view == "hidden_pair":
            if units["predict"] is not None and units["predict"]["state"] != "ok":
                out[m.name] = {"state": units["predict"]["state"], "value": None}
                continue
            units = units["pairs"]
        out[m.name] = _units_value(units, m)
    return _derived_values(bench, out, category)


def _derived_values(bench: Benchmark, out: dict, category: str) -> dict:
    """The ``of`` metrics (per-item reductions of metrics before them), then the lines' order."""
    for m in bench.metrics:
        if m.of is None:
            continue
        if not _applies(m, category):
            out[m.name] = {"state": "not_applicable", "value": None}
            continue
        parts = [out[x] for x in m.of]
        bad = [p for p in parts if p["state"] != "ok"]
        out[m.name] = ({"state": bad[0]["state"], "value": None} if bad
                       else {"state": "ok", "value": _reduce([p["value"] for p in parts], m.reduce)})
    return {name: out[name] for name in bench.item_metric_names()}


def missing_line(bench: Benchmark, item: Item, state: str = "missing") -> dict:
    line = {"id": item.id, "category": item.category, "calls": {},
            "metrics": {m.name: {"state": state if _applies(m, item.category) else "not_applicable", "value": None}
                        for m in bench.metrics if m.mean_of is None}}
    if state == "bad_image":
        line["error"] = item.error
    return line


def external_line(bench: Benchmark, item: Item) -> dict:
    """GenEval: every metric of the item's category is the fraction of its images judged correct."""
    g = item.external
    value = sum(g["correct"]) / len(g["correct"])
    metrics = {m.name: ({"state": "ok", "value": value} if _applies(m, item.category)
                        else {"state": "not_applicable", "value": None}) for m in bench.metrics if m.mean_of is None}
    return {"id": item.id, "category": item.category, "calls": {}, "prompt": g["prompt"],
            "correct": g["correct"], "metrics": metrics}


def exact_line(bench: Benchmark, item: Item) -> dict:
    """An exact benchmark (ShapeWorld): its scorer's scores of one item (its own rule: a missing prediction
    scores 0)."""
    s = item.sample
    scores = exact_scorer(bench).score_item(
        item.truth, None if s is None else s.output,
        lambda i: s.output_images.open_image(s.output_image_parts[i].path, record_id=item.id))
    metrics = {}
    for m in bench.metrics:
        v = scores[m.field]
        metrics[m.name] = {"state": "undefined", "value": None} if v is None else {"state": "ok", "value": float(v)}
    return {"id": item.id, "category": item.category, "calls": {}, "missing": bool(scores["missing"]),
            "metrics": metrics}


def _exact_or_bad_image(bench: Benchmark, item: Item) -> dict:
    """``exact_line``, or a ``bad_image`` line for an item whose image is missing or does not decode (the
    rest of the run goes on, as for a judged benchmark)."""
    if item.error is None:
        try:
            return exact_line(bench, item)
        except ImageError as e:
            item.error = str(e)
    return missing_line(bench, item, "bad_image")


# ----------------------------------------------------------------------------- run directory
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _settings(bench: Benchmark, judge_config: JudgeConfig | None, cfg: RunConfig,
              prompts: JudgePrompts | None = None) -> dict:
    templates = {}
    used = ([t for t in prompts.templates.values()] if prompts is not None
            else [load_template(name) for c in bench.calls for name in c.all_templates()])
    for t in used:
        templates[t.name] = {"version_key": t.version_key, "sha256": t.content_hash}
    b = {"name": bench.name, "version": bench.version, "sha256": bench.sha256}
    if bench.tasks is not None:  # CoMM: a run directory holds one task
        b["task"] = bench.task(cfg.task)
    if bench.prompts_format == "gedit_dataset":
        b["language"] = cfg.language or "en"
    return {"benchmark": b, "templates": templates, "judge": None if judge_config is None else judge_config.settings(),
            "prompt_source": PROJECT_PROMPTS if prompts is None else prompts.settings()}


def _run_inputs(cfg: RunConfig) -> dict:
    def resolved(p):
        return None if p is None else str(Path(p).resolve())
    return {"pred": resolved(cfg.pred), "prompts": resolved(cfg.prompts), "images": resolved(cfg.images),
            "truth": resolved(cfg.truth), "task": cfg.task, "language": cfg.language,
            "judge_prompts": resolved(cfg.judge_prompts)}


def _check_or_create_run(out: Path, settings: dict, cfg: RunConfig) -> dict:
    """The run directory's run.json: a new one, or the existing one when the benchmark, templates, judge
    and inputs are the same (a resume); anything else is refused, so a run never holds two models'
    results under one name. A new ``--name`` renames the run."""
    path = out / RUN_FILE
    inputs = _run_inputs(cfg)
    if path.exists():
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise HarnessError(f"{path}: unreadable run file ({e})") from None
        if run.get("format") != RUN_FORMAT:
            raise HarnessError(f"{path}: not a DuetGen eval run")
        for key in ("benchmark", "templates", "judge"):
            if run["settings"].get(key) != settings[key]:
                raise HarnessError(f"{out} holds a run with different {key} settings "
                                   f"({json.dumps(run['settings'].get(key), sort_keys=True)[:300]} vs "
                                   f"{json.dumps(settings[key], sort_keys=True)[:300]}); use a new --out")
        changed = [k for k in inputs if run["inputs"].get(k) != inputs[k]]
        if changed:
            k = changed[0]
            raise HarnessError(f"{out} holds a run of other inputs: {k} {run['inputs'].get(k)!r}, now {inputs[k]!r}; "
                               "use a new --out (a run judges one model's outputs)")
        if cfg.name:
            run["name"] = cfg.name
        return run
    return {"format": RUN_FORMAT, "format_version": 1, "created": _now(), "settings": settings,
            "name": cfg.name or Path(cfg.pred).resolve().name, "inputs": inputs,
            "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed}, "invocations": []}


def read_results(path: Path) -> dict[str, dict]:
    """id -> result line; a torn or corrupt line (a killed writer's last one) is dropped."""
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for raw in capped_lines(f, MAX_RECORD_LINE_BYTES):
            if raw is None:  # over the cap (a run handed in): never held whole
                continue
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                line = json.loads(raw)
            except (ValueError, RecursionError):  # (JSON, UTF-8, a 4,300-digit integer, deep nesting)
                continue
            if (isinstance(line, dict) and isinstance(line.get("id"), str) and isinstance(line.get("metrics"), dict)
                    and all(isinstance(v, dict) for v in line["metrics"].values())):
                out[line["id"]] = line
    return out


def _has_api_error(line: dict) -> bool:
    return any(v["state"] == "api_error" for v in line["metrics"].values())


def _dumps(line: dict) -> str:
    return json.dumps(line, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def run_benchmark(cfg: RunConfig, judge_config: JudgeConfig | None = None, api_key: str | None = None,
                  progress: bool = True) -> dict:
    """Judge (or resume judging) every item; write results and summary; return the summary."""
    bench = load_benchmark(cfg.benchmark)
    if bench.kind == "judge" and judge_config is None:
        raise HarnessError(f"benchmark {bench.name!r} is judged by an MLLM: give --judge-url and --judge-model")
    if bench.kind in ("exact", "external") and judge_config is not None:
        raise HarnessError(f"benchmark {bench.name!r} is scored {'exactly ' if bench.kind == 'exact' else ''}by a program; "
                           "drop --judge-url/--judge-model")
    prompts = read_judge_prompts(bench, cfg)
    items, coverage = build_items(bench, cfg)
    out = Path(cfg.out)
    for name in ("pred", "truth", "prompts", "images"):  # (--out TRUTH wrote run files into the dataset)
        given = getattr(cfg, name)
        if given and out.resolve().is_relative_to(Path(given).resolve()):
            raise HarnessError(f"--out {str(out)!r} lies inside --{name} {given!r}; write the run beside the inputs")
    out.mkdir(parents=True, exist_ok=True)
    run = _check_or_create_run(out, _settings(bench, judge_config, cfg, prompts), cfg)
    if Path(bench.path).resolve().parent != BENCHMARK_DIR.resolve():  # not an installed benchmark: keep its file
        atomic_write_bytes(out / BENCHMARK_COPY, Path(bench.path).read_bytes())
    atomic_write_bytes(out / RUN_FILE, (json.dumps(run, indent=1) + "\n").encode())

    # 1. keep finished items whose content is unchanged and that have no api_error
    hashes = {it.id: item_hash(it) for it in items}
    previous = read_results(out / RESULTS_FILE)
    done = {i: line for i, line in previous.items()
            if i in hashes and line.get("item_hash") == hashes[i] and not _has_api_error(line)}
    order = [it.id for it in items]
    atomic_write_bytes(out / RESULTS_FILE, "".join(_dumps(done[i]) + "\n" for i in order if i in done).encode())
    todo = [it for it in items if it.id not in done]

    # 2. judge the rest, appending each line as its item finishes (the invocation is recorded first: a killed
    #    run leaves one without "finished" and without request counts)
    invocation = {"started": _now(), "finished": None, "items": len(items), "kept": len(items) - len(todo),
                  "judged": len(todo)}
    run["invocations"].append(invocation)
    atomic_write_bytes(out / RUN_FILE, (json.dumps(run, indent=1) + "\n").encode())
    stats: dict[str, Any] = {}
    f = open(out / RESULTS_FILE, "ab")
    try:
        def write(line: dict) -> None:
            line["item_hash"] = hashes[line["id"]]
            done[line["id"]] = line
            f.write((_dumps(line) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

        with progress_bar(progress, len(todo), f"judging {bench.title}") as advance:
            if bench.kind in ("exact", "external"):
                for it in todo:
                    write(external_line(bench, it) if bench.kind == "external" else _exact_or_bad_image(bench, it))
                    advance()
            else:
                cache_path = Path(cfg.cache) if cfg.cache else out / CACHE_FILE
                stats = asyncio.run(_judge_all(bench, todo, judge_config, cache_path, api_key, write, advance, prompts))
    finally:
        f.close()

    # 3. final results in benchmark order, summary, invocation record
    results = [done[i] for i in order]
    atomic_write_bytes(out / RESULTS_FILE, "".join(_dumps(r) + "\n" for r in results).encode())
    summary = build_summary(bench, run, results, coverage, cfg.n_boot, cfg.seed)
    atomic_write_bytes(out / SUMMARY_FILE, (json.dumps(summary, indent=1) + "\n").encode())
    invocation.update(finished=_now(), **stats)
    atomic_write_bytes(out / RUN_FILE, (json.dumps(run, indent=1) + "\n").encode())
    return summary


async def _judge_all(bench, todo, judge_config, cache_path, api_key, write, advance, prompts=None) -> dict:
    judge = Judge(judge_config, cache_path=cache_path, api_key=api_key)
    # Items in flight are bounded (their decoded images live in memory); the client bounds requests.
    gate = asyncio.Semaphore(max(2, 2 * judge_config.max_concurrency))

    async def one(it: Item) -> None:
        async with gate:
            if it.sample is None:
                line = missing_line(bench, it)
            elif it.error is not None:
                line = missing_line(bench, it, "bad_image")
            else:
                try:
                    line = await judge_item(bench, it, judge, prompts)
                except ImageError as e:  # an image that exists but does not decode: this item only
                    it.error = str(e)
                    line = missing_line(bench, it, "bad_image")
                it.sample._bytes.clear()  # the decoded images are not needed any more
        write(line)
        advance()

    try:
        await asyncio.gather(*(one(it) for it in todo))
    finally:
        await judge.aclose()
        judge.close()
    return {"judge_requests": judge.stats.get("requests", 0), "cache_hits": judge.stats.get("cache_hits", 0),
            "http_requests": judge.http_requests,
            "request_states": {k: judge.stats.get(k, 0) for k in ("ok", "api_error", "refusal", "unparsable")}}


def build_summary(bench: Benchmark, run: dict, results: list[dict], coverage: dict, n_boot: int, seed: int) -> dict:
    s = summarize(results, bench.metric_names(), n_boot=n_boot, seed=seed, mean_of=bench.mean_of(),
                  over_categories=bench.over_categories())
    s["name"] = run["name"]
    s["benchmark"] = {"name": bench.name, "version": bench.version, "title": bench.title, "sha256": bench.sha256,
                      "source": bench.source, "metrics": [{"name": m.name, "description": m.description}
                                                          for m in bench.metrics]}
    s["settings"] = run["settings"]
    s["coverage"] = dict(coverage, missing=sum(1 for r in results if r.get("missing")
                                               or all(v["state"] in ("missing", "not_applicable")
                                                      for v in r["metrics"].values())
                                               and any(v["state"] == "missing" for v in r["metrics"].values())))
    return s
