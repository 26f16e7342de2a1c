"""ShapeWorld evaluation through the engine users run: answer truth prompts, score them with the exact judge.

    duetgen train eval-toy --model checkpoints/shapeworld-toy --truth runs/shapeworld/data/test --out runs/eval

Every number this module produces comes from `duetgen.infer.pipeline.DuetGenPipeline`, the object behind
`duetgen generate` and `duetgen serve` (one KV-cached `InterleavedEngine`, the model's own sampler,
guidance, image size and stop rules). There is no second decode loop: a record answered here equals
`duetgen generate PROMPT [--image CANVAS] --seed S` for the same prompt and seed (tests/test_stage2.py).

- `evaluate_toy`: answer every truth prompt (user turns only), write the answers as a dataset with the
  truth's record ids, score them with `duetgen.shapeworld.judge.evaluate` (T-Com, I-Com, I-Co, IT-Co, I-Q,
  U-Acc, per kind, with bootstrap intervals).
- `shapeworld_demo`: one test-split prompt of each kind in `DEMO_KINDS`, answered and rendered as HTML
  (what `make demo` ends with).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from duetgen.infer.engine import GenerationConfig
from duetgen.infer.teacher_forcing import truth_prompt
from duetgen.shapeworld import judge, world


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
    report = judge.evaluate(pred_dir, truth_dir, progress=False)
    if subset:  # score only the records answered (the rest would count as missing)
        answered = {rec.id for rec in records}
        report["records"] = [row for row in report["records"] if row["id"] in answered]
        report["summary"] = judge.summarise(report["records"])
    report["run"] = {"model": str(model_dir), "truth": str(truth_dir), "records": len(records), "kinds": kinds,
                     "limit": limit, "seconds": seconds, "seed": seed,
                     "generation": dataclasses.asdict(config),
                     "settings": pipe.model.config.to_dict(),
                     "loop": "duetgen.infer.pipeline.DuetGenPipeline (the engine of duetgen generate / serve)"}
    judge.write_report(report, out_dir / "report.json")
    render_dataset_html(pred_dir, out_dir / "pred.html", progress=False)
    return report


# ----------------------------------------------------------------------------- the demo
DEMO_KINDS = ("how-to", "continuation", "editing")  # issue 5: what `make demo` ends with
DEMO_ANSWERS_NAME = "duetgen demo answers"


def remove_demo_dataset(folder: Path, name_prefix: str) -> None:
    """Remove ``folder`` for a rerun when it is a dataset the demo wrote (its name starts with ``name_prefix`` and
    it holds only a dataset's own entries); anything else there is the user's: ``FileExistsError``, nothing lost."""
    from duetgen.data.dataset import IMAGE_DIR, MANIFEST, SHARD_DIR, Dataset

    if not folder.exists() and not folder.is_symlink():
        return
    name = None
    if folder.is_dir() and not folder.is_symlink():
        try:
            name = str(Dataset(folder).manifest.get("name") or "")
        except (OSError, ValueError):
            pass
    own = {MANIFEST, SHARD_DIR, IMAGE_DIR, ".writer.lock"}
    if name is None or not name.startswith(name_prefix) or any(p.name not in own for p in folder.iterdir()):
        raise FileExistsError(f"{str(folder)!r} is not a folder the demo wrote (it replaces only its own datasets); "
                              "move it away or choose another --out")
    shutil.rmtree(folder)


def shapeworld_demo(pipe, out_dir: str | os.PathLike, seed: int = 0, **settings) -> Path:
    """Answer one test-split ShapeWorld prompt of each kind in ``DEMO_KINDS`` (a canvas goes with
    continuation and editing), store the answers as one dataset under ``out_dir`` and render it as
    HTML; returns the HTML path. ``settings`` are generation overrides (``num_steps=10``, ...)."""
    import random

    from duetgen.data.dataset import DatasetWriter
    from duetgen.data.view import render_dataset_html

    out = Path(out_dir)
    data_dir = out / "generated"
    remove_demo_dataset(data_dir, DEMO_ANSWERS_NAME)  # a rerun starts clean; a folder of the user's is refused
    with DatasetWriter(data_dir, name=DEMO_ANSWERS_NAME) as writer:
        for i, kind in enumerate(DEMO_KINDS):
            task = world.sample_task(kind, random.Random(seed * 100 + i), split="test")
            images = [world.render(task.initial)] if task.has_canvas else []
            record = pipe(task.prompt(), images=images, record_id=f"demo-{kind}", seed=seed, **settings)
            record.meta["task"] = {"kind": kind, "scenes": [s.to_json() for s in task.scenes()]}
            writer.write(record)
    return render_dataset_html(data_dir, out / "generated.html", progress=False)[0]
