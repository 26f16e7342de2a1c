"""Stage 2: interleaved context alignment (paper sections 4.1-4.2, DESIGN section 6). One flat script, one loop.

    duetgen train stage2 --config toy --stage1 runs/toy/stage1 [--out runs/toy/stage2] [--resume]

The MLLM is frozen (eval mode, no grad); the connector and the DiT train with rectified flow.
Per sequence ONE target image is drawn at random among the assistant images; its conditioning
frames are every image before it in the conversation (user canvases, earlier answer images) and
its text condition is the MLLM's all-layer hidden states of every token before its `<BOV>`
(paper section 4.1). With probability `drop_final_text_prob` the final text chunk is removed from
that condition (what guidance uses as its negative, paper section 4). Instruction data and
transition data are mixed by training on a mixed dataset (`duetgen data mix`); ShapeWorld's
generator already mixes 15% transitions in.

Design choices:
- Packing: each record costs (conditioning frames + 1) x tokens-per-frame DiT tokens; records are
  packed under `latent_token_budget` by `duetgen.data.packing.PackedSampler`, whose lengths are
  a function of the epoch because the target drawn (and with it the number of frames) changes
  every epoch. The draw is a pure function of (seed, epoch, record index), so a resumed run
  redraws exactly the same targets.
- The MLLM runs once per pack, all text prefixes packed in one sequence with a block-diagonal
  causal mask (the stage-1 packing); each prefix ends right before its `<BOV>` (or, when the final
  chunk is dropped, right after the last `<|vision_end|>`). The MLLM is causal, so this equals the
  states of the whole conversation sliced there.
- Loss: `duetgen.diffusion.flow_matching.flow_matching_loss`, mean over the pack's targets.
  Conditioning frames get flow time 0 and no loss (`targets_only=True` skips their output layer).
- "x0 relative to previous" (`x0_relative_to_previous`, default on for ShapeWorld): with the x0
  parameterisation, the network's output is ADDED to the latest conditioning frame (a white
  canvas when there is none) to give x0_hat, so "change nothing" is the zero output. The
  calibration note measured that copying the earlier canvas is what a DiT trained from scratch
  learns slowest (edits kept untouched objects only 44% of the time after 20 minutes); a real
  Cosmos DiT gets copying from video pretraining and trains with the plain parameterisation
  (set it False). It is part of the diffusion process, outside the network, and is stored in
  `duetgen.json`; the loss target here and every drawing (`duetgen.diffusion.draw`) apply the one rule.
- EMA (fp32 shadow, `duetgen.train.optim.EMA`) over connector + DiT: the samples, the exported
  model and the shipped checkpoint use the EMA weights.
- Resume state in the checkpoint: connector + DiT weights (the frozen MLLM comes from --stage1),
  AdamW, LR schedule, EMA, sampler position, every RNG (the time, noise and drop draws come from
  torch's global generator, which the checkpoint restores).
- bf16 autocast only on CUDA.
- Distribution (`torchrun --nproc-per-node N -m duetgen.cli train stage2 ...`, docs/training-infra.md):
  the connector and the DiT train FSDP2-sharded (one unit per DiT block, the connector its own
  unit), built on `meta` and filled from rank 0's initial weights; the frozen MLLM and the
  autoencoder stay replicated. Packs are sharded by rank; the loss is the mean over the step's
  targets on all ranks (FSDP sums gradients), so 2 ranks x 1 pack train like 1 rank x 2 packs
  (`packs_per_rank`; tests/test_train_distributed.py). When a step spans several packs (ranks or
  `packs_per_rank`), each pack draws its text drop, times and noise from its own generator seeded by
  (seed, epoch, global pack position), so the draws do not depend on how packs are split; one pack
  in one process keeps torch's global generator (runs and checkpoints from before are unchanged).
  Every rank runs the validation loss and the EMA samples (collectives); rank 0 logs and writes, and
  exports from a full state dict gathered to it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from duetgen.data.dataset import Dataset, atomic_write_bytes
from duetgen.data.packing import PackedSampler
from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.diffusion.draw import network_x0, previous_canvas, white_canvas_latent
from duetgen.diffusion.flow_matching import FlowMatchingConfig, dit_sample_inputs, flow_matching_loss, sample_time
from duetgen.models.builder import around_mllm, load_mllm
from duetgen.models.mllm import RenderedSequence, all_layer_states, layer_states, negative_prefix_length
from duetgen.train.checkpoint import CheckpointError, load_stateful, open_run_dir, resume, save_checkpoint
from duetgen.train.common import (TrainInputError, check_config_types, check_finite, check_resume, extend_schedule,
                                   hold_out, load_records, pack_inputs, read_json_object, render,
                                   warn_packs_per_rank)
from duetgen.train.configs import Stage2Config
from duetgen.train.logging import MetricsLogger
from duetgen.train.optim import EMA, clip_grad_norm, make_adamw, make_scheduler
from duetgen.train.parallel import (DistEnv, all_reduce_sum, apply_fsdp, backward_pack_shares, barrier, broadcast_module,
                                    destroy_distributed, gather_full_state_dict, init_distributed,
                                    load_full_state_dict)

# ----------------------------------------------------------------------------- model helpers


def build_duetgen(cfg: Stage2Config, mllm, tokenizer, processor, dit_device: str | torch.device | None = None):
    """The stage-2 `DuetGen` around the stage-1 MLLM (`builder.around_mllm`), with settings that record how
    this stage trains (what every drawing must apply) and the sampler its samples measured."""
    from dataclasses import replace

    from duetgen.diffusion.schedules import SamplerConfig
    from duetgen.models import presets

    preset = presets.get_preset(cfg.preset)
    settings = replace(preset.settings, image_size=cfg.image_size or preset.settings.image_size,
                       parameterisation=cfg.parameterisation,
                       x0_relative_to_previous=cfg.x0_relative_to_previous,
                       use_condition_frames=cfg.use_condition_frames, guidance_scale=cfg.guidance_scale,
                       guidance_scale_without_frames=cfg.guidance_scale_without_frames,
                       sampler=SamplerConfig(solver="euler", num_steps=cfg.sample_steps,
                                             shift=cfg.sample_shift))  # what the samples measured
    return around_mllm(cfg.preset, mllm, tokenizer, processor, settings, cfg.recency_tokens, dit_device)


class ConditionStates:
    """The frozen MLLM's text condition for stage 2: all-layer normalised states of each record's
    tokens up to its last ``<BOV>``, from one forward of that record alone, kept after the first time.

    Every condition of a record (any target, with or without its final text chunk) is a prefix of
    those states (the MLLM is causal), so a record costs one MLLM forward per run instead of one per
    draw. Measured on the toy run (docs/training.md, "Stage-2 speed"): the packed MLLM forward was
    about two thirds of a stage-2 step, and one forward per record is faster than the packed one
    (no dense block-diagonal mask). Kept in fp16 (about 150 KB per ShapeWorld record); the value is
    rounded to fp16 on the first computation too, so a resumed run (empty store) sees bit-identical
    conditions. ``keep=False`` computes every time (same values); ``cache_dir`` also keeps them on disk
    for other runs on the same MLLM (`ConditionCache`).
    """

    def __init__(self, mllm, keep: bool = True, cache_dir: str | os.PathLike | None = None,
                 mllm_dir: str | os.PathLike | None = None):
        self.mllm = mllm
        self.keep = keep
        self.store: dict[tuple[str, str], torch.Tensor] = {}
        self.disk = None if cache_dir is None else ConditionCache(cache_dir, mllm_dir)

    @torch.no_grad()
    def prefix(self, key: tuple[str, str], rendered: RenderedSequence, length: int) -> torch.Tensor:
        """(length, n_layers * D) states of ``rendered``'s first ``length`` tokens; ``key`` names the record."""
        full = self.store.get(key)
        if (full is None or len(full) < length) and self.disk is not None:
            full = self.disk.get(key)
        if full is None or len(full) < length:
            end = max([length, *rendered.bov_positions])
            full = all_layer_states(self.mllm, rendered.prefix(end)).to(torch.float16)  # (L, C)
            if self.disk is not None:
                self.disk.put(key, full)
        if self.keep:
            self.store[key] = full
        return full[:length].float()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())


