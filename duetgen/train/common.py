"""What both training stages share: reading the datasets, rendering a stored record, packing rendered
records into one model call, resuming on a schedule of another length.

The stage scripts stay one flat file each (nanoGPT's train.py); what they would otherwise copy from each
other lives here, and nothing here knows which stage calls it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path

import torch

from duetgen.data.dataset import Dataset
from duetgen.data.packing import block_diagonal_mask, concat_packed
from duetgen.data.record import Record
from duetgen.models.mllm import IGNORE_INDEX, RenderedSequence, render_record, rope_position_ids
from duetgen.models.packed_attention import uses_packed_attention


class TrainInputError(ValueError):
    """The run's data, starting weights or settings cannot train (the CLI prints it as a one-line error); a
    ValueError from anywhere else is a bug and keeps its traceback."""


class TrainDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite: the run stops before the step is applied, so no
    checkpoint holds non-finite weights. A resume would replay the same steps exactly (it is bit-exact), so
    the way on is a new run with other settings."""


def read_json_object(path: str | os.PathLike) -> dict:
    """A run folder's JSON file that holds an object (the folder may come from elsewhere: TrainInputError naming
    the file, not a traceback, when it does not)."""
    try:
        value = json.loads(Path(path).read_text())
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep for the parser
        raise TrainInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise TrainInputError(f"{path}: must hold a JSON object; got {type(value).__name__}")
    return value


def check_config_types(cfg, source) -> None:
    """Refuse a config whose values are not of its fields' types (a run's config.json edited or copied from
    elsewhere: ``source`` names it), before anything computes with a string where a number belongs."""
    hints = typing.get_type_hints(type(cfg))
    wrong = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
             if not _of_type(getattr(cfg, f.name), hints[f.name])]
    if wrong:
        raise TrainInputError(f"{source}: value(s) of the wrong type: {', '.join(wrong)}")


def _of_type(value, hint) -> bool:
    """isinstance for the annotations configs use (int, float, str, bool, list[X], X | None) on JSON values."""
    if isinstance(hint, types.UnionType):
        return any(_of_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return type(value) is list and all(_of_type(v, typing.get_args(hint)[0]) for v in value)
    return type(value) in ((int, float) if hint is float else (hint,))  # exact: a bool is no int here


def check_finite(step: int, loss: float, grad_norm: float) -> None:
    """Raise ``TrainDiverged`` before a step whose loss or gradient norm is NaN / inf is applied."""
    if not (math.isfinite(float(loss)) and math.isfinite(grad_norm)):
        raise TrainDiverged(f"step {step}: loss {float(loss)}, gradient norm {grad_norm}: training diverged; the step "
                            "was not applied and the checkpoints hold finite weights. Start a new run (a new --out) "
                            "with other settings: a lower learning rate, clean data")


# Settings a resumed run may change: how long it runs, how often it logs / evaluates / samples / saves,
# threads, memory knobs and what the exported model draws with by default. Anything else (data, model,
# optimiser, schedule, seeds, init) would make the resumed run a different run than its config.json says.
RESUME_MAY_CHANGE = frozenset({"name", "steps", "threads", "log_every", "eval_every", "sample_every", "save_every",
                               "keep_last", "num_samples", "max_new_tokens", "sample_steps", "sample_shift",
                               "guidance_scale", "guidance_scale_without_frames", "keep_mllm_states",
                               "condition_cache"})
PATH_FIELDS = ("data", "val_data", "mllm", "init_from")  # compared as absolute paths (a recipe's OUT became one)


def check_resume(checkpoint, cfg):
    """``cfg`` for resuming ``checkpoint``: refused (naming what differs) when it changes a setting the run
    was trained with (but ``RESUME_MAY_CHANGE``) or asks for fewer steps than are done. The warm-up is the
    run's own (the CLI shortens it for a short first run; a longer resume keeps the schedule it started)."""
    path = Path(checkpoint) / "meta.json"
    meta = read_json_object(path)
    saved, new = meta.get("config"), dataclasses.asdict(cfg)
    if type(meta.get("step")) is not int:  # bool is an int subclass, and no step count
        raise TrainInputError(f"{path}: step must be an int; got {meta.get('step')!r}")
    if meta["step"] > cfg.steps:
        raise TrainInputError(f"{checkpoint} is at step {meta['step']}, past --steps {cfg.steps}")
    if not isinstance(saved, dict):
        return cfg  # a checkpoint saved without its config: nothing to compare
    if isinstance(saved.get("warmup_steps"), int):
        cfg = dataclasses.replace(cfg, warmup_steps=saved["warmup_steps"])
        new["warmup_steps"] = saved["warmup_steps"]
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING}

    def same(k) -> bool:
        if k not in saved:  # a field added since the checkpoint was written: fine at its default
            return new.get(k) == defaults.get(k)
        a, b = saved.get(k), new.get(k)
        if k in PATH_FIELDS:
            a, b = (_absolute(x) for x in (a, b))
        return a == b

    changed = [k for k in sorted(set(saved) | set(new)) if k not in RESUME_MAY_CHANGE and not same(k)]
    if changed:
        what = "; ".join(f"{k} {saved.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise TrainInputError(f"--resume of {checkpoint.parent.parent} with other settings ({what}): a run trains "
                              "on one config (steps, logging and saving may change); resume with the --config and "
                              "--data the run started with (its config.json lists them), or start a new --out")
    return cfg


