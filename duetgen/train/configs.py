"""Run configs for the two training stages: one dataclass per stage, a run is a named function.

    cfg = toy_stage1()                          # the ShapeWorld run on 2 CPU cores
    cfg = dataclasses.replace(cfg, steps=100)   # a variant changes a few fields of a copy
    cfg = stage1_config("toy")                  # what `duetgen train stage1 --config toy` uses

Design choices (torchtitan / nanochat style, STYLE principle 7):
- Two flat dataclasses with commented fields, no nesting beyond what a stage needs; a run is a
  function returning a full config; variants are `dataclasses.replace` of a copy.
- `tiny_*` runs exist for tests (seconds on a CPU); `toy_*` is the ShapeWorld run whose checkpoint
  ships in `checkpoints/shapeworld-toy/`. Numbers cite the calibration note
  (shared/notes/shapeworld-calibration.md) or a measurement in docs/training.md.
- Every config is JSON-able (`dataclasses.asdict`), so it is stored in every checkpoint and the
  trained model directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class Stage1Config:
    """Stage 1: MLLM instruction tuning (paper section 4.2), next-token loss on packed conversations."""

    name: str = "toy"
    data: list[str] = field(default_factory=lambda: ["runs/shapeworld/data/train"])  # dataset dirs, concatenated
    exclude_kinds: list[str] = field(default_factory=lambda: ["transition"])  # meta.kind values left out (docs/shapeworld.md: transitions are image-only stage-2 data and parse as edits)
    val_data: str | None = None  # dataset dir for the held-out loss; None: the last `val_records` records of `data`, left out of training
    val_records: int = 128  # records in the held-out loss
    mllm: str = "toy"  # "toy" / "tiny": a random config of the real Qwen2.5-VL class + offline tokenizer; else a local model directory
    vocab_size: int = 512  # offline BPE size (toy/tiny only)
    train_vision: bool = True  # False freezes the vision tower (ViT + merger); see docs/training.md, "what limits it"
    vision_lr_scale: float = 0.1  # vision tower LR = lr * this (at 1.0 its output norm grew 1.9 -> 172 and collapsed, docs/training.md)
    lora_rank: int = 0  # 0: full fine-tuning; > 0: peft LoRA of this rank on the language model only (vision frozen), merged at export
    lora_alpha: float = 32.0  # LoRA scale is alpha / rank
    lora_dropout: float = 0.0
    lora_train_embeddings: bool = True  # with LoRA, embed_tokens + lm_head stay trainable (the new <BOV> rows must learn; duetgen.train.lora)
    token_budget: int = 1024  # tokens per packed sequence
    packs_per_rank: int = 1  # packs per optimiser step on each rank (gradient accumulation); a step sees world_size x this; the loss is the mean over the step's supervised tokens, so 1 rank x 2 packs = 2 ranks x 1 pack
    max_record_tokens: int = 1024  # longer records are an error naming them
    steps: int = 4000  # optimiser steps (copying words from the prompt emerged only after ~1500, docs/training.md)
    lr: float = 1e-3  # peak learning rate (small model trained from scratch)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine ends at lr * this
    weight_decay: float = 0.01  # matrices only (duetgen.train.optim.param_groups)
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1  # torch intra-op threads on CPU: 1, because the 2 cores are shared and 2 threads fell to 6 s/step under load (docs/training.md)
    log_every: int = 10  # progress + TensorBoard scalars
    eval_every: int = 250  # held-out loss
    sample_every: int = 500  # greedy answers to a few prompts -> HTML
    save_every: int = 250  # atomic resumable checkpoint
    keep_last: int = 2  # checkpoints kept
    num_samples: int = 6  # prompts answered in each sample block
    max_new_tokens: int = 160  # greedy decode length in sample blocks


@dataclass
class Stage2Config:
    """Stage 2: interleaved context alignment (paper section 4.1-4.2). MLLM frozen; connector + DiT learn."""

    name: str = "toy"
    data: list[str] = field(default_factory=lambda: ["runs/shapeworld/data/train"])  # instruction + transition records, concatenated (mix them with `duetgen data mix`)
    include_kinds: list[str] | None = None  # meta.kind values kept (None: every record with an assistant image)
    val_records: int = 64  # last records of `data` held out for the validation loss and samples
    preset: str = "toy"  # duetgen.models.presets name: the DiT architecture (random init), the autoencoder and the saved settings
    image_size: list[int] | None = None  # [height, width] the DiT draws at (DuetGenConfig.image_size; None: the preset's); dataset images are resized as the engine resizes inputs (DuetGen.fit_image)
    latent_token_budget: int = 768  # DiT patch tokens per pack (conditioning frames + targets); 16 per ShapeWorld canvas
    packs_per_rank: int = 1  # packs per optimiser step on each rank (gradient accumulation); the loss is the mean over the step's targets on all ranks (see Stage1Config)
    parameterisation: str = "x0"  # "x0" | "velocity" | "cosmos"; x0 is what trained on ShapeWorld (calibration note, point 1)
    x0_relative_to_previous: bool = True  # x0 = network output + latest conditioning frame (white canvas when none); see docs/training.md
    time_distribution: str = "logit_normal"
    time_shift: float = 1.0
    x0_min_t: float = 0.05  # x0 loss: velocity divisor clamped at t >= this (calibration note point 1)
    changed_loss_weight: float = 0.0  # extra loss weight on latent values where the target differs from the reference canvas (previous image, or white); 0 = plain MSE
    changed_loss_dilation: int = 0  # > 0: the extra weight covers every latent position within this many latent pixels of a changed one, all channels (the changed region, symmetric: paint outside a piece's outline costs as much as paint missing inside it); 0: only the changed values
    recency_tokens: int = 0  # > 0: the connector's learned step marker over the last K tokens before <BOV> (models/connector.py)
    keep_mllm_states: bool = True  # keep each record's frozen-MLLM states after its first forward (stage2.ConditionStates; ~150 KB per ShapeWorld record)
    condition_cache: str | None = None  # a folder: the kept MLLM states also go to disk (stage2.ConditionCache), shared by runs on the same MLLM; None: memory only
    drop_final_text_prob: float = 0.1  # the final text chunk removed (guidance negative, paper section 4)
    use_condition_frames: bool = True  # False: the ablation with text condition only (no earlier images as frames)
    init_from: str | None = None  # a DuetGen directory whose connector + DiT start this run (else random); the MLLM may differ
    steps: int = 4000  # ~50 min on one shared core (docs/training.md); text-conditioned drawing is what comes last
    lr: float = 1e-3  # calibration note: 4 layers x 128 at 1e-3 trained
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.998  # EMA over connector + DiT, with warm-up (1 + n) / (10 + n) (duetgen.train.optim.EMA)
    seed: int = 0
    threads: int = 1  # see Stage1Config.threads
    log_every: int = 10
    eval_every: int = 250  # validation loss at fixed times and noise
    sample_every: int = 500  # a few images drawn by the EMA model -> HTML
    save_every: int = 250
    keep_last: int = 20  # all of a toy run: `stage2.export_checkpoint` turns step N into a model (ablations at equal steps)
    num_samples: int = 16  # the exactness of 16 EMA samples is the run's quickest quality signal
    sample_steps: int = 20  # sampler steps for sample blocks (calibration: 10 is nearly as good as 50)
    sample_shift: float = 1.0  # the flow schedule's shift for sample blocks and the exported model's default sampler (> 1 spends more steps near noise)
    guidance_scale: float = 1.0  # sample blocks, and the exported model's default guidance; w = 1 is no guidance
    guidance_scale_without_frames: float | None = None  # the exported model's default for images with no earlier image (DuetGenConfig)


# ----------------------------------------------------------------------------- runs


def toy_stage1_read_more() -> Stage1Config:
    """ShapeWorld stage 1, phase 3 of 3: phase 2's model (`--config toy` -> runs/shapeworld/stage1) still says
    "at" for middle-row pieces ("on the left", "in the center"); 2000 more steps with understanding
    about half of the data (a second 8000-record understanding set). (The third run's phase 3 ran 800
    steps and was resumed to 2000, a different LR curve; `duetgen train shapeworld` runs 2000 in one go.)
    The vision tower trains at the full LR here (phase 2's 0.1 left middle-row columns fragile: 400 val
    canvases read exactly 347 with 0.1, 393 with 1.0, 348 with 0.1 at twice the LR, from the same phase-2
    model; docs/training.md "What session 6 measured")."""
    return dataclasses.replace(toy_stage1(), name="toy-read-more", mllm="runs/shapeworld/stage1/mllm",
                               data=toy_stage1().data + ["runs/shapeworld/data/train-understanding-2"],
                               steps=2000, lr=5e-4, vision_lr_scale=1.0)


def toy_stage1_mixed_scratch() -> Stage1Config:
    """ShapeWorld stage 1 from scratch on the whole mix at once (a negative result, docs/training.md: after
    3500 steps it neither copied nor read colour words). The base the other toy stage-1 runs vary.

    The default mix has 10% understanding records; 4000 extra ones (their own seed) make reading
    canvases about a quarter of the data, and the held-out loss uses the val split.
    """
    return Stage1Config(name="toy-mixed-scratch",
                        data=["runs/shapeworld/data/train", "runs/shapeworld/data/train-understanding"],
                        val_data="runs/shapeworld/data/val", val_records=100)


def toy_stage1_read_first() -> Stage1Config:
    """ShapeWorld stage 1, phase 1 of 3: a fresh toy MLLM learns to read canvases first, on the
    understanding records only (400 steps; colour words read right 28/28 on val, docs/training.md).
    A language model trained on the copy tasks first never learned to read colours (same doc)."""
    from duetgen.shapeworld.world import KINDS

    return dataclasses.replace(toy_stage1_mixed_scratch(), name="toy-read-first", data=["runs/shapeworld/data/train"],
                               exclude_kinds=[k for k in KINDS if k != "understanding"], steps=400,
                               warmup_steps=50, eval_every=100)


def toy_stage1() -> Stage1Config:
    """ShapeWorld stage 1, phase 2 of 3 (`duetgen train stage1 --config toy`): from phase 1's model
    (`--config toy-read-first --out runs/shapeworld/stage1-read-first`), the whole mix for 2000 steps."""
    return dataclasses.replace(toy_stage1_mixed_scratch(), name="toy", mllm="runs/shapeworld/stage1-read-first/mllm",
                               steps=2000, warmup_steps=50)


# The toy DiT draws ShapeWorld's 64 px canvases at 48 px (session 5, docs/training.md "Drawing at 48 px"):
# 16 px per DiT token (pixel shuffle 4 x patch 4), so each of the 3 x 3 cells is one token and a piece lies
# inside it, as the toy MLLM already sees canvases (48 px, one vision token per cell). Every test-split
# canvas, resized to 48 px, reads back exactly (613 of 613). Val IT-Co 0.626 -> 0.758 at equal steps.
TOY_DRAWING_SIZE = [48, 48]


def toy_stage2_draw() -> Stage2Config:
    """ShapeWorld stage 2, phase 1 of 2 (`duetgen train shapeworld`): drawing from text first. A random DiT on
    the text-to-image and how-to records only (blank canvases and pieces added one at a time: the text
    says what to draw), uniform flow times, the plain clean-image loss, 1000 steps. Measured (docs/
    training.md, "What session 4 measured"): this curriculum put the mark in the right cell on 13 of 13
    val text-to-image prompts at 1000 steps in all, the mix alone 8 of 13; the note's run B (text-to-image
    only) and runs C / D (then edits) found the same direction."""
    return dataclasses.replace(Stage2Config(), name="toy-draw", image_size=TOY_DRAWING_SIZE,
                               data=["runs/shapeworld/data/train-tti", "runs/shapeworld/data/train"],
                               include_kinds=["text-to-image", "how-to"], time_distribution="uniform",
                               x0_min_t=1.0, steps=1000, warmup_steps=100, save_every=500, sample_every=500,
                               eval_every=500, sample_shift=3.0)


def toy_stage2() -> Stage2Config:
    """ShapeWorld stage 2, phase 2 of 2 (`duetgen train shapeworld`): from phase 1's connector + DiT
    (`--config toy-draw` -> runs/shapeworld/stage2-draw), the whole mix (the extra text-to-image and
    editing records plus the default mix), uniform flow times, the plain clean-image loss (`x0_min_t=1`:
    every time weighs the same; the velocity weighting 1/t^2 left the high-noise times, where only the
    text decides where to draw, with little gradient: E4 against E1 in docs/training.md), the connector's
    step marker over the last 16 tokens (val IT-Co 0.46 -> 0.63 against the same phase without it).
    Session 5: drawing at 48 px (`TOY_DRAWING_SIZE`); the exported model samples with the flow shift 3 and
    guidance 1 for every image (at 48 px guidance 2 without earlier images dropped val text-to-image IT-Co
    from 1.00 to 0.62; shift 3 against 1: 0.834 against 0.825 overall); 3000 steps (val IT-Co 0.923
    against 0.834 at 2000; docs/training.md)."""
    return dataclasses.replace(Stage2Config(), name="toy", init_from="runs/shapeworld/stage2-draw/model",
                               data=["runs/shapeworld/data/train-tti", "runs/shapeworld/data/train-editing",
                                     "runs/shapeworld/data/train"],
                               time_distribution="uniform", x0_min_t=1.0, recency_tokens=16, steps=3000,
                               warmup_steps=100, save_every=500, sample_every=1000, eval_every=500,
                               image_size=TOY_DRAWING_SIZE, sample_shift=3.0)


def toy_stage2_session3() -> Stage2Config:
    """Stage 2 as sessions 1-3 ran it (logit-normal(0, 1) times, the velocity-weighted x0 loss, 4000 steps on
    the default mix): the base of the `toy-continue*` legs that built the session-3 checkpoint."""
    return Stage2Config(name="toy-session3")


def toy_stage2_text_only() -> Stage2Config:
    """Ablation: the same stage 2 without earlier images as DiT frames (paper's claim, measured as I-Co)."""
    return dataclasses.replace(toy_stage2(), name="toy-text-only", use_condition_frames=False)


def toy_stage2_continue() -> Stage2Config:
    """ShapeWorld stage 2, continued (docs/training.md "ShapeWorld runs"): the previous run's connector + DiT
    (`runs/shapeworld/stage2-ext/model`, 6000 steps on phase 2's MLLM) trained on, on phase 3's MLLM, with
    6000 extra text-to-image and 6000 extra editing records: text-conditioned drawing is what the DiT
    learns last and blank-canvas targets were about a fifth of the mix (a text-to-image-only probe placed
    colours after 600 steps)."""
    return dataclasses.replace(toy_stage2_session3(), name="toy-continue", init_from="runs/shapeworld/stage2-ext/model",
                               data=["runs/shapeworld/data/train-tti", "runs/shapeworld/data/train-editing",
                                     "runs/shapeworld/data/train"],
                               steps=6000, lr=5e-4, warmup_steps=100, save_every=500)


def toy_stage2_more_text() -> Stage2Config:
    """ShapeWorld stage 2 from a random DiT on the data of `toy-continue` (6000 extra text-to-image and
    6000 extra editing records), 4500 steps."""
    return dataclasses.replace(toy_stage2_continue(), name="toy-more-text", init_from=None, lr=1e-3, warmup_steps=200,
                               steps=4500)


def toy_stage2_continue_2() -> Stage2Config:
    """`toy-continue` once more, on the two-phase stage-1 MLLM (`--config toy-read-first` then `toy`): the
    connector + DiT of `toy-continue` at the step it was stopped (exported to runs/shapeworld/models/c-last)."""
    return dataclasses.replace(toy_stage2_continue(), name="toy-continue-2", init_from="runs/shapeworld/models/c-last",
                               steps=4500)


def toy_stage2_continue_3() -> Stage2Config:
    """The last leg: `toy-continue-2`'s connector + DiT at the step it was stopped (exported to
    runs/shapeworld/models/d-last) trained on the final stage-1 MLLM (`--config toy-read-more`), so the
    shipped DiT has learned on the hidden states of the shipped MLLM."""
    return dataclasses.replace(toy_stage2_continue(), name="toy-continue-3", init_from="runs/shapeworld/models/d-last",
                               steps=2000)


def tiny_stage1() -> Stage1Config:
    """Unit tests: a 0.16M-parameter Qwen2.5-VL, a few steps, saves often."""
    return Stage1Config(name="tiny", mllm="tiny", vocab_size=300, token_budget=512, steps=6, warmup_steps=2,
                        val_records=4, log_every=1, eval_every=3, sample_every=3, save_every=3, num_samples=2,
                        max_new_tokens=8, threads=1)


def tiny_stage2() -> Stage2Config:
    """Unit tests: a 2-layer DiT, a few steps, saves often."""
    return Stage2Config(name="tiny", preset="tiny", latent_token_budget=1536, steps=6, warmup_steps=2, val_records=4,
                        log_every=1, eval_every=3, sample_every=3, save_every=3, num_samples=2, sample_steps=2,
                        threads=1, ema_decay=0.9)


def toy_stage1_frozen_vision() -> Stage1Config:
    """Diagnostic: the toy run with the random vision tower frozen (in the shipped run its features collapsed)."""
    return dataclasses.replace(toy_stage1_mixed_scratch(), name="toy-frozen-vision", train_vision=False)


def toy_stage1_reading() -> Stage1Config:
    """ShapeWorld stage 1, phase 2 (this session's run, docs/training.md "ShapeWorld runs"): from a model
    whose language model already copies prompt words (the first run's, `checkpoints/shapeworld-toy/mllm`)
    with a fresh vision tower (`stage1.fresh_vision_tower` -> runs/shapeworld/stage1-init), learn to
    read canvases at 48x48; 1500 steps at half the LR."""
    return dataclasses.replace(toy_stage1_mixed_scratch(), name="toy-reading", mllm="runs/shapeworld/stage1-init", steps=1500,
                               lr=5e-4, warmup_steps=50, vision_lr_scale=0.2)


def toy_stage1_understanding() -> Stage1Config:
    """ShapeWorld stage 1, phase 3 (docs/training.md "ShapeWorld runs"): from phase 2's model
    (`runs/shapeworld/stage1b/mllm`), which copies prompt words but reads canvas colours at 0.18,
    1000 steps with understanding about half of the data (a second 8000-record understanding set)."""
    return dataclasses.replace(toy_stage1_mixed_scratch(), name="toy-understanding", mllm="runs/shapeworld/stage1b/mllm",
                               data=toy_stage1_mixed_scratch().data + ["runs/shapeworld/data/train-understanding-2"],
                               steps=1000, lr=5e-4, warmup_steps=50, vision_lr_scale=0.3)


def tiny_lora_stage1() -> Stage1Config:
    """Unit tests and a smoke run of the LoRA path: the tiny run with rank-4 LoRA."""
    return dataclasses.replace(tiny_stage1(), name="tiny-lora", lora_rank=4, lora_alpha=8.0)


STAGE1_CONFIGS = {"toy": toy_stage1, "toy-read-first": toy_stage1_read_first, "toy-read-more": toy_stage1_read_more, "toy-mixed-scratch": toy_stage1_mixed_scratch, "toy-reading": toy_stage1_reading, "toy-understanding": toy_stage1_understanding, "toy-frozen-vision": toy_stage1_frozen_vision, "tiny": tiny_stage1,
                  "tiny-lora": tiny_lora_stage1}
STAGE2_CONFIGS = {"toy": toy_stage2, "toy-draw": toy_stage2_draw, "toy-text-only": toy_stage2_text_only, "toy-session3": toy_stage2_session3, "toy-continue": toy_stage2_continue, "toy-continue-2": toy_stage2_continue_2, "toy-continue-3": toy_stage2_continue_3, "toy-more-text": toy_stage2_more_text, "tiny": tiny_stage2}


def stage1_config(name: str) -> Stage1Config:
    if name not in STAGE1_CONFIGS:
        raise ValueError(f"unknown stage-1 config {name!r}; expected one of {sorted(STAGE1_CONFIGS)}")
    return STAGE1_CONFIGS[name]()


def stage2_config(name: str) -> Stage2Config:
    if name not in STAGE2_CONFIGS:
        raise ValueError(f"unknown stage-2 config {name!r}; expected one of {sorted(STAGE2_CONFIGS)}")
    return STAGE2_CONFIGS[name]()
