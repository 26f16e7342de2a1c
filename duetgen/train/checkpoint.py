"""Atomic, resumable training checkpoints: safetensors + JSON, no pickle anywhere.

    save_checkpoint(run_dir, step, model, optimizer, scheduler=scheduler,
                    stateful={"sampler": sampler, "ema": ema}, config=cfg, keep_last=3)
    if (ckpt := latest_checkpoint(run_dir)) is not None:
        step = resume(ckpt, model, optimizer, scheduler=scheduler, stateful={"sampler": sampler, "ema": ema}).step

Layout of one checkpoint (docs/training-infra.md has the full description)::

    run_dir/
      latest                       "step-0000200\\n", replaced atomically after the directory is complete
      step-0000200/
        model.safetensors          weights by parameter name (only trainable ones if trainable_only)
        optimizer.safetensors      optimiser tensors (exp_avg, exp_avg_sq, step), keyed by param name
        optimizer.json             optimiser structure: param groups and hyper-parameters, tensor refs
        state.safetensors          tensors of the statefuls (e.g. the EMA shadow)
        state.json                 scheduler, sampler (data position), EMA, ... with tensor refs
        rng/rank-00000.json        python, numpy, torch CPU and CUDA generator states of each rank
        meta.json                  step, world size, config, file list; written last

Design choices:
- Atomic: everything is written into ``.tmp-step-NNNNNNN/``, fsynced, then renamed to
  ``step-NNNNNNN/``, and only then is ``latest`` replaced (tmp file + os.replace). A ``step-*``
  directory is complete by construction; a run killed mid-save leaves only a ``.tmp-*`` directory,
  which the next save removes and ``resume`` never reads.
- No pickle: tensors go to safetensors, structure to JSON (tensor leaves become
  ``{"__tensor__": key, "shape": ..., "dtype": ...}``, tuples ``{"__tuple__": [...]}``). So a
  checkpoint from anywhere can be loaded without executing code; ``torch.load`` is never used.
- FSDP2: full state dicts gathered to rank 0 (``torch.distributed.checkpoint.state_dict`` with
  ``full_state_dict=True, cpu_offload=True``), written by rank 0; loading reads on rank 0 and
  broadcasts (``broadcast_from_rank0=True``), each rank keeping only its shard. Chosen over DCP's
  sharded format because (1) DCP's ``.metadata`` file is a pickle (``FileSystemReader.read_metadata``
  calls ``pickle.load``), (2) ``model.safetensors`` opens in plain safetensors/transformers/diffusers
  tools, and (3) the files do not depend on the world size, so a run can resume on another number
  of ranks. The cost: rank 0's host memory must hold the full model (and, one at a time, the full
  optimiser state) at save and load time; above a few tens of billions of parameters switch to DCP.
- Statefuls are any objects with ``state_dict()``/``load_state_dict()`` whose state is the same on
  every rank (scheduler, sampler) or sharded as DTensors (EMA under FSDP2): DTensors are gathered at
  save, and re-sharded like the live object's tensors at load (``distribute_tensor`` from rank 0).
- RNG states are per rank (each rank draws its own dropout masks), so each rank writes its own
  file; exact resume therefore needs the same world size (``restore_rng=False`` to resume on
  another, knowingly giving up bitwise equality).
- Multi-node runs need ``run_dir`` on a shared file system: every rank writes its RNG file there.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from duetgen.data.dataset import atomic_write_bytes, fsync_dir

FORMAT = "duetgen-checkpoint/1"
STEP_DIR_RE = re.compile(r"^step-(\d{7,})$")
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the objects it is loaded into."""


@dataclass(frozen=True)
class Resumed:
    step: int                 # the step the checkpoint was saved after; continue with step + 1
    path: Path                # the step directory that was loaded
    config: Any               # the config JSON stored with it (None if none was given)
    world_size: int           # ranks of the run that saved it


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# --- distributed helpers (all no-ops in a single process) ------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