class ConditionCache:
    """`ConditionStates` on disk, shared by runs on the same frozen MLLM (the recipe's two stage-2 phases,
    ablations): one safetensors file per record, written atomically, so a second run skips the MLLM
    forwards of its first epoch (measured in docs/training.md, "Stage-2 speed").

    The folder is bound to one MLLM: ``fingerprint.json`` holds the SHA-256 of the MLLM directory's
    files; a folder made for other weights is refused, never silently mixed.
    """

    def __init__(self, root: str | os.PathLike, mllm_dir: str | os.PathLike | None):
        if mllm_dir is None:
            raise ValueError("a condition cache needs the MLLM directory it belongs to (mllm_dir)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        mine = mllm_fingerprint(mllm_dir)
        stamp = self.root / "fingerprint.json"
        if stamp.is_file():
            theirs = read_json_object(stamp)
            if theirs != mine:
                raise TrainInputError(f"condition cache {self.root} holds states of another MLLM than {mllm_dir} "
                                 f"(its weights differ); use a new cache folder or delete this one")
        else:
            atomic_write_bytes(stamp, json.dumps(mine, indent=1).encode("utf-8"))

    def _path(self, name: str) -> Path:
        import hashlib

        return self.root / (hashlib.sha256(name.encode("utf-8")).hexdigest()[:32] + ".safetensors")

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        from safetensors import safe_open

        name = "\0".join(key)
        path = self._path(name)
        if not path.is_file():
            return None
        with safe_open(path, framework="pt") as f:
            if f.metadata().get("key") != name:
                raise TrainInputError(f"condition cache file {path} belongs to another record ({f.metadata().get('key')!r})")
            return f.get_tensor("states")

    def put(self, key: tuple[str, str], states: torch.Tensor) -> None:
        from safetensors.torch import save

        name = "\0".join(key)
        atomic_write_bytes(self._path(name), save({"states": states.contiguous()}, metadata={"key": name}))


MLLM_BINDING = "mllm.json"  # a stage-2 run's frozen MLLM: its path and fingerprint


def bind_mllm(run_dir: Path, mllm_dir: str | os.PathLike, write: bool = True, fresh: bool = False) -> None:
    """A stage-2 run is bound to the MLLM it conditions on: a fresh start records it (``mllm.json``, replacing
    one a failed first attempt left); a resume or an export with another MLLM is refused (the connector and
    DiT learned that MLLM's states)."""
    path, mine = run_dir / MLLM_BINDING, mllm_fingerprint(mllm_dir)
    if path.is_file() and not fresh:
        bound = read_json_object(path)
        if not isinstance(bound.get("sha256"), dict):
            raise TrainInputError(f"{path}: has no sha256 fingerprint of the run's MLLM")
        if bound["sha256"] != mine:
            raise TrainInputError(f"{run_dir} trained on the MLLM at {bound.get('path')}; {mllm_dir} holds another one "
                                  "(its files differ): give the run's own MLLM, or start a new --out")
    elif write:
        atomic_write_bytes(path, (json.dumps({"path": str(Path(mllm_dir).resolve()), "sha256": mine}, indent=1)
                                  + "\n").encode())


def mllm_fingerprint(mllm_dir: str | os.PathLike) -> dict[str, str]:
    """{file name: SHA-256} of every file directly in an MLLM directory (weights, config, tokenizer)."""
    import hashlib

    root = Path(mllm_dir)
    out = {}
    for p in sorted(root.iterdir()):
        if p.is_file():
            with open(p, "rb") as f:  # in chunks: a 7B model's 4 GB shards never sit in memory whole
                out[p.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


@torch.no_grad()
def mllm_states(mllm, seqs: list[RenderedSequence]) -> list[torch.Tensor]:
    """All-layer normalised states (L_i, n_layers * D) of each sequence, in one packed forward."""
    inputs = pack_inputs(mllm, seqs)
    inputs.pop("labels")
    out = mllm.model(**inputs, output_hidden_states=True, use_cache=False)
    states = layer_states(out.hidden_states)[0]  # (T, n_layers * D)
    return list(states.split([len(s) for s in seqs]))


CHANGED_TOLERANCE = 0.05  # latent units; pixel-shuffle latents are pixels in [-1, 1], so ~6 colour levels


def changed_region(target: torch.Tensor, reference: torch.Tensor, dilation: int = 0) -> torch.Tensor:
    """0/1 mask, shaped like ``target`` (C, h, w), of what a step changes against its reference canvas.

    ``dilation`` 0: the latent values that differ. ``dilation`` r > 0: every channel of every latent
    position within r latent pixels (a square neighbourhood) of a position where any channel differs,
    so the mask covers a changed piece's whole neighbourhood, inside and outside its outline alike.
    """
    changed = (target - reference).abs() > CHANGED_TOLERANCE  # (C, h, w)
    if dilation <= 0:
        return changed.to(target.dtype)
    where = changed.any(0, keepdim=True).to(target.dtype)[None]  # (1, 1, h, w)
    grown = torch.nn.functional.max_pool2d(where, 2 * dilation + 1, stride=1, padding=dilation)[0]  # (1, h, w)
    return grown.expand_as(target).to(target.dtype)


def image_latents(vae, images: list[Image.Image], device) -> list[torch.Tensor]:
    """PIL images -> latents (C, h, w), each encoded on its own (sizes may differ)."""
    from duetgen.models.vae import uint8_to_unit

    tensors = [uint8_to_unit(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None]) for im in images]
    return vae.encode_list([t[0].to(device) for t in tensors])


# ----------------------------------------------------------------------------- data helpers


def image_slots(rec: Record) -> tuple[int, list[int]]:
    """(number of images in the conversation, indices among them of the assistant images)."""
    n, generated = 0, []
    for m in rec.messages:
        for p in m.content:
            if isinstance(p, ImagePart):
                if m.role == "assistant":
                    generated.append(n)
                n += 1
    return n, generated


def image_sizes(ds: Dataset, rec: Record) -> list[tuple[int, int]]:
    """(width, height) of every image of the conversation, from the file headers (no decoding)."""
    sizes = []
    for p in (p for m in rec.messages for p in m.content if isinstance(p, ImagePart)):
        with Image.open(ds.image_path(p.path, rec.id)) as im:
            sizes.append(im.size)
    return sizes


def draw_targets(items, seed: int, epoch: int) -> list[int]:
    """The target image (index among the conversation's images) of every record for one epoch: uniform
    among its assistant images, a pure function of (seed, epoch) so resume redraws the same."""
    rng = np.random.default_rng([seed, epoch, 2])
    return [int(rng.choice(image_slots(rec)[1])) for _, rec in items]


def check_size(image: Image.Image, multiple: int, where: str) -> None:
    if image.width % multiple or image.height % multiple:
        raise TrainInputError(f"{where}: image of {image.width}x{image.height} is not a multiple of {multiple} pixels "
                         "(autoencoder factor x DiT patch); resize the dataset's images")


# ----------------------------------------------------------------------------- one pack -> loss


def pack_loss(batch: list[dict], condition: ConditionStates, connector, dit, vae, cfg: Stage2Config,
              fm: FlowMatchingConfig, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean flow-matching loss over the pack's targets. ``batch`` items: rendered, target, images, drop, key.

    Random draws (times, noise) come from ``generator`` (None: torch's global one, restored by resume).
    """
    # 1. text condition: states of the tokens before each target's <BOV> (or the negative prefix)
    # (the negative is a slice of the connector's output, as in the engine: the step marker counts from the <BOV>)
    text = []
    for b in batch:
        rendered = b["rendered"]
        bov = next(s.bov_position for s in rendered.images if s.index == b["target"])
        length = negative_prefix_length(rendered, bov) if b["drop"] else bov
        states = condition.prefix(b["key"], rendered, bov)  # (bov, C)
        text.append(connector(states.to(device))[:length])  # (L_i, D_cross)

    # 2. latents of the context images and the target, flow time, noise
    latents = [image_latents(vae, b["images"], device) for b in batch]  # per sample [(C, h, w) ...]
    x0 = [lat[-1] for lat in latents]
    conds = [lat[:-1] if cfg.use_condition_frames else [] for lat in latents]
    t = sample_time(len(batch), fm, generator=generator).to(device)  # (B,)
    noise = [torch.randn(x.shape, generator=generator).to(device) for x in x0]

    # 3. the DiT: conditioning frames at time 0, target at x_t
    frames, times, masks = [], [], []
    for i in range(len(batch)):
        x_t = (1 - t[i]) * x0[i] + t[i] * noise[i]  # (C, h, w)
        f, tt, m = dit_sample_inputs(conds[i], x_t, t[i])
        frames.append(f), times.append(tt), masks.append(m)
    out = dit(frames=frames, timesteps=times, condition_mask=masks, text=text, targets_only=True)

    # 4. loss on the targets (x0 relative to the previous canvas when configured: the drawing's own rule)
    losses = []
    for i in range(len(batch)):
        previous = None  # the latest conditioning frame, or white (a VAE encode: only when used)
        if cfg.x0_relative_to_previous or cfg.changed_loss_weight > 0:
            height, width = batch[i]["images"][-1].size[::-1]
            previous = previous_canvas(conds[i], lambda: white_canvas_latent(vae, height, width, "cpu").to(device))
        raw = network_x0(out[i][0], previous if cfg.x0_relative_to_previous else None)  # (C, h, w)
        weight = None
        if cfg.changed_loss_weight > 0:  # what the step changes is a few % of the canvas: weigh it up
            weight = 1 + cfg.changed_loss_weight * changed_region(x0[i], previous, cfg.changed_loss_dilation)
        losses.append(flow_matching_loss(raw, x0[i], noise[i], t[i], cfg.parameterisation, fm.x0_min_t, weight))
    return torch.stack(losses).mean()


def make_batch(indices, items, targets, tokenizer, processor, drop_prob: float, generator=None,
               fit_image=None) -> list[dict]:
    """Render each record and load its images up to the target; draw whether its final text chunk is dropped.

    ``fit_image``: resizes each image to the size the DiT draws at (`DuetGen.fit_image`; None: as stored).
    """
    batch = []
    for i in indices:
        ds, rec = items[i]
        k = targets[i]
        parts = [p for m in rec.messages for p in m.content if isinstance(p, ImagePart)][: k + 1]
        images = [ds.open_image(p.path, rec.id) for p in parts]
        if fit_image is not None:
            images = [fit_image(im) for im in images]
        drop = bool(torch.rand((), generator=generator) < drop_prob)
        batch.append({"rendered": render(items[i], tokenizer, processor), "target": k, "images": images,
                      "drop": drop, "id": rec.id, "key": (str(ds.root), rec.id)})
    return batch


# ----------------------------------------------------------------------------- training


def generator_state(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The connector + DiT weights of a trained DuetGen directory (`Stage2Config.init_from`), keyed as
    the training ModuleDict {"connector", "dit"}; the directory's MLLM is not loaded (the run has its own,
    which may be further trained). Loading into the run's modules is strict: a mismatch names the key."""
    from diffusers import CosmosTransformer3DModel
    from safetensors.torch import load_file

    from duetgen.models.duetgen import CONNECTOR_FILE, read_directory
    from duetgen.models.video_dit import PackedCosmosDiT

    root = Path(model_dir)
    read_directory(root)  # the directory's checks (files, connector keys and shapes) before any weight is read
    dit = CosmosTransformer3DModel.from_pretrained(root / "dit", local_files_only=True, use_safetensors=True)
    state = {f"dit.{k}": v for k, v in PackedCosmosDiT(dit).state_dict().items()}
    return state | {f"connector.{k}": v for k, v in load_file(root / CONNECTOR_FILE).items()}


NEW_MODULE_KEYS = {"connector.recency.weight"}  # may be absent from an init_from model: zero rows = no marker yet


def load_generator_state(trainable: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load an init_from state strictly, except that a step marker this run adds and ``source`` lacks keeps
    its zero initialisation (the marker then starts as a no-op, as in a fresh run)."""
    missing, unexpected = trainable.load_state_dict(state, strict=False)
    if unexpected or set(missing) - NEW_MODULE_KEYS:
        raise TrainInputError(f"{source}: its connector + DiT do not fit this run's: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")


def pack_generator(seed: int, pack) -> torch.Generator:
    """The generator of one pack's random draws: a pure function of (seed, epoch, global pack position),
    so a pack draws the same on whichever rank and in whichever slot of a step it lands."""
    state = np.random.SeedSequence([seed, pack.epoch, pack.position, 4]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def build_sharded_duetgen(cfg: Stage2Config, mllm, tokenizer, processor, env: DistEnv,
                          init_from: str | os.PathLike | None = None):
    """Distributed runs: the DuetGen with connector and DiT FSDP2-sharded; the frozen MLLM and the
    autoencoder stay replicated (they do not train).

    Rank 0 builds the initial connector + DiT exactly as a single process does (same seed, same
    weights), or with ``init_from`` reads the trained ones of that DuetGen directory; every rank builds
    them on ``meta``, shards them (a unit per DiT block) and receives rank 0's weights tensor by tensor
    (its shard only).
    """
    init, vae_state = {}, {}
    if env.is_main:
        reference = build_duetgen(cfg, mllm, tokenizer, processor)
        init = nn.ModuleDict({"connector": reference.connector, "dit": reference.dit}).state_dict()
        if init_from is not None:  # a trained connector + DiT instead of the random ones (Stage2Config.init_from)
            init = generator_state(init_from)
        vae_state = reference.vae.state_dict()
        del reference
    model = build_duetgen(cfg, mllm, tokenizer, processor, dit_device="meta")
    if env.is_main:
        model.vae.load_state_dict(vae_state)
    broadcast_module(model.vae.to(env.device), env)  # a randomly initialised autoencoder must match on every rank
    model.mllm.to(env.device)
    apply_fsdp(model.dit, model.dit.transformer_blocks, env, sum_gradients=True)  # summed: the loss is a global mean
    # The connector is its own root (it runs outside the DiT's forward), called once per sample, i.e. a
    # different number of times on each rank: gathered once and kept until backward, never per call.
    apply_fsdp(model.connector, [], env, sum_gradients=True, reshard_after_forward=False)
    load_full_state_dict(nn.ModuleDict({"connector": model.connector, "dit": model.dit}), init, env)
    return model


def train(cfg: Stage2Config, mllm_dir: str | os.PathLike, run_dir: str | os.PathLike, resume_run: bool = False,
          progress: bool = True, stop_after: int | None = None) -> Path:
    """Train stage 2 into ``run_dir``; returns ``run_dir/model`` (the DuetGen directory).

    Under torchrun every rank calls this; the process group is started here (unless the caller
    started one) and ended on return.
    """
    started = not torch.distributed.is_initialized()
    env = init_distributed()
    try:
        return _train(cfg, mllm_dir, run_dir, env, resume_run, progress, stop_after)
    finally:
        if started:
            destroy_distributed()


def _train(cfg: Stage2Config, mllm_dir, run_dir, env: DistEnv, resume_run: bool, progress: bool,
           stop_after: int | None) -> Path:
    # --- setup
    run_dir, found = open_run_dir(run_dir, resume_run, inputs=[mllm_dir, *cfg.data, cfg.init_from,
                                                               cfg.condition_cache])
    if found is not None:
        cfg = check_resume(found, cfg)  # before anything loads: another config is refused by name
    ckpt_dir = run_dir / "checkpoints"
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = env.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    bind_mllm(run_dir, mllm_dir, write=env.is_main, fresh=found is None)
    mllm, tokenizer, processor = load_mllm(mllm_dir)
    condition = ConditionStates(mllm, keep=cfg.keep_mllm_states, cache_dir=cfg.condition_cache, mllm_dir=mllm_dir)
    if env.distributed:
        model = build_sharded_duetgen(cfg, mllm, tokenizer, processor, env,
                                      init_from=cfg.init_from if found is None else None)
    else:
        model = build_duetgen(cfg, mllm, tokenizer, processor).to(device)
    connector, dit, vae = model.connector, model.dit, model.vae
    trainable = nn.ModuleDict({"connector": connector, "dit": dit}).train()  # the DiT's crossattn_proj IS the connector
    if cfg.init_from is not None and found is None:
        if not env.distributed:  # (distributed runs loaded them in build_sharded_duetgen)
            load_generator_state(trainable, generator_state(cfg.init_from), cfg.init_from)
        if env.is_main:
            print(f"stage 2: connector + DiT start from {cfg.init_from}", flush=True)
    n_params = sum(p.numel() for p in trainable.parameters())
    fm = FlowMatchingConfig(parameterisation=cfg.parameterisation, time_distribution=cfg.time_distribution,
                            time_shift=cfg.time_shift, x0_min_t=cfg.x0_min_t)
    multiple = model.pixel_multiple

    # --- data: records with at least one assistant image; a validation tail
    items = [it for it in load_records(cfg.data, include_kinds=cfg.include_kinds) if image_slots(it[1])[1]]
    items, val_items = hold_out(items, cfg.val_records)
    if not items or len(val_items) < cfg.val_records:
        raise TrainInputError(f"{cfg.data}: {len(items) + len(val_items)} records with assistant images, not more "
                              f"than val_records={cfg.val_records} distinct ones")
    def drawn_tokens(width: int, height: int) -> int:  # DiT tokens of an image at the size it is drawn at
        h, w = model.generation_size(height, width)
        return (h // multiple) * (w // multiple)

    image_tokens = [[drawn_tokens(w, h) for w, h in image_sizes(ds, rec)] for ds, rec in items]

    def lengths(epoch: int) -> list[int]:
        """DiT tokens of each record this epoch: its target frame, plus every earlier image as a frame."""
        targets = draw_targets(items, cfg.seed, epoch)
        return [sum(tokens[: k + 1]) if cfg.use_condition_frames else tokens[k] for tokens, k in zip(image_tokens, targets)]

    sampler = PackedSampler(lengths, cfg.latent_token_budget, seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    target_cache: dict[int, list[int]] = {}

    def targets_of(epoch: int) -> list[int]:
        if epoch not in target_cache:
            target_cache.clear()
            target_cache[epoch] = draw_targets(items, cfg.seed, epoch)
        return target_cache[epoch]

    # --- optimiser, schedule, EMA, resume
    optimizer = make_adamw(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    ema = EMA(trainable, decay=cfg.ema_decay)
    step = 0
    if found is not None:
        step = resume(found, trainable, optimizer, scheduler=scheduler, stateful={"sampler": sampler, "ema": ema}).step
        extend_schedule(scheduler, cfg.steps)
    if env.is_main:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        ranks = f" x {env.world_size} ranks" if env.distributed else ""
        print(f"stage 2: {n_params / 1e6:.2f}M trainable params (connector + DiT), MLLM frozen, {len(items)} train "
              f"records, {sampler.packs_per_epoch()} packs/epoch per rank, start at step {step}/{cfg.steps} on "
              f"{device}{ranks}", flush=True)
        warn_packs_per_rank(cfg.packs_per_rank, sampler.packs_per_epoch())

    # --- the loop
    packs = iter(sampler)
    global_draws = cfg.packs_per_rank == 1 and not env.distributed  # one pack per step: torch's global generator
    with MetricsLogger(run_dir, cfg.steps, start_step=step, unit="samples", enabled=env.is_main, progress=progress,
                       description="stage 2") as log:
        samples_since_log, steps_clock = 0, (step, time.perf_counter())  # steps/s: what bounds a CPU recipe
        while step < cfg.steps:
            # one optimiser step on `packs_per_rank` packs on every rank (draws: module docstring)
            step_packs = [next(packs) for _ in range(cfg.packs_per_rank)]
            generators = [None if global_draws else pack_generator(cfg.seed, p) for p in step_packs]
            batches = [make_batch(p.items, items, targets_of(p.epoch), tokenizer, processor, cfg.drop_final_text_prob,
                                  generator=g, fit_image=model.fit_image) for p, g in zip(step_packs, generators)]
            for b in (b for batch in batches for b in batch):
                for im in b["images"]:
                    check_size(im, multiple, f"record {b['id']!r}")
            n_samples, n_tokens = all_reduce_sum(
                torch.tensor([sum(map(len, batches)), sum(p.num_tokens for p in step_packs)]), env).tolist()
            # each pack's share of the mean over the step's targets on all ranks
            loss = backward_pack_shares((pack_loss(b, condition, connector, dit, vae, cfg, fm, device, generator=g)
                                         for b, g in zip(batches, generators)), list(map(len, batches)), n_samples,
                                        env, autocast)
            grad_norm = clip_grad_norm(trainable.parameters(), cfg.grad_clip)
            check_finite(step + 1, loss, grad_norm)  # a NaN step is never applied, nor saved over good checkpoints
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema.update(trainable)
            step += 1
            samples_since_log += n_samples

            # once in a while: log (rank 0: bar, TensorBoard, metrics.jsonl; --quiet: JSON lines on stdout)
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = log.log(step, loss=loss, lr=scheduler.get_last_lr()[0], items=samples_since_log,
                                grad_norm=grad_norm, pack_samples=n_samples, pack_tokens=n_tokens,
                                mllm_states_mb=condition.nbytes / 2**20,
                                steps_per_s=(step - steps_clock[0]) / max(time.perf_counter() - steps_clock[1], 1e-9))
                samples_since_log, steps_clock = 0, (step, time.perf_counter())
                if not progress and env.is_main:
                    print(json.dumps(entry), flush=True)

            # once in a while: validation loss (fixed times and noise) and exactness of EMA samples
            # (every rank: sharded forwards are collectives; rank 0 writes)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = validation_loss(val_items, condition, connector, dit, vae, cfg, fm, tokenizer, processor, device,
                                      fit_image=model.fit_image)
                log.log_scalars(step, "val", loss=val)
                if not progress and env.is_main:
                    print(f"step {step}: val loss {val:.4f}", flush=True)
            if step % cfg.sample_every == 0 or step == cfg.steps:
                page = run_dir / "samples" / f"step-{step:07d}.html" if env.is_main else None
                exact = write_samples(page, val_items[: cfg.num_samples], model, trainable, ema, cfg, step)
                log.log_scalars(step, "val", sample_exact=exact)
                if not progress and env.is_main:
                    print(f"step {step}: EMA samples exact {exact:.3f}", flush=True)

            # once in a while: atomic resumable checkpoint (every rank: full state gathered to rank 0)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt_dir, step, trainable, optimizer, scheduler=scheduler,
                                stateful={"sampler": sampler, "ema": ema}, config=cfg, keep_last=cfg.keep_last)
            if stop_after is not None and step >= stop_after:
                return run_dir / "model"

    # --- export the EMA weights as a DuetGen directory (rank 0; sharded weights gathered into a plain copy)
    ema.copy_to(trainable)
    if env.distributed:
        full = gather_full_state_dict(trainable, env)
        if env.is_main:
            plain = build_duetgen(cfg, mllm, tokenizer, processor, dit_device="meta")
            plain.vae.load_state_dict(vae.state_dict())
            load_full_state_dict(nn.ModuleDict({"connector": plain.connector, "dit": plain.dit}), full, DistEnv())
            model = plain
        del full
    if env.is_main:
        model.save_pretrained(run_dir / "model", overwrite=True)
        print(f"stage 2 done: {run_dir / 'model'}", flush=True)
    barrier(env)  # every rank returns once model/ exists
    return run_dir / "model"


@torch.no_grad()
def validation_loss(val_items, condition: ConditionStates, connector, dit, vae, cfg, fm, tokenizer, processor,
                    device, fit_image=None) -> float:
    """Loss on the held-out records at fixed targets, times, noise and no text drop (comparable across steps)."""
    generator = torch.Generator().manual_seed(1234)
    targets = [image_slots(rec)[1][-1] for _, rec in val_items]  # the last answer image: the most context
    total = 0.0
    chunks = [list(range(i, min(i + 16, len(val_items)))) for i in range(0, len(val_items), 16)]
    was = dit.training
    dit.eval(), connector.eval()
    for chunk in chunks:
        batch = make_batch(chunk, val_items, targets, tokenizer, processor, drop_prob=0.0, fit_image=fit_image)
        total += pack_loss(batch, condition, connector, dit, vae, cfg, fm, device, generator=generator).item() * len(chunk)
    dit.train(was), connector.train(was)
    return total / len(val_items)


@torch.no_grad()
def write_samples(page: Path | None, val_items, model, trainable, ema, cfg: Stage2Config, step: int) -> float:
    """Draw the last answer image of a few held-out records with the EMA weights through the engine of
    `duetgen generate` (truth context, `<BOV>` forced: `duetgen.infer.teacher_forcing.draw_teacher_forced`), write truth and
    sample side by side as HTML; return the fraction read back exactly equal."""
    from duetgen.infer.engine import GenerationConfig
    from duetgen.infer.pipeline import DuetGenPipeline
    from duetgen.infer.teacher_forcing import draw_teacher_forced, teacher_forced_context
    from duetgen.shapeworld.judge import read_canvas
    from duetgen.train.logging import write_samples_html

    backup = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
    ema.copy_to(trainable)
    trainable.eval()
    pipe = DuetGenPipeline(model, model_id=f"stage2 step {step} (EMA)")
    records, exact = [], []
    for i, (ds, rec) in enumerate(val_items):
        k = len(rec.image_parts("assistant")) - 1
        messages, truth = teacher_forced_context(ds, rec, k)
        config = GenerationConfig(seed=i, num_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
        sample = draw_teacher_forced(pipe, messages, config)
        truth_reading, sample_reading = read_canvas(truth), read_canvas(sample)
        exact.append(sample_reading.clean and {(p.colour, p.shape, p.position) for p in sample_reading.pieces}
                     == {(p.colour, p.shape, p.position) for p in truth_reading.pieces})
        context_text = " ".join(p.text for m in messages for p in m.content if isinstance(p, TextPart))
        context_images = [p for m in messages for p in m.content if isinstance(p, ImagePart)]
        records.append(Record(id=rec.id, source="stage2-sample", messages=[
            Message("user", [*context_images, TextPart("…" + context_text[-300:])]),
            Message("assistant", [TextPart("truth:"), ImagePart(truth), TextPart("EMA sample:"), ImagePart(sample),
                                  TextPart("exact" if exact[-1] else "not exact")])]))
    if page is not None:  # None: another rank of a sharded run (same forwards, nothing written)
        write_samples_html(page, records, title=f"stage 2, step {step}", subtitle="last answer image, truth context")
    trainable.load_state_dict(backup)
    trainable.train()
    return float(np.mean(exact))


def export_checkpoint(checkpoint: str | os.PathLike, cfg: Stage2Config, mllm_dir: str | os.PathLike,
                      out: str | os.PathLike, use_ema: bool = True, overwrite: bool = False) -> Path:
    """A DuetGen directory from a stage-2 training checkpoint (its EMA weights, or the raw ones), e.g. to
    evaluate step N. ``out`` must be new unless ``overwrite``; it may never hold the run itself."""
    run_dir, target = Path(checkpoint).resolve().parent.parent, Path(out).resolve()
    if run_dir.is_relative_to(target) or target.is_relative_to(run_dir):  # (--out RUN/checkpoints replaced them all)
        raise TrainInputError(f"--out {str(out)!r} holds or lies inside the run {str(run_dir)!r}: exporting there "
                              "could replace its checkpoints; export beside the run")
    check_config_types(cfg, run_dir / "config.json")
    checkpoint = Path(checkpoint)
    bind_mllm(run_dir, mllm_dir, write=False)  # the run's own MLLM, when the run recorded it
    mllm, tokenizer, processor = load_mllm(mllm_dir)
    model = build_duetgen(cfg, mllm, tokenizer, processor)
    trainable = nn.ModuleDict({"connector": model.connector, "dit": model.dit})
    ema = EMA(trainable, decay=cfg.ema_decay)
    try:
        load_stateful(checkpoint, "ema", ema)
    except CheckpointError as e:  # names the file; the CLI reports a TrainInputError as one line
        raise TrainInputError(str(e)) from None
    if use_ema:
        ema.copy_to(trainable)
    else:
        from safetensors.torch import load_file

        raw = load_file(str(checkpoint / "model.safetensors"))
        if set(raw) != set(trainable.state_dict()):
            raise TrainInputError(f"{checkpoint}/model.safetensors does not hold this run's connector + DiT weights")
        trainable.load_state_dict(raw)
    return model.save_pretrained(out, overwrite=overwrite)

