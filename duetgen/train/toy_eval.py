"""ShapeWorld evaluation through the engine users run: answer truth prompts, score them with the exact judge.

    duetgen train eval-toy --model checkpoints/shapeworld-toy --truth runs/shapeworld/data/test --out runs/eval

Every number this module produces comes from `duetgen.infer.pipeline.DuetGenPipeline`, the object behind
`duetgen generate` and `duetgen serve` (one KV-cached `InterleavedEngine`, the model's own sampler,
guidance, image size and stop rules). There is no second decode loop: a record answered here equals
`duetgen generate PROMPT [--image CANVAS] --seed S` for the same prompt and seed (tests/test_toy_eval.py).

Three users:
1. `evaluate_toy`: answer every truth prompt (user turns only), write the answers as a dataset with the
   truth's record ids, score them with `duetgen.eval.toyworld_judge.evaluate` (T-Com, I-Com, I-Co,
   IT-Co, I-Q, U-Acc, per kind, with bootstrap intervals).
2. `draw_teacher_forced`: stage 2's samples. The truth conversation up to one answer image (its text
   and earlier images) is given as an assistant turn being continued; the engine is made to emit
   `<BOV>` at once (a logits hook), so the DiT draws that image from the truth context.
3. `greedy_answer_with_truth_images`: stage 1's samples. The MLLM writes; after each `<BOV>` the truth's
   image enters the context (the engine's `image_source` hook): an MLLM alone cannot draw.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from PIL import Image

from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.infer.engine import GenerationConfig


def truth_prompt(truth, rec: Record) -> list[Message]:
    """The user turns of a stored record, images loaded (through the dataset: its root is enforced)."""
    return [Message(m.role, [p if isinstance(p, TextPart) else ImagePart(truth.open_image(p.path, rec.id))
                             for p in m.content]) for m in rec.messages if m.role != "assistant"]


# ----------------------------------------------------------------------------- stage-2 samples


def force_bov_first(bov_id: int):
    """A logits hook that makes the first sampled token ``<BOV>`` (a teacher-forced draw)."""

    def hook(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if generated:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[..., bov_id] = 0.0
        return forced

    return hook


def draw_teacher_forced(pipe, messages: list[Message], config: GenerationConfig) -> Image.Image:
    """The image the model draws right after ``messages`` (the last one an assistant turn being continued,
    or a user turn): the engine's own draw, with ``<BOV>`` forced as the next token."""
    from duetgen.infer.engine import Finished

    config = dataclasses.replace(config, max_new_tokens=1, max_images=1)
    finished: Finished = pipe.engine.run(pipe.messages(messages), config,
                                         logits_processor=force_bov_first(pipe.engine.ids.bov))
    images = [p.image for p in finished.content if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise RuntimeError(f"teacher-forced draw made {len(images)} images ({finished.reason})")
    return images[0]


def teacher_forced_context(ds, rec: Record, image_index: int) -> tuple[list[Message], Image.Image]:
    """(the conversation right before assistant image ``image_index`` (0-based among the answer's images),
    the truth image)."""
    messages: list[Message] = []
    seen = 0
    for m in rec.messages:
        loaded = [p if isinstance(p, TextPart) else ImagePart(ds.open_image(p.path, rec.id)) for p in m.content]
        if m.role != "assistant":
            messages.append(Message(m.role, loaded))
            continue
        parts = []
        for p in loaded:
            if isinstance(p, ImagePart):
                if seen == image_index:  # the answer so far becomes an assistant turn being continued
                    if parts:
                        messages.append(Message("assistant", parts))
                    return messages, p.image
                seen += 1
            parts.append(p)
        messages.append(Message("assistant", parts))
    raise ValueError(f"record {rec.id!r} has no assistant image {image_index}")


# ----------------------------------------------------------------------------- stage-1 samples


def greedy_answer_with_truth_images(pipe, prompt: list[Message], truth_images: list[Image.Image],
                                    max_new_tokens: int) -> Message:
    """Greedy answer of the MLLM; the k-th ``<BOV>`` is followed by the truth's k-th image (none left: stop)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, max_images=len(truth_images), temperature=0.0)
    finished = pipe.engine.run(pipe.messages(prompt), config,
                               image_source=lambda k: truth_images[k] if k < len(truth_images) else None)
    return Message("assistant", list(finished.content) or [TextPart("")])


# ----------------------------------------------------------------------------- the evaluation


def evaluate_toy(model_dir: str | os.PathLike, truth_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 limit: int | None = None, kinds: list[str] | None = None, num_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, max_new_tokens: int = 512,
                 progress: bool = True, model=None) -> dict:
    """Answer every truth prompt through `DuetGenPipeline`, write the answers to ``out_dir/pred``, judge them.

    ``num_steps`` / ``guidance_scale``: None = the model's defaults (what `duetgen generate` uses). Every
    record is answered with ``seed`` (as `duetgen generate --seed`). ``model``: an already loaded
    `DuetGen` (else ``model_dir`` is loaded). Writes ``out_dir/pred`` (record ids = truth ids),
    ``out_dir/report.json`` and ``out_dir/pred.html``; wall time and settings go into the report's ``run``.
    """
    import shutil

    from duetgen.data.dataset import Dataset, DatasetWriter
    from duetgen.data.view import render_dataset_html
    from duetgen.eval import toyworld_judge
    from duetgen.infer.pipeline import DuetGenPipeline
    from duetgen.progress import progress_bar

    pipe = DuetGenPipeline.from_pretrained(model_dir) if model is None else DuetGenPipeline(model, str(model_dir))
    config = GenerationConfig(seed=seed, num_steps=num_steps, guidance_scale=guidance_scale,
                              max_new_tokens=max_new_tokens)
    truth = Dataset(truth_dir)
    out_dir = Path(out_dir)
    pred_dir = out_dir / "pred"
    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [rec for rec in truth if kinds is None or (rec.meta or {}).get("kind") in kinds]
    records = records[:limit] if limit is not None else records
    subset = limit is not None or kinds is not None
    start = time.perf_counter()
    with DatasetWriter(pred_dir, name="toy-eval") as writer, progress_bar(progress, len(records), "answering") as advance:
        for rec in records:
            answer = pipe(truth_prompt(truth, rec), config, record_id=rec.id)
            answer.meta["kind"] = (rec.meta or {}).get("kind")
            writer.write(answer)
            advance()
    seconds = time.perf_counter() - start
    report = toyworld_judge.evaluate(pred_dir, truth_dir, progress=False)
    if subset:  # score only the records answered (the rest would count as missing)
        answered = {rec.id for rec in records}
        report["records"] = [row for row in report["records"] if row["id"] in answered]
        report["summary"] = toyworld_judge.summarise(report["records"])
    report["run"] = {"model": str(model_dir), "truth": str(truth_dir), "records": len(records), "kinds": kinds,
                     "limit": limit, "seconds": seconds, "seed": seed,
                     "generation": dataclasses.asdict(config),
                     "settings": pipe.model.config.to_dict(),
                     "loop": "duetgen.infer.pipeline.DuetGenPipeline (the engine of duetgen generate / serve)"}
    toyworld_judge.write_report(report, out_dir / "report.json")
    render_dataset_html(pred_dir, out_dir / "pred.html", progress=False)
    return report
