"""Adapters: put any system's outputs on a benchmark as records (DESIGN section 3).

Three ways in:

1. ``import_outputs(src, out)``: another system's outputs, already generated, become a DuetGen
   dataset. ``src`` is a DuetGen dataset, a CoMM results folder (``<id>/results.json``), or a plain
   folder of ``*.jsonl`` record files whose image paths are relative to that folder (the simplest
   thing to write from any codebase). ``duetgen eval run --pred`` also reads the first two as
   they are; importing validates everything once and stores the images content-addressed.
2. ``run_model(model, prompts, out)``: run a model that implements ``Model`` on the benchmark
   prompts and write its answers (resumable: ids already in ``out`` are skipped).
3. ``generate_benchmark(DuetGenModel.from_pretrained(dir), "shapeworld", out, truth=...)``
   (``duetgen eval generate``): a DuetGen checkpoint on a benchmark's inputs, through
   ``run_model``, with its settings recorded in ``out/generation.json``. GenEval is written in
   GenEval's own output layout instead (``generate_geneval``), for its own scorer.

Single-image benchmarks (GenEval, ImgEdit, GEdit-Bench) do not rely on the free-running model to
draw exactly one image: DuetGen's answer is forced to ``<BOV>`` first and end of turn after the
image (``DuetGenModel(structure="one_image")``), every other choice being the model's own.

Design choices:
- A narrow, fixed model interface (lm-evaluation-harness's ``LM``): subclass ``Model`` and write
  ``generate(request, item_id) -> Answer``. The model gets the request messages with input images as
  PIL RGB images and the item's id (DuetGen seeds each item from it; others may ignore it), and returns
  the answer's parts (text, and images as PIL or encoded bytes) with the meta that says how it was made.
  It never sees benchmark files or paths. ``structure``, ``path`` and ``settings()`` have defaults; the
  runner asks nothing else of a model and never inspects its signature.
- Outputs carry the request (with its input images) plus the answer, so an output dataset is a
  self-contained record of what was asked and answered; ``meta`` keeps the prompt's meta
  (category, ...) and adds the model's name.
- Shards are committed every ``shard_size`` records, so a crash loses at most one open shard and a
  rerun continues after the last committed record.
- The model sees only the request: the messages up to the last user turn (``split_record``). For
  ground-truth benchmarks (ShapeWorld, whose inputs are the truth records) an assistant turn
  before the last user turn would be part of the truth, so such an item is refused up front.
- DuetGen's seed is derived per item from its id (sha256 of ``"{seed}:{id}"``): an answer does not
  depend on which items ran before it, so a resumed, limited or reordered run writes the same
  answer for the same item as one uninterrupted run.
- ``generation.json`` binds a prediction folder to one model (sha256 of every file of its
  directory) and one set of resolved settings; resuming with another is refused (the
  ``eval run`` rule for judge settings), so a folder never mixes two models' answers.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterable

from duetgen.data.dataset import (MAX_RECORD_LINE_BYTES, Dataset, DatasetWriter, atomic_write_bytes,
                                  building_new_dataset, json_problem)
from duetgen.data.record import ImagePart, Message, Part, Record, RecordError, TextPart
from duetgen.eval.benchmarks.readers import (ImageFolder, ImageSource, ReaderError, TableImages, file_inside,
                                             is_comm_results_dir, read_comm_results, read_gedit,
                                             read_geneval_metadata, read_imgedit, read_interleavedbench, read_records)

MAX_JSONL_BYTES = 1024 * 1024 * 1024  # one record file of a plain folder; records are streamed line by line
GENERATION_FILE = "generation.json"  # in a prediction folder written by generate_benchmark
GENERATION_FORMAT = "duetgen-eval-generation"
SEED_RULE = "int(sha256(f'{seed}:{item_id}')[:8], 16) >> 1"  # recorded with the settings; see item_seed


class AdapterError(ValueError):
    """Bad inputs or settings for generating on a benchmark. The message names the input."""


@dataclass
class Answer:
    """One answer of a ``Model``: the assistant's interleaved parts, in order (image parts hold PIL images or
    encoded PNG/JPEG/WebP bytes), and how they were made (stored under the output's ``meta["generator"]``)."""

    parts: list[Part]
    meta: dict = field(default_factory=dict)


class Model:
    """What runs on a benchmark. Subclass it, set ``name`` and write ``generate``."""

    name: str = "model"  # shown in reports and stored in every output record's meta
    # "free": the model answers as it likes; "one_image": it draws exactly one image per answer (GenEval,
    # ImgEdit and GEdit-Bench refuse a free one)
    structure: str = "free"
    path: str | os.PathLike | None = None  # the model's directory, recorded in generation.json (None: none)

    def generate(self, request: list[Message], item_id: str) -> Answer:
        """The answer to ``request`` (input images are PIL RGB images); ``item_id`` is the benchmark item's id."""
        raise NotImplementedError(f"{type(self).__name__}.generate")

    def settings(self) -> dict:
        """What fixes the answers, bound to a prediction folder: {"model": {...}, "generation": {...}}."""
        return {"model": {}, "generation": {}}


# ----------------------------------------------------------------------------- importing outputs
def _iter_jsonl_folder(src: Path) -> Iterable[Record]:
    files = sorted(src.glob("*.jsonl"))
    if not files:
        raise ReaderError(f"{src}: no *.jsonl record files")
    for path in files:
        file_inside(src, path)  # a symlink out of the folder (to a secret, to /dev/zero) is refused
        if path.stat().st_size > MAX_JSONL_BYTES:
            raise ReaderError(f"{path}: over the cap of {MAX_JSONL_BYTES:,} bytes")
        with open(path, "rb") as f:
            for lineno, raw in enumerate(iter(lambda: f.readline(MAX_RECORD_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_RECORD_LINE_BYTES:  # images are paths, so a record line is small
                    raise ReaderError(f"{path}:{lineno}: a line over the cap of {MAX_RECORD_LINE_BYTES:,} bytes")
                if not raw.strip():
                    continue
                try:
                    yield Record.from_json(json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError as e:
                    raise ReaderError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
                except json.JSONDecodeError as e:
                    raise ReaderError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                except RecordError as e:
                    raise ReaderError(f"{path}:{lineno}: {e}") from None
                except (ValueError, RecursionError) as e:  # a 4,300-digit integer; nesting past the stack
                    raise ReaderError(f"{path}:{lineno}: unreadable JSON ({json_problem(e)})") from None


def _with_loaded_images(rec: Record, images: ImageSource) -> Record:
    """A copy whose image parts hold the stored bytes (checked by the source), ready for a writer."""
    messages = []
    for m in rec.messages:
        parts = []
        for p in m.content:
            if isinstance(p, ImagePart):
                images.open_image(p.path, rec.id)  # containment, format and pixel cap, before the bytes are trusted
                # capped reads (a PNG padded to 400 MB was stored whole); a table's images (GEdit-Bench) have no file
                read = images.read_image_bytes if isinstance(images, Dataset) else images.read_bytes
                data = read(p.path, rec.id)
                parts.append(ImagePart(data))
            else:
                parts.append(TextPart(p.text))
        messages.append(Message(m.role, parts))
    return Record(id=rec.id, messages=messages, source=rec.source, meta=dict(rec.meta))


def import_outputs(src: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                   shard_size: int = 1000) -> int:
    """Validate another system's outputs and write them as a new DuetGen dataset; return the count."""
    src = Path(src)
    if (src / "manifest.json").is_file():
        records, images = read_records(src)
    elif is_comm_results_dir(src):
        records, images = read_comm_results(src)
    elif src.is_dir():
        records, images = _iter_jsonl_folder(src), ImageFolder(src)
    else:
        raise ReaderError(f"{src}: not a directory")
    n = 0
    seen: set[str] = set()
    # all or nothing: a record that fails validation leaves no dataset that a run would take for the whole
    with building_new_dataset(out) as building, \
            DatasetWriter(building, shard_size=shard_size, name=name or src.name) as w:
        for rec in records:
            if rec.id in seen:
                raise ReaderError(f"{src}: record id {rec.id!r} appears twice")
            seen.add(rec.id)
            if name is not None:
                rec.meta.setdefault("model", name)
            w.write(_with_loaded_images(rec, images))
            n += 1
    return n


# ----------------------------------------------------------------------------- running a model
def read_prompts(prompts: str | os.PathLike, images: str | os.PathLike | None = None, prompts_format: str = "records",
                 language: str | None = None) -> tuple[list[Record], ImageSource]:
    """Benchmark prompts: a dataset directory, an InterleavedBench JSON file, ImgEdit's
    basic_edit.json (``prompts_format="imgedit_json"``) or a GEdit-Bench copy (``"gedit_dataset"``)."""
    p = Path(prompts)
    if prompts_format == "imgedit_json":
        return read_imgedit(p, images)
    if prompts_format == "gedit_dataset":
        return read_gedit(p, language or "en")
    if p.is_file() and p.suffix == ".json":
        return read_interleavedbench(p, images)
    return read_records(p)


def run_model(model: Model, prompts: str | os.PathLike, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
              limit: int | None = None, shard_size: int = 50, progress: bool = True, prompts_format: str = "records",
              language: str | None = None) -> int:
    """Run ``model`` on every prompt not yet answered in ``out``; return how many were generated."""
    if not isinstance(model, Model):
        raise TypeError(f"{type(model).__name__} is not a duetgen.eval.adapters.Model (subclass it: name, generate)")
    records, source = read_prompts(prompts, images, prompts_format, language)
    if limit is not None:
        records = records[:limit]
    done = {r.id for r in Dataset(out)} if (Path(out) / "manifest.json").is_file() else set()
    todo = [r for r in records if r.id not in done]
    from duetgen.eval.harness import split_record
    from duetgen.progress import progress_bar

    n = 0
    with DatasetWriter(out, shard_size=shard_size, append=True, name=model.name) as w, \
            progress_bar(progress, len(todo), f"generating with {model.name}") as advance:
        for rec in todo:
            request, _ = split_record(rec)  # a prompt with a reference answer: only the request goes in
            shown = [Message(m.role, [ImagePart(source.open_image(p.path, rec.id)) if isinstance(p, ImagePart)
                                      else TextPart(p.text) for p in m.content]) for m in request]
            answer = _checked(model.generate(shown, rec.id), model, rec.id)
            stored = _with_loaded_images(Record(rec.id, request, rec.source, rec.meta), source)
            meta = dict(rec.meta, model=model.name, **({"generator": answer.meta} if answer.meta else {}))
            out_rec = Record(id=rec.id, source=model.name, meta=meta,
                             messages=stored.messages + [Message("assistant", answer.parts)])
            w.write(out_rec)
            n += 1
            advance()
    return n


def _checked(answer, model: Model, item_id: str) -> Answer:
    if not (isinstance(answer, Answer) and isinstance(answer.parts, list)
            and all(isinstance(p, (TextPart, ImagePart)) for p in answer.parts)):
        raise TypeError(f"{model.name}.generate must return an Answer of TextPart / ImagePart parts (item {item_id!r})")
    return answer


# ----------------------------------------------------------------------------- a DuetGen checkpoint
def item_seed(seed: int, item_id: str) -> int:
    """The seed of one benchmark item: fixed by the run's seed and the item's id alone (SEED_RULE)."""
    return int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()[:8], 16) >> 1  # < 2**31


def model_fingerprint(root: str | os.PathLike) -> str:
    """sha256 over every file of a model directory (relative path and bytes), streamed.

    One more sequential read of the weights (loading reads them too) per invocation, against hours
    of generation; sizes alone would not tell a checkpoint retrained in place from the old one."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\x00")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\x00")
    return h.hexdigest()


class DuetGenModel(Model):
    """A DuetGen checkpoint as a ``Model``: one loaded pipeline, fixed settings, one seed per item.

    >>> model = DuetGenModel.from_pretrained("checkpoints/shapeworld-toy", num_steps=10)
    >>> generate_benchmark(model, "shapeworld", "preds/sw", truth="shapeworld-test/")
    """

    def __init__(self, pipe, config=None, name: str | None = None, path: str | os.PathLike | None = None,
                 structure: str = "free"):
        if structure not in ("free", "one_image"):
            raise ValueError(f"structure must be 'free' or 'one_image', got {structure!r}")
        self.pipe = pipe  # a duetgen.infer.pipeline.DuetGenPipeline
        self.structure = structure  # "one_image": <BOV> first, end of turn after the image (editing, text-to-image)
        self.config = pipe.config(config, {})  # a checked GenerationConfig; its seed is the run's base seed
        self.name = name or Path(path or pipe.model_id).name
        self.path = None if path is None else Path(path)
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, name: str | None = None, device: str = "cpu",
                        dtype=None, structure: str = "free", **settings) -> "DuetGenModel":
        """Load a DuetGen directory; ``settings`` are GenerationConfig fields (``num_steps=10, seed=3``).
        A bad directory raises ``ModelDirectoryError`` naming it; a bad setting, ``ValueError``."""
        from duetgen.infer.pipeline import DuetGenPipeline

        pipe = DuetGenPipeline.from_pretrained(path, device=device, dtype=dtype)
        return cls(pipe, pipe.config(None, settings), name=name or Path(path).resolve().name, path=path,
                   structure=structure)

    def generate(self, request: list[Message], item_id: str) -> Answer:
        """The pipeline's answer to ``request``, seeded by ``item_id``; its meta says how it was made."""
        from duetgen.eval.harness import split_record

        config = dataclasses.replace(self.config, seed=item_seed(self.config.seed, item_id))
        if self.structure == "free":
            record = self.pipe(request, config, record_id=item_id)
        else:
            messages = self.pipe.messages(request, ())
            finished = self.pipe.engine.run(messages, config, logits_processor=self._one_image())
            record = self.pipe.record(messages, finished, config, item_id)
        return Answer(split_record(record)[1], record.meta)

    def _one_image(self):
        """logits_processor: <BOV> as the first token, end of turn as the first after the image."""
        import torch

        from duetgen.models.mllm import TokenIds

        ids = TokenIds.from_tokenizer(self.pipe.model.tokenizer)

        def processor(generated, logits):
            out = torch.full_like(logits, float("-inf"))
            out[ids.im_end if ids.bov in generated else ids.bov] = 0.0
            return out
        return processor

    def settings(self) -> dict:
        """What fixes the answers: the model's identity and every generation setting, resolved
        against the model's defaults (so "the model's steps" is recorded as a number)."""
        if self._fingerprint is None and self.path is not None:
            self._fingerprint = model_fingerprint(self.path)
        c, model = self.config, self.pipe.model
        resolved = c.resolve(model.config, model.pixel_multiple)  # what the engine runs with
        generation = {
            "seed": c.seed, "seed_rule": SEED_RULE,
            "temperature": c.temperature, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
            # None: as many as the model's frame budget (inputs + generated) leaves after the prompt's images
            "max_images": c.max_images, "model_max_images": model.config.max_images,
            "sampler": dataclasses.asdict(resolved.sampler),
            "guidance_scale": resolved.guidance_for(True),  # of images drawn with earlier images
            "image_size": list(resolved.image_size),
        }
        generation["structure"] = self.structure
        return {"model": {"fingerprint": self._fingerprint, "preset": model.config.preset}, "generation": generation}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def benchmark_inputs(bench, prompts, truth, images) -> tuple[str, str]:
    """(the inputs' path, the flag that gave it), following ``duetgen eval run``'s rules; a path that does
    not exist is refused here, before a model loads."""
    path, flag = _benchmark_inputs(bench, prompts, truth, images)
    for f, p in ((flag, path), ("--images", images)):
        if p is not None and not Path(p).exists():
            raise AdapterError(f"{f} {str(p)!r}: no such file or directory")
    return path, flag


def _benchmark_inputs(bench, prompts, truth, images) -> tuple[str, str]:
    if bench.kind == "exact":
        if prompts is not None or images is not None:
            raise AdapterError(f"benchmark {bench.name!r} takes its inputs from the ground truth: "
                               "give --truth DIR (not --prompts/--images)")
        if truth is None:
            raise AdapterError(f"benchmark {bench.name!r}: give --truth DIR (the ground-truth dataset; "
                               "only its user turns are shown to the model)")
        return str(truth), "--truth"
    if truth is not None:
        raise AdapterError(f"--truth is for exact benchmarks; {bench.name!r} is judged (use --prompts)")
    if bench.prompts_format == "none":
        raise AdapterError(f"benchmark {bench.name!r} has no prompts to generate from: its inputs come inside "
                           "the predictions (CoMM's results.json); run CoMM's pipeline and `duetgen eval import`")
    if prompts is None:
        raise AdapterError(f"benchmark {bench.name!r}: give --prompts (its inputs)")
    if bench.prompts_format == "geneval_metadata" and images is not None:
        raise AdapterError(f"benchmark {bench.name!r} has text-only prompts; drop --images")
    return str(prompts), "--prompts"


def _check_items(bench, records: list[Record], where: str, images: ImageSource | None = None) -> None:
    """Every item is askable before anything is generated: a bad item 180 fails now, not in hour 3 (its
    shape, and with ``images`` every input image's path: inside its root, present)."""
    from duetgen.eval.harness import split_record

    for rec in records:
        request, _ = split_record(rec)
        if images is not None and not isinstance(images, TableImages):  # (a table's images have no path to check)
            for m in request:
                for p in m.content:
                    if isinstance(p, ImagePart) and isinstance(p.image, str):
                        images.image_path(p.image, rec.id)  # ImageError (a RecordError) naming the record
        if bench.kind == "exact" and any(m.role != "user" for m in request):
            raise AdapterError(f"{where}: item {rec.id!r} has an assistant turn before its last user turn; "
                               f"{bench.name!r} items are single requests and their assistant turns are the truth, "
                               "which the model must not see")
        n = sum(isinstance(p, ImagePart) for m in request if m.role == "user" for p in m.content)
        if bench.input_images == "required" and n == 0:
            raise AdapterError(f"{where}: item {rec.id!r}: benchmark {bench.name!r} requires an input image")
        if bench.input_images == "forbidden" and n:
            raise AdapterError(f"{where}: item {rec.id!r}: benchmark {bench.name!r} has text-only inputs; "
                               f"this one has {n} image(s)")


def _open_generation_file(out: Path, bound: dict) -> dict:
    """The folder's generation.json, created or checked against ``bound`` (benchmark, model, settings)."""
    path = out / GENERATION_FILE
    if path.exists():
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise AdapterError(f"{path}: unreadable ({e})") from None
        if not isinstance(run, dict) or run.get("format") != GENERATION_FORMAT:
            raise AdapterError(f"{path}: not a DuetGen generation file")
        if "inputs" not in run:  # written before the inputs were bound: bound from now on
            run["inputs"] = bound.get("inputs")
        for key, value in bound.items():
            if run.get(key) != value:
                raise AdapterError(f"{out} holds answers made with different {key} settings "
                                   f"({json.dumps(run.get(key), sort_keys=True)[:300]} vs "
                                   f"{json.dumps(value, sort_keys=True)[:300]}); use a new --out")
        return run
    if (out / "manifest.json").exists():
        raise AdapterError(f"{out} holds a dataset that `duetgen eval generate` did not write "
                           f"(no {GENERATION_FILE}); use a new --out")
    return {"format": GENERATION_FORMAT, "format_version": 1, "created": _now(), **bound, "invocations": []}


def _default_images(bench, source, images):
    """The image root the readers use: ``--images``, or the prompts file's folder (InterleavedBench, ImgEdit)."""
    p = Path(source)
    if images is None and p.is_file() and (bench.prompts_format == "imgedit_json" or p.suffix == ".json"):
        return p.parent  # (read_prompts' own rule: ImgEdit's file, or any JSON read as InterleavedBench's)
    return images


def _generation_inputs(source, images, language) -> dict:
    """What a prediction folder's answers were made from (by resolved path): another --prompts, --truth or
    --images on a rerun is refused, or answers made from one set of source images would be judged against
    another's."""
    return {"prompts": str(Path(source).resolve()), "images": None if images is None else str(Path(images).resolve()),
            "language": language}


SINGLE_IMAGE_FORMATS = ("imgedit_json", "gedit_dataset", "geneval_metadata")  # benchmarks of one image per answer


def generate_geneval(model: Model, metadata: str | os.PathLike, out: str | os.PathLike, *, samples: int = 4,
                     limit: int | None = None, progress: bool = True, benchmark: dict | None = None) -> int:
    """GenEval's own output layout, which its ``evaluate_images.py`` scores unchanged:
    ``out/<5-digit prompt index>/metadata.jsonl`` (the prompt's JSON object) and
    ``out/<index>/samples/<5-digit sample>.png``; sample j of prompt i is seeded from the id
    ``"<index>/<j>"``. Resume: a prompt folder with all its samples is skipped (files are written
    atomically, metadata last; the folder's ``generation.json``, which GenEval's scorer skips, binds it to
    the model, its settings, the prompts file and ``samples``, as for the other benchmarks). Returns the
    images generated."""
    from duetgen.progress import progress_bar

    if samples < 1:
        raise AdapterError(f"--samples must be >= 1, got {samples}")
    if model.structure != "one_image":
        raise AdapterError("geneval takes one image per answer: give a model with structure='one_image'")
    prompts = read_geneval_metadata(metadata)[:limit]
    out = Path(out)
    settings = model.settings()
    bound = {"benchmark": benchmark or {"name": "geneval"}, "model": settings["model"],
             "generation": {**settings["generation"], "samples": samples},
             "inputs": _generation_inputs(metadata, None, None)}
    run = _open_generation_file(out, bound)
    run["name"] = model.name
    invocation = {"started": _now(), "limit": limit,
                  "model_path": None if model.path is None else str(Path(model.path).resolve())}
    run["invocations"].append(invocation)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / GENERATION_FILE, (json.dumps(run, indent=1) + "\n").encode())
    todo = [(i, j) for i in range(len(prompts)) for j in range(samples)
            if not (out / f"{i:05d}" / "samples" / f"{j:05d}.png").is_file()]
    n = 0
    with progress_bar(progress, len(todo), f"generating GenEval images with {model.name}") as advance:
        for i, j in todo:
            folder = out / f"{i:05d}"
            item_id = f"{i:05d}/{j}"
            answer = _checked(model.generate([Message("user", [TextPart(prompts[i]["prompt"])])], item_id), model,
                              item_id)
            image = next((p for p in answer.parts if isinstance(p, ImagePart)), None)
            if image is None:
                raise AdapterError(f"{model.name} drew no image for GenEval prompt {i} ({prompts[i]['prompt']!r})")
            import io

            buf = io.BytesIO()
            (image.image if hasattr(image.image, "save") else _decode(image.image)).save(buf, format="PNG")
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / "samples" / f"{j:05d}.png", buf.getvalue())
            atomic_write_bytes(folder / "metadata.jsonl", json.dumps(prompts[i]).encode())
            n += 1
            advance()
    invocation.update(finished=_now(), generated=n)
    atomic_write_bytes(out / GENERATION_FILE, (json.dumps(run, indent=1) + "\n").encode())
    return n


def _decode(data):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def generate_benchmark(model: Model, benchmark: str, out: str | os.PathLike, *, prompts: str | os.PathLike | None = None,
                       truth: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                       limit: int | None = None, shard_size: int = 50, progress: bool = True, samples: int = 1,
                       language: str | None = None) -> int:
    """Answer a benchmark's inputs with ``model`` into the prediction folder ``out`` (for ``eval run
    --pred``); rerun to resume. Returns how many answers this call generated."""
    from duetgen.eval.benchmarks import load_benchmark

    bench = load_benchmark(benchmark)
    source, flag = benchmark_inputs(bench, prompts, truth, images)
    if bench.prompts_format == "geneval_metadata":
        return generate_geneval(model, source, out, samples=samples, limit=limit, progress=progress,
                                benchmark={"name": bench.name, "version": bench.version})
    if samples != 1:
        raise AdapterError(f"--samples is for geneval (images per prompt); {bench.name!r} has one answer per item")
    if language is not None and bench.prompts_format != "gedit_dataset":
        raise AdapterError(f"--language is for gedit; {bench.name!r} has no language subsets")
    records, prompt_images = read_prompts(source, images, bench.prompts_format, language)
    _check_items(bench, records[:limit], f"{flag} {source}", prompt_images)
    if bench.prompts_format in SINGLE_IMAGE_FORMATS and model.structure != "one_image":
        raise AdapterError(f"benchmark {bench.name!r} takes one edited image per item: give a model with "
                           "structure='one_image' (duetgen eval generate does)")

    out = Path(out)
    settings = model.settings()
    bound = {"benchmark": {"name": bench.name, "version": bench.version},
             "model": settings["model"], "generation": settings["generation"],
             "inputs": _generation_inputs(source, _default_images(bench, source, images),
                                          language or ("en" if bench.prompts_format == "gedit_dataset" else None))}
    run = _open_generation_file(out, bound)
    run["name"] = model.name
    invocation = {"started": _now(), "inputs": str(Path(source).resolve()), "limit": limit,
                  "model_path": None if model.path is None else str(Path(model.path).resolve())}
    run["invocations"].append(invocation)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / GENERATION_FILE, (json.dumps(run, indent=1) + "\n").encode())
    n = run_model(model, source, out, images=images, limit=limit, shard_size=shard_size, progress=progress,
                  prompts_format=bench.prompts_format, language=language)
    invocation.update(finished=_now(), generated=n)
    atomic_write_bytes(out / GENERATION_FILE, (json.dumps(run, indent=1) + "\n").encode())
    return n
