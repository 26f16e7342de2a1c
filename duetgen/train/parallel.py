"""Distribution applied from outside a single-device model: process group, FSDP2, meta-device loading.

    dist_env = init_distributed()                     # torchrun env -> process group; plain run -> no-op
    with torch.device("meta"):
        model = build_model(cfg)                      # no memory anywhere yet
    apply_fsdp(model, model.blocks, dist_env, activation_checkpointing=True)
    load_full_state_dict(model, full_sd_on_rank0, dist_env, init_buffers=model.init_buffers)
    ...
    destroy_distributed()

Design choices (torchtitan's ``parallelize``; STYLE principle 3):
- Model code never knows it is distributed. ``apply_fsdp`` goes, per block, in torchtitan's order:
  activation checkpointing (composable ``checkpoint``, in place, so the module tree and parameter
  names do not change), then ``torch.compile`` of the block (optional, off by default: on CPU it
  needs a C++ toolchain and buys little at toy sizes), then FSDP2
  ``fully_shard``; finally ``fully_shard`` on the root, which picks up what no block owns
  (embeddings, final norm, head). One block is one all-gather / reduce-scatter unit.
- The model is built on the ``meta`` device, sharded, then ``to_empty`` gives each rank storage for
  its shard only. ``load_full_state_dict`` passes rank 0's full state dict to
  ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``: torch broadcasts one
  tensor at a time and each rank keeps its slice. Only rank 0 reads the weights (once); no rank ever
  materialises the full model; rank 0 holds the loaded state dict (use ``safe_open``-backed loading
  or a smaller dtype to bound that).
- Tied weights (an LM head sharing the embedding) survive: ``to_empty`` from ``meta`` makes a new
  Parameter per module, so ties are recorded before and restored after (FSDP2 keeps them itself as
  long as both modules sit in the same FSDP unit, e.g. the root).
- Non-persistent buffers (RoPE frequencies, masks) are not in any state dict, so after ``to_empty``
  they are garbage: the caller passes ``init_buffers``; a model that has such buffers and no
  initialiser is an error naming them (STYLE principle 12), not silently wrong positions.
- Single process (no torchrun env): ``init_distributed`` starts nothing; ``apply_fsdp`` with a
  one-process ``DistEnv`` only applies checkpointing/compile; the same training script runs as is.
- Backend: NCCL when CUDA is available, else gloo. FSDP2 works on CPU with gloo in torch 2.13
  (checked by tests/test_parallel.py), with one gap: ``set_gradient_divide_factor`` uses NCCL's
  PREMUL_SUM ("Cannot use ReduceOp.PREMUL_SUM with Gloo"); ``apply_fsdp(sum_gradients=True)`` sets
  the factor to 1 together with ``set_force_sum_reduction_for_comms(True)``, which uses plain SUM
  and works on both backends.
- Around a sharded model the stage scripts also need: ``gather_full_state_dict`` (rank 0 gets the
  full weights on its CPU to export them), ``init_buffers_from_config`` (transformers' RoPE buffers
  rebuilt from each module's ``config``, the same numbers as its ``__init__``), ``broadcast_module``
  (a replicated frozen part made identical on every rank) and ``barrier``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None   # 1-D mesh over all ranks when distributed

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Process group from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); else single process.

    NCCL and ``cuda:LOCAL_RANK`` when CUDA is available, gloo and CPU otherwise.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {os.environ.get('RANK')!r}, "
                         f"{os.environ.get('WORLD_SIZE')!r}, {os.environ.get('LOCAL_RANK')!r}") from None
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    mesh = init_device_mesh(device.type, (world_size,))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mesh=mesh)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks (a copy; identity in a single process). For global token counts and loss sums."""
    x = x.detach().clone()
    if env.distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def backward_pack_shares(pack_losses: Iterator[torch.Tensor], counts: Sequence[int], global_count: int,
                         env: DistEnv, autocast=contextlib.nullcontext()) -> torch.Tensor:
    """Back-propagate one optimiser step's packs; returns the step's global mean loss (detached).

    ``pack_losses`` yields each pack's mean loss lazily (computed under ``autocast``, one graph alive at
    a time); pack i counts ``counts[i]`` items (tokens, targets) of the step's all-reduced
    ``global_count``. Each pack back-propagates ``mean x count / global_count`` (exactly x 1.0 for one
    pack in one process) and FSDP sums the ranks' gradients, so any split of the step's packs over
    ranks or accumulation slots gives the same update.
    """
    step_loss = None
    for n in counts:
        with autocast:
            loss = next(pack_losses)
        share = loss * (n / max(global_count, 1))
        share.backward()
        step_loss = share.detach() if step_loss is None else step_loss + share.detach()
    return all_reduce_sum(step_loss, env)