def _absolute(v):
    if isinstance(v, str):
        return os.path.abspath(v)
    if isinstance(v, list):
        return [_absolute(x) for x in v]
    return v


def load_records(dirs: list[str], include_kinds: list[str] | None = None,
                 exclude_kinds: list[str] = ()) -> list[tuple[Dataset, Record]]:
    """Every record of the datasets (in order) whose ``meta.kind`` passes the filters, with its dataset. An
    entry that is a file is a `duetgen data mix` manifest: its samples, in its order (a record drawn twice
    is there twice)."""
    from duetgen.data.mixing import Mixture

    def keep(rec: Record) -> bool:
        kind = (rec.meta or {}).get("kind")
        return not (kind in exclude_kinds or (include_kinds is not None and kind not in include_kinds))

    out = []
    for d in dirs:
        if Path(d).is_file():
            mix = Mixture(d)
            for i in range(len(mix)):
                _, rec = mix[i]
                if keep(rec):
                    out.append((mix.dataset(mix.samples[i][0]), rec))
            continue
        ds = Dataset(Path(d).resolve())  # one spelling per dataset (hold_out and stage 2's condition cache key on it)
        out.extend((ds, rec) for rec in ds if keep(rec))
    if not out:
        raise TrainInputError(f"no records left in {dirs} after filtering kinds (include {include_kinds}, exclude {exclude_kinds})")
    return out


def hold_out(items: list[tuple[Dataset, Record]], n: int) -> tuple[list, list]:
    """(train, validation): the last ``n`` distinct records (by dataset and id) are held out and every copy of
    them leaves training (a `duetgen data mix` manifest repeats records; a repeat in the tail broke the
    sample pages, and a held-out record must not be trained on). Without repeats: items[:-n], items[-n:]."""
    val, held = [], set()
    for ds, rec in reversed(items):
        key = (str(ds.root), rec.id)
        if key not in held:
            held.add(key)
            val.append((ds, rec))
            if len(val) == n:
                break
    return [it for it in items if (str(it[0].root), it[1].id) not in held], val[::-1]


def render(item: tuple[Dataset, Record], tokenizer, processor, max_tokens: int | None = None) -> RenderedSequence:
    """A stored record -> token ids + stage-1 labels + pixels (images read through the dataset: root enforced)."""
    ds, rec = item
    return render_record(rec, tokenizer, processor, load_image=lambda part: ds.open_image(part.path, rec.id),
                         max_tokens=max_tokens)


def pack_inputs(model, seqs: list[RenderedSequence]) -> dict[str, torch.Tensor]:
    """Packed model kwargs for several rendered conversations (batch of one, no attention across them)."""
    device = model.device
    packed = concat_packed([{"input_ids": s.input_ids, "labels": s.labels} for s in seqs], label_key="labels",
                           ignore_index=IGNORE_INDEX)  # labels[first token of each sample] = ignore
    position_ids = torch.cat([rope_position_ids(model, s.input_ids.to(device), (None if s.image_grid_thw is None else s.image_grid_thw.to(device)))
                              for s in seqs], dim=1)  # (3, T): mrope restarts in every sample
    inputs = {
        "input_ids": packed["input_ids"][None].to(device),  # (1, T)
        "position_ids": position_ids[:, None],  # (3, 1, T)
        "labels": packed["labels"].to(device),  # (T,), shifted in next_token_loss
    }
    if uses_packed_attention(model):  # per-sample causal SDPA (models/packed_attention.py): boundaries, no mask
        cu = packed["cu_seqlens"].to(device=device, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:
        inputs["attention_mask"] = block_diagonal_mask(packed["cu_seqlens"])[None, None].to(device)  # (1, 1, T, T) bool
    images = [s for s in seqs if s.pixel_values is not None]
    if images:
        inputs["pixel_values"] = torch.cat([s.pixel_values for s in images]).to(device)  # (N_patches, C*T*P*P)
        inputs["image_grid_thw"] = torch.cat([s.image_grid_thw for s in images]).to(device)  # (n_images, 3)
    return inputs


def warn_packs_per_rank(packs_per_rank: int, packs_per_epoch: int) -> None:
    """A step asks each rank for more packs than an epoch holds: the sampler starts a new epoch inside the step, so
    a step sees records twice (their loss counts twice). Allowed (tiny data, a smoke run), said once."""
    if packs_per_rank > packs_per_epoch:
        print(f"warning: --packs-per-rank {packs_per_rank} is more than the {packs_per_epoch} pack(s) an epoch holds "
              "on each rank: every step sees some records more than once", flush=True)


def extend_schedule(scheduler, total_steps: int) -> None:
    """A resumed run whose config asks for another number of steps (``--resume --steps N``) continues on
    the cosine of the new length from where it is: the checkpoint stored the old length with the schedule."""
    schedule = scheduler.lr_lambdas[0]
    if schedule.total_steps != total_steps:
        print(f"schedule: {schedule.total_steps} -> {total_steps} total steps (resumed with another --steps)", flush=True)
        schedule.total_steps = total_steps
