"""Stage 1: MLLM instruction tuning (paper section 4.2, DESIGN section 6). One flat script, one loop.

    duetgen train stage1 --config toy [--out runs/toy/stage1] [--resume]

Only MLLM parameters train: all of them, or (``lora_rank > 0``) peft LoRA on the language model plus
the embeddings (`duetgen.train.lora`), merged into the weights at export. Loss: next token, on assistant text, each `<BOV>` and the assistant's
closing `<|im_end|>` (DESIGN section 4; `duetgen.models.mllm.render_record` writes the labels).
Several conversations are packed into one sequence under a token budget (`duetgen.data.packing`):
per-sample 3D mrope positions, a block-diagonal causal mask (no attention across samples), and
each sample's first label ignored so the shifted loss never crosses samples.

Design choices:
- The model is transformers' own `Qwen2_5_VLForConditionalGeneration`, called with a 4D boolean
  mask, which transformers 5.x passes to SDPA unchanged (a packed forward equals separate forwards
  to 1e-6, tests/test_stage1.py). On GPU a varlen kernel would avoid the (T, T) mask; at the toy
  budget (1024 tokens) the mask is 1 MB.
- Conversations are rendered on the fly each step (images decoded then); only their lengths are
  computed up front, once, for the packer.
- Everything a resumed run needs is in the checkpoint (`duetgen.train.checkpoint`): weights,
  AdamW, the LR schedule, the sampler's exact data position and every RNG. A run killed with
  SIGKILL and resumed gives the same per-step losses (tests/test_train_resume.py).
- The run directory holds `tokenizer/` (written once, before step 0, so a resume sees the same
  ids), `checkpoints/`, `tensorboard/` + `metrics.jsonl` (`duetgen.train.logging.MetricsLogger`, as
  in stage 2: rich bar, TensorBoard, one JSON line per logged step), `samples/` (HTML) and, at the
  end, `mllm/`: a plain transformers directory (weights, tokenizer,
  image-processor config) that stage 2 and `from_pretrained` read.
- LoRA checkpoints hold the full state under peft's module names (base + LoRA tensors); resume wraps
  the model the same way before loading, so the resume path is the full fine-tuning one.
- bf16 autocast only on CUDA; CPU runs in fp32 (bf16 matmuls are slow on most CPUs).
- Distribution (`torchrun --nproc-per-node N -m duetgen.cli train stage1 ...`, docs/training-infra.md):
  rank 0 builds the initial weights (and writes `tokenizer/`) once; every rank builds the same model
  on `meta`, FSDP2 shards each decoder layer and vision block (`duetgen.train.parallel`) and rank 0's
  weights are broadcast shard by shard. Packs are sharded by rank. A step's loss is the sum over every
  rank's supervised tokens divided by their all-reduced count (FSDP sums gradients), so 2 ranks x 1
  pack train like 1 rank x 2 packs, up to float rounding (`packs_per_rank`; tests/test_train_distributed.py). Every
  rank runs the held-out loss and the greedy samples (FSDP forwards are collectives; all ranks
  compute the same numbers); rank 0 alone logs and writes. Export gathers the full state dict to
  rank 0, which loads it into a plain copy and saves that. A single process runs none of this.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from duetgen.data.packing import PackedSampler
from duetgen.data.record import Record
from duetgen.models.builder import stage1_mllm, text_only
from duetgen.models.mllm import IGNORE_INDEX, RenderedSequence
from duetgen.models.packed_attention import use_packed_attention
from duetgen.train.checkpoint import open_run_dir, resume, save_checkpoint
from duetgen.train.common import (TrainInputError, check_finite, check_resume, extend_schedule, hold_out,
                                   load_records, pack_inputs, render, warn_packs_per_rank)
from duetgen.train.configs import Stage1Config
from duetgen.train.logging import MetricsLogger
from duetgen.train.optim import clip_grad_norm, make_adamw, make_scheduler
from duetgen.train.parallel import (DistEnv, all_reduce_sum, apply_fsdp, backward_pack_shares, barrier,
                                    destroy_distributed, gather_full_state_dict, init_buffers_from_config,
                                    init_distributed, load_full_state_dict)


# ----------------------------------------------------------------------------- model and data helpers


def next_token_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(mean loss over supervised tokens, number of supervised tokens) of one packed sequence."""
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**kwargs, use_cache=False).logits[0]  # (T, V)
    targets = labels[1:]  # token i predicts token i + 1
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits[:-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / max(n, 1)
    return loss, n


def save_mllm(model, tokenizer, processor, out: Path) -> None:
    """A plain transformers directory (safetensors), written to a tmp dir then renamed (atomic)."""
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)


