"""A tiny DuetGen whose MLLM was trained for a few seconds, so that it really writes <BOV>.

The CLI, pipeline, server and browser tests need answers that contain images. A random tiny MLLM
never emits <BOV>, so this helper fits the ``tiny`` preset's MLLM (stage-1 loss, the project's own
rendering and masking) on a handful of ShapeWorld records until greedy decoding reproduces their
answers: step text, <BOV>, step text, <BOV>, closing sentence, end of turn. The DiT stays random, so
the pictures are noise; the tests check that they are generated, streamed and stored, not what
they show.
"""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path

import torch

from duetgen.models import builder
from duetgen.models.mllm import model_inputs, render_record
from duetgen.shapeworld import world

PROMPT_SEEDS = (0, 1, 2)


def training_records():
    """Continuation tasks with 2 operations (a canvas in, 2 images out), fixed seeds."""
    records = []
    for seed in PROMPT_SEEDS:
        rng = random.Random(seed)
        while True:
            task = world.sample_task("continuation", rng)
            if len(task.operations) == 2:
                break
        records.append(task.record(f"fit-{seed}"))
    return records


@functools.lru_cache(maxsize=None)  # one fit per test process, shared by every test file that asks
def trained_tiny_model(steps: int = 120, lr: float = 1e-2, seed: int = 0):
    """The ``tiny`` preset with its MLLM overfitted on ``training_records()`` (a few seconds on one CPU thread)."""
    model = builder.build("tiny", seed=seed)
    records = training_records()
    rendered = [render_record(r, model.tokenizer, model.image_processor) for r in records]
    optimizer = torch.optim.AdamW(model.mllm.parameters(), lr=lr, weight_decay=0.0)
    model.mllm.train()
    for step in range(steps):
        seq = rendered[step % len(rendered)]
        loss = model.mllm(**model_inputs(model.mllm, seq)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.mllm.eval()
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained_tiny_dir() -> Path:
    """``trained_tiny_model()`` saved with ``DuetGen.save_pretrained`` (removed when the process exits)."""
    root = Path(tempfile.mkdtemp(prefix="duetgen-tiny-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return trained_tiny_model().save_pretrained(root / "model")


def training_prompt(index: int = 0):
    """(prompt text, canvas) of training record ``index``: the user turn the model was fitted on."""
    user = training_records()[index].messages[0]
    text = "".join(p.text for p in user.content if hasattr(p, "text"))
    canvas = next(p.image for p in user.content if not hasattr(p, "text"))
    return text, canvas