# --- files ------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON file; every one holds an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete or foreign checkpoint directory)") from None
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep for the parser
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: must hold a JSON object; got {type(value).__name__}")
    return value


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], ties: Mapping[str, str] | None = None) -> None:
    """safetensors file; a tensor stored under several names (tied weights) is stored once, with aliases.

    ``ties`` maps alias -> canonical name where the caller knows (gathered FSDP2 tensors are separate
    copies, so identity alone cannot tell); identical tensor objects are found by identity as well.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases = {a: c for a, c in (ties or {}).items() if a in tensors and c in tensors}
    seen: dict[tuple, str] = {}
    for key in sorted(tensors):
        if key in aliases:
            continue
        t = tensors[key].detach()
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) \
            if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        unique[key] = t
    # A storage shared by different views (not the same tensor) cannot go to safetensors as is: copy.
    by_storage: dict[tuple, int] = {}
    for t in unique.values():
        if t.numel():
            k = (t.device, t.untyped_storage().data_ptr())
            by_storage[k] = by_storage.get(k, 0) + 1
    unique = {k: (t.clone() if t.numel() and by_storage[(t.device, t.untyped_storage().data_ptr())] > 1 else t)
              .cpu().contiguous() for k, t in unique.items()}
    save_file(unique, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    _fsync_file(path)


class _TensorReader:
    """Reads tensors one at a time from a safetensors file (header-only until asked), resolving aliases."""

    def __init__(self, path: Path, stack: ExitStack):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (incomplete or foreign checkpoint directory)")
        try:
            self.file = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        self.path = path
        self.stored = set(self.file.keys())
        try:
            self.aliases = json.loads((self.file.metadata() or {}).get("aliases", "{}"))
        except (ValueError, RecursionError):  # not JSON, an integer too long to parse, nested too deep
            self.aliases = None
        if not (isinstance(self.aliases, dict) and all(isinstance(k, str) and v in self.stored
                                                       for k, v in self.aliases.items())):
            raise CheckpointError(f"{path}: header metadata 'aliases' must map names to stored tensors")

    def keys(self) -> set[str]:
        return self.stored | set(self.aliases)

    def get(self, key: str) -> torch.Tensor:
        real = self.aliases.get(key, key)
        if real not in self.stored:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}")
        return self.file.get_tensor(real)


# --- state dicts <-> (JSON tree, flat tensors) ------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown tensor dtype {name!r} in checkpoint JSON")
    return dtype


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor] | None, path: str = "") -> Any:
    """JSON-able tree for ``obj``; its tensors go into ``tensors`` under their path (``None``: dropped).

    DTensors are gathered to full tensors (a collective: every rank must flatten the same structure;
    ranks that do not write pass ``tensors=None`` and keep nothing).
    """
    if isinstance(obj, torch.Tensor):
        t = obj.full_tensor() if isinstance(obj, DTensor) else obj
        if tensors is not None:
            tensors[path] = t.detach().cpu()
        return {"__tensor__": path, "shape": list(t.shape), "dtype": str(t.dtype)}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"state at {path or '<root>'!r}: dict key {k!r} is not a string "
                                "(checkpoint JSON needs string keys; use name-keyed state dicts)")
            if k in ("__tensor__", "__tuple__"):
                raise TypeError(f"state at {path!r}: key {k!r} is reserved by the checkpoint format")
            out[k] = flatten_state(v, tensors, f"{path}/{k}" if path else k)
        return out
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state at {path or '<root>'!r} holds a {type(obj).__name__}, which a checkpoint cannot "
                    "store without pickle (allowed: tensors, dicts with str keys, lists, tuples, numbers, str, None)")


def _template_at(template: Any, key: str | int) -> Any:
    try:
        return template[key]
    except (KeyError, IndexError, TypeError):
        return None


def unflatten_state(tree: Any, read: Callable[[str], torch.Tensor] | None, template: Any = None,
                    collective: bool = False) -> Any:
    """Inverse of ``flatten_state``; ``read(key)`` gives a saved tensor.

    ``collective=True`` (distributed runs): every rank walks the same tree, only rank 0 reads; a
    tensor whose ``template`` counterpart (the live object's current state) is a DTensor is re-sharded
    like it from rank 0, any other tensor is broadcast from rank 0.
    """
    if isinstance(tree, dict) and "__tensor__" in tree:
        shape, dtype = tuple(tree["shape"]), _dtype(tree["dtype"])
        if not collective:
            t = read(tree["__tensor__"])
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise CheckpointError(f"tensor {tree['__tensor__']!r}: file has {tuple(t.shape)} {t.dtype}, "
                                      f"JSON says {shape} {dtype}")
            return t
        if isinstance(template, DTensor):
            full = read(tree["__tensor__"]) if _rank() == 0 else torch.empty(shape, dtype=dtype)
            full = full.to(template.device)
            return distribute_tensor(full, template.device_mesh, template.placements, src_data_rank=0)
        device = dist.distributed_c10d._get_pg_default_device()
        t = read(tree["__tensor__"]).to(device) if _rank() == 0 else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        return t.cpu()
    if isinstance(tree, dict) and "__tuple__" in tree:
        return tuple(unflatten_state(v, read, _template_at(template, i), collective)
                     for i, v in enumerate(tree["__tuple__"]))
    if isinstance(tree, dict):
        return {k: unflatten_state(v, read, _template_at(template, k), collective) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(v, read, _template_at(template, i), collective) for i, v in enumerate(tree)]
    return tree


# --- RNG --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as JSON: python, numpy (global), torch CPU, CUDA."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode("ascii")  # noqa: E731
    return {"python": [version, list(internal), gauss], "numpy": np_state, "torch": b64(torch.get_rng_state()),
            "cuda": [b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np.asarray(np_state["state"]["key"], dtype=np.uint32))
    np.random.set_state(np_state)
    unb64 = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(unb64(state["torch"]))
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise CheckpointError(f"checkpoint holds RNG states of {len(state['cuda'])} CUDA devices, "
                                  f"this process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])


# --- save -------------------------------------------------------------------------------------------


def _tied_names(model: nn.Module) -> dict[str, str]:
    """alias -> canonical parameter name for parameters shared by several modules (first name wins)."""
    first: dict[int, str] = {}
    ties = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[name] = first[id(p)]
        else:
            first[id(p)] = name
    return ties


def _config_json(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    try:
        json.dumps(config, allow_nan=True)
    except TypeError as e:
        raise TypeError(f"checkpoint config must be a dataclass or JSON-able value: {e}") from None
    return config


def _model_options(trainable_only: bool, **kw: bool) -> StateDictOptions:
    if _distributed():
        return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only, **kw)
    return StateDictOptions(ignore_frozen_params=trainable_only, **kw)


def _statefuls(scheduler: Any, stateful: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(stateful or {})
    if scheduler is not None:
        if "scheduler" in out:
            raise ValueError("pass the scheduler either as scheduler= or in stateful, not both")
        out["scheduler"] = scheduler
    for name, obj in out.items():
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"stateful {name!r} ({type(obj).__name__}) has no state_dict/load_state_dict")
    return out


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, scheduler: Any = None,
                    stateful: Mapping[str, Any] | None = None, config: Any = None,
                    trainable_only: bool = False, keep_last: int | None = 3) -> Path:
    """Write ``run_dir/step-NNNNNNN/`` atomically, point ``latest`` at it, keep the last ``keep_last``.

    Call on every rank of a distributed run (it gathers shards); rank 0 writes the shared files.
    ``trainable_only`` stores only parameters with ``requires_grad`` (plus buffers): the frozen ones
    (a frozen MLLM in stage 2) come from their own pretrained files at resume time.
    Returns the step directory.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    run_dir = Path(run_dir)
    statefuls = _statefuls(scheduler, stateful)
    cfg = _config_json(config)
    rank, world = _rank(), _world_size()
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp-{final.name}"

    # 1. a fresh temporary directory (a previous save killed half-way may have left some)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".tmp-*"):  # .tmp-step-N (a killed save), .tmp-old-step-N (a killed replace)
            shutil.rmtree(stale)
        (tmp / "rng").mkdir(parents=True)
    _barrier()

    # 2. gather full state dicts (collectives on every rank), rank 0 writes them
    model_sd = get_model_state_dict(model, options=_model_options(trainable_only))
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_model_options(trainable_only)) \
        if optimizer is not None else None
    state_tensors: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    state_tree = {name: flatten_state(obj.state_dict(), state_tensors, name) for name, obj in statefuls.items()}
    files = ["meta.json", "state.json", "state.safetensors", "model.safetensors"]
    if rank == 0:
        _save_tensors(tmp / "model.safetensors", model_sd, ties=_tied_names(model))
        if optim_sd is not None:
            optim_tensors: dict[str, torch.Tensor] = {}
            _write_json(tmp / "optimizer.json", flatten_state(optim_sd, optim_tensors))
            _save_tensors(tmp / "optimizer.safetensors", optim_tensors)
            files += ["optimizer.json", "optimizer.safetensors"]
        _write_json(tmp / "state.json", state_tree)
        _save_tensors(tmp / "state.safetensors", state_tensors)
    del model_sd, optim_sd, state_tensors

    # 3. every rank its own RNG state
    _write_json(tmp / "rng" / f"rank-{rank:05d}.json", rng_state())
    _barrier()

    # 4. rank 0 seals the directory: meta.json last, fsync, rename, then the `latest` pointer
    if rank == 0:
        _write_json(tmp / "meta.json", {
            "format": FORMAT, "step": step, "world_size": world, "trainable_only": trainable_only,
            "statefuls": sorted(statefuls), "files": sorted(files), "config": cfg,
            "torch_version": torch.__version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        fsync_dir(tmp / "rng")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a rerun): replace it
            trash = run_dir / f".tmp-old-{final.name}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, final)
        fsync_dir(run_dir)
        atomic_write_bytes(run_dir / LATEST, (final.name + "\n").encode())  # tmp + fsync + os.replace
        if keep_last is not None:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old)
    _barrier()
    return final


