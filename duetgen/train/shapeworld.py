"""The ShapeWorld recipe in one command: data, stage 1 (three phases), stage 2, evaluation on test, export.

    duetgen train shapeworld --out runs/sw              # from nothing to runs/sw/model + runs/sw/report.json
    duetgen train shapeworld --out runs/sw --resume     # after a kill: finished phases are skipped, the
                                                        # interrupted one resumes from its checkpoint

A recipe is a plain list of phases (`shapeworld_recipe`, `tiny_recipe` for tests); each phase has a name
and a function of the run directory. The runner does them in order and writes `OUT/phases.json` after
each (wall time per phase; the recipe's log says the same). A phase is finished when its output exists:
a dataset's manifest (generated into a temporary folder, then renamed), a stage's exported `mllm/` or
`model/` (written atomically by the stages), the evaluation's report. An interrupted training phase
resumes exactly (the stages' checkpoints; tests/test_shapeworld_recipe.py kills and resumes it).

Design choices:
- The configs are the named runs of `duetgen.train.configs` with their paths moved under OUT, so
  `duetgen train stage1 --config ...` and this command train the same thing.
- Stage 1 keeps the measured three-phase order (read canvases first, then the whole mix, then more
  understanding; docs/training.md says why); stage 2 draws from text first (text-to-image and how-to
  records, from a random DiT), then trains on the whole mix from there: two phases of one command,
  not a chain of hand-continued runs.
- The final model is `OUT/model` (a DuetGen directory, what `checkpoints/shapeworld-toy/` ships).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

EVAL_KINDS = ["how-to", "continuation", "text-to-image", "editing", "understanding"]


@dataclass
class Phase:
    name: str
    done: Callable[[Path], bool]  # the phase's output exists (run directory -> bool)
    run: Callable[[Path, bool, bool], None]  # (run directory, resume, progress)


# ----------------------------------------------------------------------------- phase builders


def data_phase(name: str, n: int, seed: int, split: str, kinds: list[str] | None = None) -> Phase:
    """A ShapeWorld dataset OUT/data/<name>, generated into a temporary folder and renamed when complete."""
    from duetgen.shapeworld.world import generate

    def run(out: Path, resume: bool, progress: bool) -> None:
        final, tmp = out / "data" / name, out / "data" / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)  # a killed generation starts over (seconds)
        generate(tmp, n, seed=seed, split=split, kinds=kinds, progress=progress)
        os.replace(tmp, final)

    return Phase(f"data/{name}", lambda out: (out / "data" / name / "manifest.json").is_file(), run)


def stage1_phase(name: str, cfg_fn, data: list[str], init: str | None, **overrides) -> Phase:
    """A stage-1 run OUT/<name> of config ``cfg_fn()`` on OUT/data/<data...>, from OUT/<init>/mllm (or fresh)."""
    from duetgen.train import stage1

    def run(out: Path, resume: bool, progress: bool) -> None:
        cfg = dataclasses.replace(cfg_fn(), data=[str(out / "data" / d) for d in data], **overrides)
        if cfg.val_data is not None:
            cfg = dataclasses.replace(cfg, val_data=str(out / "data" / "val"))
        if init is not None:
            cfg = dataclasses.replace(cfg, mllm=str(out / init / "mllm"))
        stage1.train(cfg, out / name, resume_run=resume and (out / name).exists(), progress=progress)

    return Phase(f"stage1/{name}", lambda out: (out / name / "mllm" / "config.json").is_file(), run)


def stage2_phase(name: str, cfg_fn, data: list[str], mllm_from: str, init_from: str | None = None,
                 **overrides) -> Phase:
    """A stage-2 run OUT/<name> on OUT/<mllm_from>/mllm; its connector + DiT start from OUT/<init_from>/model
    (an earlier stage-2 phase of the recipe) or at random. The frozen MLLM's states are kept on disk in
    OUT/<mllm_from>/condition-states, so the second phase skips the MLLM forwards the first one made."""
    from duetgen.train import stage2

    def run(out: Path, resume: bool, progress: bool) -> None:
        cfg = dataclasses.replace(cfg_fn(), data=[str(out / "data" / d) for d in data],
                                  condition_cache=str(out / mllm_from / "condition-states"), **overrides)
        if init_from is not None:
            cfg = dataclasses.replace(cfg, init_from=str(out / init_from / "model"))
        stage2.train(cfg, out / mllm_from / "mllm", out / name, resume_run=resume and (out / name).exists(),
                     progress=progress)

    return Phase(f"stage2/{name}", lambda out: (out / name / "model" / "duetgen.json").is_file(), run)


def eval_phase(model_from: str, truth: str, name: str, **settings) -> Phase:
    from duetgen.shapeworld.evaluate import evaluate_toy

    def run(out: Path, resume: bool, progress: bool) -> None:
        evaluate_toy(out / model_from / "model", out / "data" / truth, out / name, progress=progress, **settings)

    return Phase(f"eval/{name}", lambda out: (out / name / "report.json").is_file(), run)


def export_phase(model_from: str) -> Phase:
    """OUT/model: a copy of the final DuetGen directory (copied to a temporary name, then renamed)."""

    def run(out: Path, resume: bool, progress: bool) -> None:
        tmp = out / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out / model_from / "model", tmp)
        os.replace(tmp, out / "model")

    return Phase("export", lambda out: (out / "model" / "duetgen.json").is_file(), run)


# ----------------------------------------------------------------------------- recipes


def shapeworld_recipe() -> list[Phase]:
    """The recipe of the shipped checkpoint (docs/training.md, "The ShapeWorld recipe")."""
    from duetgen.train import configs as C

    return [
        data_phase("train", 20000, seed=0, split="train"),
        data_phase("train-understanding", 4000, seed=3, split="train", kinds=["understanding"]),
        data_phase("train-understanding-2", 8000, seed=4, split="train", kinds=["understanding"]),
        data_phase("train-tti", 6000, seed=5, split="train", kinds=["text-to-image"]),
        data_phase("train-editing", 6000, seed=6, split="train", kinds=["editing"]),
        data_phase("val", 100, seed=2, split="val", kinds=EVAL_KINDS),
        data_phase("test", 250, seed=1, split="test", kinds=EVAL_KINDS),
        stage1_phase("stage1-read-first", C.toy_stage1_read_first, ["train"], init=None),
        stage1_phase("stage1", C.toy_stage1, ["train", "train-understanding"], init="stage1-read-first"),
        stage1_phase("stage1-more", C.toy_stage1_read_more,
                     ["train", "train-understanding", "train-understanding-2"], init="stage1"),
        stage2_phase("stage2-draw", C.toy_stage2_draw, ["train-tti", "train"], mllm_from="stage1-more"),
        stage2_phase("stage2", C.toy_stage2, ["train-tti", "train-editing", "train"], mllm_from="stage1-more",
                     init_from="stage2-draw"),
        eval_phase("stage2", "test", "eval-test"),
        export_phase("stage2"),
    ]


def tiny_recipe() -> list[Phase]:
    """The same phases at test size (seconds): tiny models, a few records, a few steps."""
    from duetgen.train import configs as C

    return [
        data_phase("train", 40, seed=0, split="train"),
        data_phase("test", 4, seed=1, split="test", kinds=["editing", "understanding"]),
        stage1_phase("stage1-read-first", C.tiny_stage1, ["train"], init=None, steps=2, sample_every=100),
        stage1_phase("stage1", C.tiny_stage1, ["train"], init="stage1-read-first", steps=3, sample_every=100),
        stage2_phase("stage2", C.tiny_stage2, ["train"], mllm_from="stage1", steps=6, sample_every=100),
        eval_phase("stage2", "test", "eval-test", num_steps=2, max_new_tokens=20),
        export_phase("stage2"),
    ]


RECIPES = {"shapeworld": shapeworld_recipe, "tiny": tiny_recipe}


# ----------------------------------------------------------------------------- the runner


def run_recipe(out: str | os.PathLike, recipe: str = "shapeworld", resume: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Run every unfinished phase of ``recipe`` into ``out``; returns the phases record (also OUT/phases.json)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    out = Path(os.path.abspath(out))  # the phases' configs hold paths under it: a resume spelled otherwise matches
    record_path = out / "phases.json"
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, or a new --out")
    out.mkdir(parents=True, exist_ok=True)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"recipe": recipe, "phases": {}}
    if record.get("recipe") != recipe:
        raise ValueError(f"{out} holds a {record.get('recipe')!r} run, not {recipe!r}")
    for phase in RECIPES[recipe]():
        if phase.done(out):
            log(f"[{phase.name}] done before, skipped")
            continue
        log(f"[{phase.name}] started")
        start = time.perf_counter()
        phase.run(out, resume, progress)
        if not phase.done(out):
            raise RuntimeError(f"phase {phase.name} ended without its output in {out}")
        seconds = time.perf_counter() - start
        entry = record["phases"].setdefault(phase.name, {"seconds": 0.0, "runs": 0})
        entry["seconds"] += seconds  # a resumed phase adds its second part
        entry["runs"] += 1
        _write_json(record_path, record)
        log(f"[{phase.name}] finished in {seconds / 60:.1f} min")
    training = sum(v["seconds"] for k, v in record["phases"].items() if k.startswith("stage"))
    record["training_minutes"] = training / 60
    _write_json(record_path, record)
    log(f"recipe {recipe} complete: stages 1 + 2 took {training / 60:.1f} min of wall time; model in {out / 'model'}")
    return record


def _write_json(path: Path, data: dict) -> None:
    from duetgen.data.dataset import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))
