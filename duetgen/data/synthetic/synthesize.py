"""Send query-pool requests to an image-capable API and write the answers as a dataset.

    requests.jsonl --> template (howto | dish) --> image API --> quality filters --> dataset
                                                                       \\--> drop reason + cost

A request line is ``{"id": str, "prompt": str, "kind": "howto"|"dish", "images": [paths]?, ...}``
(``expand`` and ``dish-prompts`` write them). Extra keys (domain, subcategory, title) go to the
record's meta. ``images`` are paths relative to ``image_root``.

Design choices:
- Resumable (datatrove-style completion markers): a request is done when its record is committed
  in the output dataset, or when the progress log says it was dropped (refused, filtered). API
  errors are never marked, so the next run retries them; dropped requests are not paid for again
  unless ``retry_dropped``. Every kept answer is also journaled as it arrives (``ANSWERS_FILE``:
  its images fsync'ed first, then the record's line; emptied whenever its answers are committed, so
  it holds at most the open shard's), so a killed run loses no paid answer: the next run commits
  the journaled answers first, without asking again (an audit found a SIGKILL before the 200-record
  commit paid for up to 200 answers twice, and the all-runs cost left them out).
- Bad input never stops the run: malformed request lines, unreadable user images, refusals,
  image-less replies and non-image parts are skipped with a reason in the run report.
- Bounded memory: a fixed pool of workers pulls requests, so only ``2 x max_concurrency``
  requests (and their images) are in memory at once.
- Cost: every answered request (kept or dropped) adds its cost; the report gives this run's cost
  and the total over all runs into the same output (from record metas and the progress log).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from duetgen.data.dataset import (MAX_RECORD_LINE_BYTES, DatasetError, DatasetWriter, capped_lines, fsync_files,
                                  json_problem)
from duetgen.data.images import DEFAULT_MAX_PIXELS, ImageError, inspect_image
from duetgen.data.record import Record, RecordError
from duetgen.data.synthetic.quality import QualityConfig, build_record
from duetgen.data.synthetic.runlog import ProgressLog, RunReport, committed_records

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATES = {"howto": "synthesize_howto", "dish": "synthesize_dish"}
PROGRESS_FILE = "synthesis-progress.jsonl"
ANSWERS_FILE = "synthesis-answers.jsonl"  # answers received and not committed yet (the open shard's)


@dataclass
class SynthesisConfig:
    temperature: float = 1.0  # sampling temperature sent to the image API
    seed: int = 0  # per-request API seeds derive from it and the request id
    limit: int | None = None  # process at most this many not-yet-done requests
    shard_size: int = 200  # records per committed shard (a crash loses at most one open shard)
    retry_dropped: bool = False  # ask again for requests a previous run dropped (refused / filtered)
    max_user_image_bytes: int = 20 << 20  # user photos larger than this are skipped
    quality: QualityConfig = field(default_factory=QualityConfig)


def load_requests(path: str | Path, image_root: str | Path | None, report: RunReport) -> list[dict[str, Any]]:
    """Parse a requests JSONL; bad lines are skipped with a reason (``bad_request``, ``duplicate_id``)."""
    path = Path(path)
    try:
        f = open(path, "rb")  # line by line, each capped: a 300 MB line was read whole
    except OSError as e:
        raise RecordError(f"requests file {str(path)!r} cannot be read ({e})") from None
    out, seen = [], set()
    with f:
        for n, raw in enumerate(capped_lines(f, MAX_RECORD_LINE_BYTES), 1):
            where = f"{path.name}:{n}"
            if raw is None:
                report.skip(where, "bad_request", f"a line over the cap of {MAX_RECORD_LINE_BYTES:,} bytes")
                continue
            if not raw.strip():
                continue
            try:
                r = json.loads(raw)
            except json.JSONDecodeError as e:
                report.skip(where, "bad_request", f"not JSON ({e.msg})")
                continue
            except (ValueError, RecursionError) as e:  # not UTF-8; a 4,300-digit integer; nesting past the stack
                report.skip(where, "bad_request", f"not readable JSON ({json_problem(e)})")
                continue
            problem = _request_problem(r)
            if problem:
                report.skip(where, "bad_request", problem)
                continue
            if r["id"] in seen:
                report.skip(where, "duplicate_id", r["id"])
                continue
            if r.get("images") and image_root is None:
                report.skip(where, "bad_request", "request has images but no image root was given")
                continue
            seen.add(r["id"])
            r.setdefault("kind", "dish" if r.get("images") else "howto")
            out.append(r)
    return out


def _request_problem(r: Any) -> str:
    if not isinstance(r, dict):
        return "a request must be a JSON object"
    if not isinstance(r.get("id"), str) or not r["id"].strip() or "/" in r["id"]:
        return f"'id' must be a non-empty string without '/', got {r.get('id')!r}"
    if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
        return "'prompt' must be a non-empty string"
    if r.get("kind", "howto") not in TEMPLATES:
        return f"'kind' must be one of {sorted(TEMPLATES)}, got {r.get('kind')!r}"
    imgs = r.get("images", [])
    if not isinstance(imgs, list) or not all(isinstance(p, str) for p in imgs):
        return "'images' must be a list of paths"
    if r.get("kind") == "dish" and len(imgs) != 1:
        return "a dish request needs exactly one image"
    return ""


def read_user_image(image_root: Path, rel: str, cfg: SynthesisConfig) -> bytes:
    """The bytes of a user image, refused if it leaves the root, is too big or is not an image."""
    if "\0" in rel:  # (legal in JSON; resolving it raises ValueError)
        raise ImageError(f"image {rel!r} holds a NUL character")
    root = image_root.resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root):
        raise ImageError(f"image {rel!r} resolves outside the image root {str(image_root)!r}")
    if not p.is_file():
        raise ImageError(f"image {rel!r} not found under {str(image_root)!r}")
    if p.stat().st_size > cfg.max_user_image_bytes:
        raise ImageError(f"image {rel!r} is {p.stat().st_size:,} bytes, over {cfg.max_user_image_bytes:,}")
    data = p.read_bytes()
    inspect_image(io.BytesIO(data), f"image {rel!r}", DEFAULT_MAX_PIXELS)
    return data


def _request_seed(run_seed: int, request_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{run_seed}/{request_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def done_requests(out_dir: Path, retry_dropped: bool) -> tuple[set[str], float]:
    """(request ids that need no new call, cost already spent on this output by earlier runs)."""
    done, spent = set(), 0.0
    for rec in committed_records(out_dir):
        rid = rec.meta.get("request_id")
        if isinstance(rid, str):
            done.add(rid)
            spent += float(rec.meta.get("cost_usd") or 0.0)
    for e in ProgressLog(out_dir / PROGRESS_FILE).entries():
        spent += float(e.get("cost_usd") or 0.0)  # dropped answers, and journaled answers lost (paid all the same)
        if e.get("status") == "dropped" and not retry_dropped:
            done.add(e["key"])
    return done, spent


def commit_journaled_answers(out_dir: Path, shard_size: int, report: RunReport) -> None:
    """Commit the answers an earlier run received and journaled but did not commit (killed with its shard open):
    their images are in the dataset already; nothing is asked again. An entry that no longer makes a valid
    record (an image lost with the machine) is ``lost_answer``: its cost goes to the progress log, and its request
    is asked again. The journal is empty afterwards."""
    journal = ProgressLog(out_dir / ANSWERS_FILE)
    if not journal.path.exists() or not journal.path.stat().st_size:
        return
    lost = []
    with DatasetWriter(out_dir, shard_size=shard_size, append=True, name=out_dir.name) as writer:
        committed = {r.meta.get("request_id") for r in committed_records(out_dir)}  # (under the writer's lock)
        for e in journal.entries():
            if e["key"] in committed:
                continue  # committed before the journal was emptied (killed in between)
            try:
                writer.write(Record.from_jsonl_line(e["record"]))
            except OSError:  # a full disk: the writer dropped its open shard, so stop and keep the journal whole
                raise
            except (KeyError, TypeError, ValueError, RecordError, ImageError, DatasetError) as err:
                report.skip(e["key"], "lost_answer", f"its journaled answer cannot be committed ({err}); asked again")
                lost.append({"key": e["key"], "status": "lost", "cost_usd": float(e.get("cost_usd") or 0.0)})
                continue
            committed.add(e["key"])
            report.count("committed_from_journal")
    for entry in lost:  # logged once the replay is through: a stopped replay keeps them in the journal, unlogged
        ProgressLog(out_dir / PROGRESS_FILE).append(entry)
    journal.clear()  # every entry is committed now, or logged as lost


async def synthesize(requests: list[dict[str, Any]], client, out_dir: str | Path, cfg: SynthesisConfig,
                     image_root: str | Path | None = None, report: RunReport | None = None,
                     progress: bool = True) -> RunReport:
    """Run the requests not done yet; write records to ``out_dir``; return (and save) the report."""
    from duetgen.llm.templates import PromptTemplate

    out_dir = Path(out_dir)
    report = report or RunReport("synthesize")
    report.config.update({"model": client.model, "api": type(client).__name__, "synthesis": asdict(cfg)})
    templates = {k: PromptTemplate.load(v, root=TEMPLATE_DIR) for k, v in TEMPLATES.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    commit_journaled_answers(out_dir, cfg.shard_size, report)
    done, spent_before = done_requests(out_dir, cfg.retry_dropped)
    todo = [r for r in requests if r["id"] not in done]
    report.count("already_done", len(requests) - len(todo))
    if cfg.limit is not None:
        todo = todo[: cfg.limit]
    log = ProgressLog(out_dir / PROGRESS_FILE)
    cost = {"run": 0.0}
    try:
        await _run(todo, client, out_dir, cfg, image_root, report, templates, log, cost, progress)
    finally:
        await client.aclose()
        report.extra["cost_usd"] = {"this_run": round(cost["run"], 6), "all_runs": round(spent_before + cost["run"], 6)}
        report.extra["api_totals"] = dict(client.totals)
        report.save(out_dir)
    return report


async def _run(todo, client, out_dir, cfg, image_root, report, templates, log, cost, progress) -> None:
    answers = ProgressLog(out_dir / ANSWERS_FILE)
    with DatasetWriter(out_dir, shard_size=cfg.shard_size, append=True, name=out_dir.name) as writer:

        def drop(req: dict, reason: str, detail: str, paid: float) -> None:
            report.skip(req["id"], reason, detail)
            if reason not in ("api_error", "bad_input_image"):  # those are retried next run
                log.append({"key": req["id"], "status": "dropped", "reason": reason, "cost_usd": round(paid, 6)})

        async def one(req: dict) -> None:
            template = templates[req["kind"]]
            try:
                user_images = [read_user_image(Path(image_root), p, cfg) for p in req.get("images", [])]
            except (ImageError, OSError) as e:
                return drop(req, "bad_input_image", str(e), 0.0)
            fields: dict[str, Any] = {"question": req["prompt"]}
            if "photo" in template.fields():
                fields["photo"] = user_images
            messages = template.render(**fields)
            res = await client.agenerate(messages, temperature=cfg.temperature,
                                         seed=_request_seed(cfg.seed, req["id"]))
            cost["run"] += res.cost_usd
            rec, reason, detail = build_record(req, user_images, res, cfg.quality,
                                               {"template": template.version_key})
            if rec is None:
                return drop(req, reason, detail, res.cost_usd)
            try:
                writer.write(rec)
            except RecordError as e:  # e.g. an image the writer refuses: skip, keep going
                return drop(req, "bad_image", str(e), res.cost_usd)
            if writer.uncommitted:  # journaled until its shard commits (its images durable first)
                fsync_files([out_dir / p.path for p in rec.image_parts()])
                answers.append({"key": req["id"], "cost_usd": round(res.cost_usd, 6), "record": rec.to_jsonl_line()})
            else:  # this write committed the shard: every journaled answer is in the dataset now
                answers.clear()
            report.count("written")

        queue: asyncio.Queue = asyncio.Queue()
        for r in todo:
            queue.put_nowait(r)
        bar = _Bar(progress, len(todo), cost)

        failed: list[BaseException] = []

        async def worker() -> None:
            while not queue.empty() and not failed:
                req = queue.get_nowait()
                try:
                    await one(req)
                except Exception as e:  # a bug or a dead client: stop taking work, let paid requests land
                    failed.append(e)
                    return
                bar.advance()

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, 2 * client.max_concurrency))))
        finally:
            bar.close()
        if failed:
            raise failed[0]
    answers.clear()  # the writer committed its last shard on leaving the block
    report.extra["dataset_records"] = writer.num_records


class _Bar:
    """A rich progress bar that shows the money spent so far (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, cost: dict):
        self.cost, self.p = cost, None
        if enabled:
            from rich.progress import Progress

            self.p = Progress(transient=False)
            self.p.start()
            self.task = self.p.add_task("synthesize $0.00", total=total)

    def advance(self) -> None:
        if self.p is not None:
            self.p.update(self.task, advance=1, description=f"synthesize ${self.cost['run']:.2f}")

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