def fresh_vision_tower(mllm_dir: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> Path:
    """A toy MLLM directory with ``mllm_dir``'s language model, a freshly initialised vision tower and
    the current toy image processor: the starting point of the shipped ShapeWorld stage 1's second
    phase (docs/training.md). Same architecture required (the toy one); writes atomically."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from duetgen.models import mllm as M

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(mllm_dir, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(mllm_dir, local_files_only=True)
    torch.manual_seed(seed)
    fresh = Qwen2_5_VLForConditionalGeneration(M.toy_qwen2_5_vl_config(len(tokenizer)))
    try:
        model.model.visual.load_state_dict(fresh.model.visual.state_dict())
    except RuntimeError as e:
        raise TrainInputError(f"{mllm_dir}: its vision tower is not the toy one ({e})") from None
    out = Path(out)
    save_mllm(model, tokenizer, M.toy_image_processor(), out)
    return out


# ----------------------------------------------------------------------------- training


def adapt(model, cfg: Stage1Config):
    """What trains, as the config says: the vision tower frozen or not, LoRA or not (returns the PeftModel
    for the merge at export, else None). Applied before sharding, so FSDP sees the final parameters."""
    if not cfg.train_vision:
        model.model.visual.requires_grad_(False)  # left out of AdamW (param_groups skips frozen parameters)
    if cfg.lora_rank > 0:  # `model` keeps running (now through the LoRA layers); `lora` only merges at export
        from duetgen.train.lora import add_lora
        return add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_train_embeddings)
    return None


def build_sharded_mllm(cfg: Stage1Config, run_dir: Path, env: DistEnv):
    """Distributed runs: (model, tokenizer, processor, lora), the model FSDP2-sharded over the ranks.

    Rank 0 builds the initial model exactly as a single process does (same seed, same weights) and
    writes ``tokenizer/``; every rank then builds the architecture on ``meta``, shards each decoder
    layer and vision block, and receives rank 0's weights tensor by tensor (its shard only).
    """
    init = {}
    if env.is_main:
        reference, _, _ = stage1_mllm(cfg.mllm, cfg.vocab_size, run_dir / "tokenizer", where=f"stage-1 config {cfg.name!r}")
        adapt(reference, cfg)
        init = reference.state_dict()
        del reference
    barrier(env)  # tokenizer/ is written before the other ranks read it
    model, tokenizer, processor = stage1_mllm(cfg.mllm, cfg.vocab_size, run_dir / "tokenizer", meta=True, where=f"stage-1 config {cfg.name!r}")
    lora = adapt(model, cfg)
    blocks = [*model.model.language_model.layers, *model.model.visual.blocks]
    apply_fsdp(model, blocks, env, sum_gradients=True)  # summed: the loss is already a global-token mean
    load_full_state_dict(model, init, env, init_buffers=init_buffers_from_config)
    return model.train(), tokenizer, processor, lora


def train(cfg: Stage1Config, run_dir: str | os.PathLike, resume_run: bool = False, progress: bool = True,
          stop_after: int | None = None) -> Path:
    """Train stage 1 into ``run_dir``; returns ``run_dir/mllm``. ``stop_after`` ends early (tests).

    Under torchrun every rank calls this; the process group is started here (unless the caller
    started one) and ended on return.
    """
    started = not torch.distributed.is_initialized()
    env = init_distributed()
    try:
        return _train(cfg, run_dir, env, resume_run, progress, stop_after)
    finally:
        if started:
            destroy_distributed()


def _train(cfg: Stage1Config, run_dir, env: DistEnv, resume_run: bool, progress: bool, stop_after: int | None) -> Path:
    # --- setup
    run_dir, found = open_run_dir(run_dir, resume_run, inputs=[cfg.mllm, *cfg.data, cfg.val_data])
    if found is not None:
        cfg = check_resume(found, cfg)  # before anything loads: another config is refused by name
    ckpt_dir = run_dir / "checkpoints"
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = env.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    if env.distributed:
        model, tokenizer, processor, lora = build_sharded_mllm(cfg, run_dir, env)
    else:
        model, tokenizer, processor = stage1_mllm(cfg.mllm, cfg.vocab_size, run_dir / "tokenizer", where=f"stage-1 config {cfg.name!r}")
        model.to(device).train()
        lora = adapt(model, cfg)
    use_packed_attention(model)  # per-sample causal SDPA, no dense mask (models/packed_attention.py; not saved)
    n_params = sum(p.numel() for p in model.parameters())  # DTensors count their full size
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # --- data: filter, hold out a validation tail, lengths once for the packer
    items = load_records(cfg.data, exclude_kinds=cfg.exclude_kinds)
    if not any(m.role == "assistant" and m.content for _, rec in items for m in rec.messages):
        raise TrainInputError(f"{cfg.data}: no record has an assistant turn; stage 1 learns the assistant's text "
                              "(a loss of 0 on nothing)")
    if cfg.val_data is not None:
        val_items = load_records([cfg.val_data], exclude_kinds=cfg.exclude_kinds)[: cfg.val_records]
    else:
        items, val_items = hold_out(items, cfg.val_records)
        if not items or len(val_items) < cfg.val_records:
            raise TrainInputError(f"{cfg.data}: {len(items) + len(val_items)} records, not more than "
                                  f"val_records={cfg.val_records} distinct ones")
    lengths = [len(render(it, tokenizer, processor, cfg.max_record_tokens))
               for it in _track(items, "measuring record lengths", progress and env.is_main)]
    sampler = PackedSampler(lengths, cfg.token_budget, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                            names=[rec.id for _, rec in items])

    # --- optimiser, schedule, resume
    optimizer = make_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_scales={"visual.": cfg.vision_lr_scale})
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    step = 0
    if found is not None:
        step = resume(found, model, optimizer, scheduler=scheduler, stateful={"sampler": sampler}).step
        extend_schedule(scheduler, cfg.steps)
    if env.is_main:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        ranks = f" x {env.world_size} ranks" if env.distributed else ""
        print(f"stage 1: {n_params / 1e6:.2f}M params ({n_trained / 1e6:.2f}M trained), {len(items)} train records ({sum(lengths)} tokens), "
              f"{sampler.packs_per_epoch()} packs/epoch per rank, start at step {step}/{cfg.steps} on {device}{ranks}", flush=True)
        warn_packs_per_rank(cfg.packs_per_rank, sampler.packs_per_epoch())

    # --- the loop
    packs = iter(sampler)
    with MetricsLogger(run_dir, cfg.steps, start_step=step, unit="tokens", enabled=env.is_main, progress=progress,
                       description="stage 1") as log:
        tokens_since_log = 0
        while step < cfg.steps:
            # one optimiser step on `packs_per_rank` packs on every rank
            step_packs = [next(packs) for _ in range(cfg.packs_per_rank)]
            step_inputs = [pack_inputs(model, [render(items[i], tokenizer, processor, cfg.max_record_tokens)
                                               for i in pack.items]) for pack in step_packs]
            counts = [int((x["labels"][1:] != IGNORE_INDEX).sum()) for x in step_inputs]  # next_token_loss's n
            n_supervised, n_tokens = all_reduce_sum(
                torch.tensor([sum(counts), sum(p.num_tokens for p in step_packs)]), env).tolist()
            # each pack's share of the mean over the step's supervised tokens on all ranks
            loss = backward_pack_shares((next_token_loss(model, x)[0] for x in step_inputs), counts, n_supervised,
                                        env, autocast)
            grad_norm = clip_grad_norm(model.parameters(), cfg.grad_clip)
            check_finite(step + 1, loss, grad_norm)  # a NaN step is never applied, nor saved over good checkpoints
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            tokens_since_log += n_tokens

            # once in a while: log (rank 0: bar, TensorBoard, metrics.jsonl; --quiet: JSON lines on stdout)
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = log.log(step, loss=loss, lr=scheduler.get_last_lr()[0], items=tokens_since_log,
                                grad_norm=grad_norm, supervised_tokens=n_supervised, pack_tokens=n_tokens,
                                epoch=step_packs[-1].epoch)
                tokens_since_log = 0
                if not progress and env.is_main:
                    print(json.dumps(entry), flush=True)

            # once in a while: held-out loss (every rank: sharded forwards are collectives)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val, accuracy = evaluate_loss(model, val_items, tokenizer, processor, cfg)
                log.log_scalars(step, "val", loss=val, token_accuracy=accuracy)
                if not progress and env.is_main:
                    print(f"step {step}: val loss {val:.4f}, token accuracy {accuracy:.4f}", flush=True)

            # once in a while: greedy answers to a few held-out prompts, as HTML (written by rank 0)
            if step % cfg.sample_every == 0 or step == cfg.steps:
                write_samples(model, tokenizer, processor, val_items[: cfg.num_samples],
                              run_dir / "samples" / f"step-{step:07d}" if env.is_main else None, cfg.max_new_tokens)

            # once in a while: atomic resumable checkpoint (every rank: full state gathered to rank 0)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt_dir, step, model, optimizer, scheduler=scheduler, stateful={"sampler": sampler},
                                config=cfg, keep_last=cfg.keep_last)
            if stop_after is not None and step >= stop_after:
                return run_dir / "mllm"

    # --- export (rank 0; a sharded model is first gathered into a plain copy)
    model.eval()
    if env.distributed:
        full = gather_full_state_dict(model, env)
        if env.is_main:
            model, _, _ = stage1_mllm(cfg.mllm, cfg.vocab_size, run_dir / "tokenizer", meta=True, where=f"stage-1 config {cfg.name!r}")
            lora = adapt(model, cfg)
            load_full_state_dict(model, full, DistEnv(), init_buffers=init_buffers_from_config).eval()
        del full
    if env.is_main:
        if lora is not None:
            from duetgen.train.lora import merge_lora
            model = merge_lora(lora)  # plain Qwen2.5-VL again: stage 2 and from_pretrained never see peft
        save_mllm(model, tokenizer, processor, run_dir / "mllm")
        print(f"stage 1 done: {run_dir / 'mllm'}", flush=True)
    barrier(env)  # every rank returns once mllm/ exists
    return run_dir / "mllm"


@torch.no_grad()
def evaluate_loss(model, val_items, tokenizer, processor, cfg: Stage1Config) -> tuple[float, float]:
    """(token-weighted next-token loss, teacher-forced accuracy of the supervised tokens) on held-out records.

    The accuracy shows what the loss hides on ShapeWorld: whether the model copies the colours, shapes
    and positions from the prompt (the template tokens alone already give about 90%).
    """
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    batch: list[RenderedSequence] = []
    seqs = [render(it, tokenizer, processor, cfg.max_record_tokens) for it in val_items]
    for i, s in enumerate(seqs):
        batch.append(s)
        if i + 1 == len(seqs) or sum(len(b) for b in batch) + len(seqs[i + 1]) > cfg.token_budget:
            inputs = pack_inputs(model, batch)
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[0]
            targets = inputs["labels"][1:]
            supervised = targets != IGNORE_INDEX
            total += F.cross_entropy(logits[:-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            correct += int((logits[:-1].argmax(-1)[supervised] == targets[supervised]).sum())
            count += int(supervised.sum())
            batch = []
    model.train(was_training)
    return total / max(count, 1), correct / max(count, 1)


@torch.no_grad()
def write_samples(model, tokenizer, processor, val_items, out_dir: Path | None, max_new_tokens: int) -> None:
    """Greedy answers to held-out prompts (the truth's images stand in after each `<BOV>`), written as a
    dataset plus an HTML page, next to the truth: stage 1 cannot draw, it only learns when to.

    ``out_dir=None``: decode without writing (the other ranks of a sharded model run the same forwards).
    """
    from duetgen.data.dataset import DatasetWriter
    from duetgen.data.view import render_dataset_html
    from duetgen.infer.pipeline import DuetGenPipeline
    from duetgen.infer.teacher_forcing import greedy_answer_with_truth_images, truth_prompt

    was_training = model.training
    model.eval()
    pipe = DuetGenPipeline(text_only(model, tokenizer, processor), model_id=f"stage 1 {model.config.name_or_path}")
    records = []
    for ds, rec in val_items:
        truth_images = [ds.open_image(p.path, rec.id) for p in rec.image_parts("assistant")]
        prompt = truth_prompt(ds, rec)
        answer = greedy_answer_with_truth_images(pipe, prompt, truth_images, max_new_tokens)
        records.append(Record(id=rec.id, source="stage1-sample", messages=prompt + [answer],
                              meta={"note": "images after <BOV> are the truth's (stage 1 does not draw)"}))
    model.train(was_training)
    if out_dir is None:
        return
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    with DatasetWriter(out_dir, name=out_dir.name) as writer:
        for record in records:
            writer.write(record)
    render_dataset_html(out_dir, out_dir / "index.html", progress=False)


def _track(items, label, progress):
    if not progress:
        return items
    from rich.progress import track
    return track(items, description=label)