# --- find and load ----------------------------------------------------------------------------------


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step directories under ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := STEP_DIR_RE.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def open_run_dir(run_dir: str | os.PathLike, resume_run: bool,
                 inputs: Sequence[str | os.PathLike | None] = ()) -> tuple[Path, Path | None]:
    """Create ``run_dir`` for a training run; return it and its latest checkpoint (None for a new run).

    A run that already has checkpoints is refused unless resuming, so nothing is overwritten by accident; so is
    a folder inside one of the run's ``inputs`` (the stage-1 MLLM, a dataset: the run's config.json replaced
    the MLLM's) and a new run into a folder that holds other files (a run scattered its files among them).
    """
    run_dir = Path(run_dir)
    for path in filter(None, inputs):  # (a preset name such as "tiny" is no folder)
        if Path(path).exists() and run_dir.resolve().is_relative_to(Path(path).resolve()):
            raise FileExistsError(f"--out {str(run_dir)!r} lies inside the run's input {str(path)!r}: the run would "
                                  "write its files there; choose a folder beside it")
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is not None and not resume_run:
        raise FileExistsError(f"{run_dir} already holds checkpoints ({found.name}); pass --resume or a new --out")
    if found is None and run_dir.is_dir() and any(run_dir.iterdir()) and not _is_run_dir(run_dir):
        raise FileExistsError(f"--out {str(run_dir)!r} holds files of something else (no training run's config.json "
                              "or checkpoints/); choose a new or an empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    _barrier()  # every rank has looked at the folder before rank 0 writes into it (its temp files are no strangers)
    return run_dir, found


RUN_ENTRIES = {"checkpoints", "config.json", "metrics.jsonl", "mllm", "mllm.json", "model", "samples", "tensorboard",
               "tokenizer"}  # what stage 1 and stage 2 write at the top of their run folders


def _is_run_dir(run_dir: Path) -> bool:
    """A training run's folder (one that stopped before its first checkpoint counts): nothing but a run's
    entries, and a run's config.json when there is one (an MLLM's own config.json has no steps / data)."""
    if any(p.name not in RUN_ENTRIES and not p.name.startswith(".") for p in run_dir.iterdir()):
        return False  # (hidden entries: an atomic write's temp file left by a killed first attempt)
    if not (run_dir / "config.json").exists():
        return True
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and {"steps", "data"} <= set(config)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The step directory ``latest`` points to; the newest complete one if the pointer is missing or stale."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if STEP_DIR_RE.match(name) and (run_dir / name / "meta.json").is_file():
            return run_dir / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _check_model_keys(saved: set[str], model: nn.Module, trainable_only: bool, path: Path) -> None:
    """Saved weight names must be exactly the model's (or its trainable part): never a silent partial load."""
    expected = set(model.state_dict().keys())  # FSDP2: names only, shards are not gathered
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    unexpected = sorted(saved - expected)
    missing = sorted(expected - saved - (frozen if trainable_only else set()))
    if unexpected or missing:
        raise CheckpointError(f"{path}/model.safetensors does not fit {type(model).__name__}: "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")


def resume(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
           scheduler: Any = None, stateful: Mapping[str, Any] | None = None, restore_rng: bool = True) -> Resumed:
    """Restore weights, optimiser, scheduler, statefuls (sampler position, EMA) and RNG from a checkpoint.

    ``path`` is a step directory or a run directory (then its latest checkpoint). Call on every rank,
    after the model is built (and sharded) and the optimiser created. With ``trainable_only``
    checkpoints the frozen weights must already be loaded.
    """
    path = Path(path)
    if not (path / "meta.json").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: neither a checkpoint directory nor a run directory with one")
        path = found
    meta = _read_json(path / "meta.json")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/meta.json: format {meta.get('format')!r}, expected {FORMAT!r}")
    missing = sorted({"step", "world_size", "trainable_only", "statefuls", "files"} - set(meta))
    if missing:
        raise CheckpointError(f"{path}/meta.json: missing {', '.join(missing)}")
    if not (type(meta["step"]) is int and type(meta["world_size"]) is int and type(meta["trainable_only"]) is bool
            and all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                    for v in (meta["statefuls"], meta["files"]))):  # (a hand-edited file was a TypeError)
        raise CheckpointError(f"{path}/meta.json: step / world_size must be ints, trainable_only a bool, "
                              "statefuls / files lists of names")
    statefuls = _statefuls(scheduler, stateful)
    if set(meta["statefuls"]) != set(statefuls):
        raise CheckpointError(f"{path}: saved statefuls {sorted(meta['statefuls'])}, given {sorted(statefuls)}; "
                              "pass the same objects that were saved")
    if (optimizer is not None) != ("optimizer.json" in meta["files"]):
        raise CheckpointError(f"{path}: optimizer state {'present' if optimizer is None else 'absent'} in the "
                              f"checkpoint but an optimizer was {'not ' if optimizer is None else ''}given")
    rank, world = _rank(), _world_size()
    if restore_rng and meta["world_size"] != world:
        raise CheckpointError(f"{path}: saved by {meta['world_size']} ranks, resuming on {world}: per-rank RNG "
                              "states do not map; pass restore_rng=False to resume without them")
    trainable_only = bool(meta["trainable_only"])

    with ExitStack() as stack:
        # 1. weights: every rank checks the names from the header; rank 0 reads, then broadcast + shard
        weights = _TensorReader(path / "model.safetensors", stack)
        _check_model_keys(weights.keys(), model, trainable_only, path)
        full = {k: weights.get(k) for k in sorted(weights.keys())} if rank == 0 else {}
        set_model_state_dict(model, full, options=_model_options(
            trainable_only, strict=not trainable_only, **({"broadcast_from_rank0": True} if _distributed() else {})))
        del full

        # 2. optimiser (FQN-keyed, full) the same way
        if optimizer is not None:
            reader = _TensorReader(path / "optimizer.safetensors", stack)
            tree = _read_json(path / "optimizer.json")
            osd = unflatten_state(tree, reader.get) if rank == 0 else {}
            set_optimizer_state_dict(model, optimizer, osd, options=_model_options(
                trainable_only, **({"broadcast_from_rank0": True} if _distributed() else {})))
            del osd

        # 3. scheduler, sampler, EMA, ...: JSON on every rank, tensors from rank 0
        reader = _TensorReader(path / "state.safetensors", stack)
        tree = _read_json(path / "state.json")
        if not set(statefuls) <= set(tree):
            raise CheckpointError(f"{path}/state.json: holds {sorted(tree)}, not the statefuls {sorted(statefuls)}")
        for name, obj in statefuls.items():
            if not isinstance(tree[name], dict):
                raise CheckpointError(f"{path}/state.json: {name!r} holds no saved state")
            try:
                obj.load_state_dict(unflatten_state(tree[name], reader.get if rank == 0 else None,
                                                    template=obj.state_dict(), collective=_distributed()))
            except (KeyError, TypeError) as e:  # a state of another shape than the one saved (its own errors stand)
                raise CheckpointError(f"{path}/state.json: {name!r} does not fit ({type(e).__name__}: {e})") from None

    # 4. RNG last, so nothing above draws from the restored generators
    if restore_rng:
        set_rng_state(_read_json(path / "rng" / f"rank-{rank:05d}.json"))
    _barrier()
    return Resumed(step=int(meta["step"]), path=path, config=meta.get("config"), world_size=int(meta["world_size"]))


def load_stateful(path: str | os.PathLike, name: str, obj: Any) -> None:
    """Restore one stateful saved in the checkpoint directory ``path`` (e.g. the EMA, to export it) into
    ``obj``, in this process alone; CheckpointError naming the file on any problem."""
    path = Path(path)
    tree = _read_json(path / "state.json")
    if not isinstance(tree.get(name), dict):
        raise CheckpointError(f"{path}/state.json: holds no {name!r} state")
    with ExitStack() as stack:
        reader = _TensorReader(path / "state.safetensors", stack)
        obj.load_state_dict(unflatten_state(tree[name], reader.get, template=obj.state_dict()))