def apply_fsdp(model: nn.Module, blocks: Sequence[nn.Module], env: DistEnv, *,
               activation_checkpointing: bool = False, compile: bool = False,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True, sum_gradients: bool = False) -> nn.Module:
    """Per block: activation checkpointing, compile, ``fully_shard``; then ``fully_shard`` the root. In place.

    ``blocks`` are the repeated layers (e.g. the decoder layers). ``param_dtype``/``reduce_dtype``:
    FSDP2 mixed precision (bf16 compute, fp32 reduce on GPUs). ``sum_gradients``: gradients are summed
    over ranks instead of averaged, for losses already normalised by a global token count. Without
    a process group only checkpointing and compile are applied.
    """
    owned = {id(m) for m in model.modules()}
    for i, block in enumerate(blocks):
        if id(block) not in owned:
            raise ValueError(f"blocks[{i}] ({type(block).__name__}) is not a submodule of {type(model).__name__}")
    from torch.distributed._composable import checkpoint  # composable: in place, names unchanged

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        if activation_checkpointing:
            checkpoint(block)  # recompute the block in backward; RNG (dropout) state is replayed
        if compile:
            block.compile()
        if env.distributed:
            fully_shard(block, mesh=env.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if env.distributed:
        # The root (embeddings, final norm, head): FSDP2 keeps the root's parameters gathered after
        # forward by itself, since backward needs them first.
        fully_shard(model, mesh=env.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        if sum_gradients:
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.set_gradient_divide_factor(1.0)
                    m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def non_persistent_buffers(model: nn.Module) -> list[str]:
    """Names of buffers that no state dict carries (they must be recomputed after ``to_empty``)."""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, m in model.named_modules() for name in m._non_persistent_buffers_set]


def _tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, attribute) that hold the same Parameter object (e.g. an LM head tied to the embedding)."""
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((m, name))
    return [g for g in groups.values() if len(g) > 1]


def _retie(model: nn.Module, tied: list[list[tuple[nn.Module, str]]], env: DistEnv) -> None:
    """``to_empty`` from ``meta`` gives every module a new Parameter, which unties shared weights: tie them again."""
    for group in tied:
        first = getattr(*group[0])
        if all(getattr(m, n) is first for m, n in group[1:]):
            continue
        if env.distributed:  # FSDP2 holds references to its own parameters; re-tying behind it would desync
            names = [f"{type(m).__name__}.{n}" for m, n in group]
            raise RuntimeError(f"tied parameters {names} were untied by sharding; keep tied modules in one "
                               "FSDP unit (e.g. both in the root)")
        for m, n in group[1:]:
            setattr(m, n, first)


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], env: DistEnv, *,
                         init_buffers: Callable[[nn.Module], None] | None = None, strict: bool = True) -> nn.Module:
    """Materialise a (sharded) ``meta`` model on ``env.device`` and load rank 0's full ``state_dict`` into it.

    Other ranks pass ``{}``: rank 0 broadcasts tensor by tensor and every rank keeps its shard.
    ``init_buffers(model)`` recomputes non-persistent buffers after ``to_empty``. Call on every rank.
    """
    buffers = non_persistent_buffers(model)
    if buffers and init_buffers is None:
        raise ValueError(f"{type(model).__name__} has non-persistent buffers {buffers[:5]} that no state dict "
                         "holds; pass init_buffers= to recompute them after to_empty")
    if env.distributed and env.rank != 0 and state_dict:
        raise ValueError(f"rank {env.rank} got a state dict; only rank 0 loads weights (others pass {{}})")
    tied = _tied_parameters(model)
    model.to_empty(device=env.device)
    _retie(model, tied, env)
    if init_buffers is not None:
        with torch.no_grad():
            init_buffers(model)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict) \
        if env.distributed else StateDictOptions(strict=strict)
    set_model_state_dict(model, state_dict, options=options)  # strict: torch raises naming missing/unexpected keys
    return model


# --- what the stage scripts need around a sharded model -----------------------------------------------


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process), e.g. until rank 0 has written a file the others read."""
    if env.distributed:
        dist.barrier()


def broadcast_module(module: nn.Module, env: DistEnv) -> nn.Module:
    """Give every rank rank 0's parameters and buffers of a replicated (not sharded) module, in place.

    For frozen parts whose random initialisation would otherwise differ per rank (e.g. a placeholder
    autoencoder). No-op in a single process.
    """
    if env.distributed:
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)
    return module


def init_buffers_from_config(model: nn.Module) -> None:
    """``init_buffers`` for transformers models: rebuild every module that owns non-persistent buffers
    (the rotary embeddings' inverse frequencies) from its ``config`` on the CPU and copy the buffers.

    The same numbers as the module's ``__init__`` by construction, whatever the RoPE type.
    """
    for name, m in model.named_modules():
        if not m._non_persistent_buffers_set:
            continue
        config = getattr(m, "config", None)
        if config is None:
            raise ValueError(f"{name} ({type(m).__name__}) has non-persistent buffers "
                             f"{sorted(m._non_persistent_buffers_set)} but no config to rebuild them from")
        with torch.device("cpu"):
            fresh = type(m)(config)
        for buffer in m._non_persistent_buffers_set:
            getattr(m, buffer).copy_(getattr(fresh, buffer))


def gather_full_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Rank 0: the full (unsharded) state dict on the CPU; other ranks: ``{}``. A collective.

    For exporting a model trained sharded: rank 0 loads it into a plain copy (built on ``meta``,
    then ``load_full_state_dict`` with a one-process ``DistEnv()``) and saves that.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not env.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
