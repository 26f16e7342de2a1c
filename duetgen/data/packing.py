"""Packing variable-length samples under a token budget, and a resumable sampler that shards packs across ranks.

    packs = pack_items(lengths, budget=4096, seed=0)       # list[Pack]; each pack's total <= budget
    batch = concat_packed([samples[i] for i in pack.items])  # input_ids, labels, position_ids, cu_seqlens, ...
    mask = block_diagonal_mask(batch["cu_seqlens"])          # (T, T) bool for SDPA when no varlen kernel
    sampler = PackedSampler(lengths, budget, seed=0, rank=r, world_size=w)
    for pack in sampler: ...                                 # endless: epoch after epoch, reshuffled each time
    state = sampler.state_dict(); sampler.load_state_dict(state)   # exact data position, JSON-able
    padding_fraction(lengths, budget, batch_size)            # packed vs padded-to-longest waste

Both training stages use this (paper section 4.1-4.2, DESIGN section 6): stage 1 packs tokenised
conversations under a text-token budget, stage 2 packs records under a latent-token budget (the DiT's
patch tokens: conditioning frames plus target). The packer only sees integer lengths; what a length
counts is the caller's choice.

Design choices:
- Shuffle, then pack. ``ffd`` (default) is first-fit decreasing over the shuffled order (ties keep the
  shuffled order), then the packs themselves are shuffled so long samples are not all seen first;
  it wastes little of the budget (FFD uses at most 11/9 OPT + 1 packs). ``greedy`` is next-fit in
  the shuffled order: it keeps the sample order, at the cost of more padding.
- First fit in O(n log n) with a max segment tree over the packs' remaining room (the textbook
  first fit is O(n * packs)); every rank repacks once per epoch.
- Deterministic from (seed, epoch) alone (``numpy.random.default_rng([seed, epoch])``): every rank
  computes the same packs without talking to the others.
- A sample longer than the budget is an error naming it; it is cut to the budget only when the
  caller asks (``truncate=True``), and then ``Pack.lengths`` says how much of it to keep.
- No attention across samples: a packed batch carries ``cu_seqlens`` (varlen flash-attention style)
  and per-sample positions that restart at 0; ``block_diagonal_mask`` turns ``cu_seqlens`` into a
  dense mask for SDPA. Labels: the first label of each sample is set to ``ignore_index`` so an
  HF-style shifted next-token loss never asks the last token of one sample to predict the next one.
- Sharding: the epoch's packs form one global list; rank r takes global positions
  ``p, p + W, p + 2W, ...`` offset by r, so every rank gets the same number of packs per epoch.
  The remainder (fewer than W packs) is dropped by default (it is reshuffled into later epochs);
  ``drop_remainder=False`` instead pads by repeating packs from the start of the epoch.
- The sampler state is the global position within the epoch plus the epoch, so a resumed run
  continues with exactly the next pack, also under a different world size. It is JSON-able and
  carries a fingerprint of the lengths, budget, seed and strategy so a resume against other data
  fails loudly instead of silently drawing different samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

Strategy = Literal["ffd", "greedy"]
STRATEGIES = ("ffd", "greedy")


class PackingError(ValueError):
    """A sample cannot be packed (too long, empty) or a packing argument is invalid."""


@dataclass(frozen=True)
class Pack:
    """A group of samples packed into one sequence.

    ``items`` index the dataset; ``lengths[k]`` is how many tokens of ``items[k]`` go in (its full
    length unless it was truncated to the budget). ``epoch`` and ``position`` (the pack's global
    index within the epoch) are set when a ``PackedSampler`` yields it, -1 otherwise.
    """

    items: tuple[int, ...]
    lengths: tuple[int, ...]
    epoch: int = -1
    position: int = -1

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


def _check_lengths(lengths: Sequence[int], budget: int, truncate: bool,
                   names: Sequence[str] | None) -> np.ndarray:
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < 1:
        raise PackingError(f"budget must be a positive integer, got {budget!r}")
    arr = np.asarray(lengths)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise PackingError(f"lengths must be a 1-D sequence of integers, got dtype {arr.dtype} shape {arr.shape}")
    if names is not None and len(names) != len(arr):
        raise PackingError(f"names has {len(names)} entries but lengths has {len(arr)}")
    arr = arr.astype(np.int64)

    def name(i: int) -> str:
        return f"item {i}" + (f" ({names[i]!r})" if names is not None else "")

    bad = np.flatnonzero(arr < 1)
    if bad.size:
        raise PackingError(f"{name(int(bad[0]))} has length {int(arr[bad[0]])}; every sample needs >= 1 token")
    too_long = np.flatnonzero(arr > budget)
    if too_long.size and not truncate:
        i = int(too_long[0])
        more = f" (and {too_long.size - 1} more)" if too_long.size > 1 else ""
        raise PackingError(f"{name(i)} has length {int(arr[i])} > budget {budget}{more}; "
                           "filter it out, raise the budget, or pass truncate=True to cut it")
    return np.minimum(arr, budget)


class _FirstFit:
    """Leftmost pack with at least ``need`` room, in O(log n): a max segment tree over remaining room.

    Every leaf starts as an empty pack (room = budget), so the leftmost fitting leaf is either an open
    pack or the first unused one: that is exactly first fit.
    """

    def __init__(self, max_packs: int, budget: int):
        self.size = 1 << max(0, (max_packs - 1).bit_length())
        self.room = [budget] * (2 * self.size)

    def place(self, need: int) -> int:
        room, i = self.room, 1
        while i < self.size:
            i = 2 * i if room[2 * i] >= need else 2 * i + 1
        leaf = i - self.size
        room[i] -= need
        i //= 2
        while i:
            room[i] = max(room[2 * i], room[2 * i + 1])
            i //= 2
        return leaf


def pack_items(lengths: Sequence[int], budget: int, seed: int | Sequence[int] = 0, strategy: Strategy = "ffd",
               truncate: bool = False, names: Sequence[str] | None = None) -> list[Pack]:
    """Pack samples of the given lengths into packs of at most ``budget`` tokens; deterministic in ``seed``.

    ``names`` (e.g. record ids) only make error messages name the offending sample.
    """
    if strategy not in STRATEGIES:
        raise PackingError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    arr = _check_lengths(lengths, budget, truncate, names)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(arr))
    if strategy == "greedy":  # next fit: close the pack as soon as the next sample does not fit
        packs: list[list[int]] = []
        room = 0
        for i in order.tolist():
            if arr[i] > room:
                packs.append([])
                room = budget
            packs[-1].append(i)
            room -= int(arr[i])
    else:  # first fit decreasing; the stable sort keeps the shuffled order among equal lengths
        order = order[np.argsort(-arr[order], kind="stable")]
        tree = _FirstFit(len(arr), budget)
        packs = []
        for i in order.tolist():
            k = tree.place(int(arr[i]))
            if k == len(packs):
                packs.append([])
            packs[k].append(i)
        packs = [packs[k] for k in rng.permutation(len(packs)).tolist()]
    return [Pack(items=tuple(p), lengths=tuple(int(arr[i]) for i in p)) for p in packs]


# --- packed batches ---------------------------------------------------------------------------------


def cu_seqlens_from_lengths(lengths: Sequence[int]) -> torch.Tensor:
    """Cumulative sample boundaries ``[0, l0, l0+l1, ...]`` as int32 (the flash-attention varlen format)."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int64), 0).to(torch.int32)
    return out


def block_diagonal_mask(cu_seqlens: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Dense (T, T) bool mask, True where query t may attend key s: same sample (and s <= t if causal).

    For ``scaled_dot_product_attention(attn_mask=...)`` when no varlen kernel is available; it is
    O(T^2) memory, so real runs pass ``cu_seqlens`` to a varlen kernel instead.
    """
    seg = segment_ids(cu_seqlens)  # (T,)
    mask = seg[:, None] == seg[None, :]  # (T, T)
    if causal:
        mask &= torch.ones_like(mask).tril()
    return mask


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T,) int64: which sample each packed token belongs to (0, 0, 0, 1, 1, 2, ...)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def concat_packed(samples: Sequence[Mapping[str, torch.Tensor]], token_keys: Sequence[str] = ("input_ids", "labels"),
                  label_key: str | None = "labels", ignore_index: int = -100, pad_to: int | None = None,
                  pad_value: int = 0) -> dict[str, Any]:
    """Concatenate samples into one packed sequence (no batch axis; add it with ``x[None]``).

    Every tensor is concatenated along dim 0. ``token_keys`` are the token-aligned ones (dim 0 is the
    sample's length, the same for each of them); others (e.g. ``pixel_values``, ``image_grid_thw``)
    are concatenated as they are. Adds:
      position_ids (T,) int64   restart at 0 in every sample
      cu_seqlens   (S+1,) int32 sample boundaries (a padding tail counts as one more segment)
      max_seqlen   int          longest segment
      num_samples  int          S, not counting the padding tail
    ``labels[start of each sample] = ignore_index`` so a shifted loss never crosses samples.
    ``pad_to`` pads the token keys to a fixed length (static shapes): ``pad_value`` for inputs,
    ``ignore_index`` for labels, positions restart, its own segment so real tokens never see it.
    """
    if not samples:
        raise PackingError("concat_packed needs at least one sample")
    keys = set(samples[0])
    if token_keys[0] not in keys:
        raise PackingError(f"samples must contain {token_keys[0]!r}; got keys {sorted(keys)}")
    lengths = []
    for n, s in enumerate(samples):
        if set(s) != keys:
            raise PackingError(f"sample {n} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
        length = int(s[token_keys[0]].shape[0])
        for k in token_keys:
            if k in s and int(s[k].shape[0]) != length:
                raise PackingError(f"sample {n}: {k!r} has {int(s[k].shape[0])} tokens, "
                                   f"{token_keys[0]!r} has {length}")
        if length < 1:
            raise PackingError(f"sample {n} is empty")
        lengths.append(length)
    total = sum(lengths)
    if pad_to is not None and pad_to < total:
        raise PackingError(f"pad_to={pad_to} is shorter than the packed length {total}")
    pad = 0 if pad_to is None else pad_to - total

    out: dict[str, Any] = {}
    for k in sorted(keys):
        parts = [s[k] for s in samples]
        if k == label_key:
            parts = [p.clone() for p in parts]
            for p in parts:
                p[0] = ignore_index  # its own first token has no in-sample predecessor to be predicted from
        if pad and k in token_keys:
            fill = ignore_index if k == label_key else pad_value
            parts.append(torch.full((pad, *parts[0].shape[1:]), fill, dtype=parts[0].dtype))
        out[k] = torch.cat(parts, dim=0)
    seg_lengths = lengths + ([pad] if pad else [])
    out["position_ids"] = torch.cat([torch.arange(n) for n in seg_lengths])
    out["cu_seqlens"] = cu_seqlens_from_lengths(seg_lengths)
    out["max_seqlen"] = max(seg_lengths)
    out["num_samples"] = len(lengths)
    return out


# --- the sampler ------------------------------------------------------------------------------------


def _fingerprint(lengths: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:16]


class PackedSampler:
    """Endless iterator over this rank's packs, epoch after epoch, with an exact resumable position.

    ``lengths`` is the per-sample token count, or a function ``epoch -> lengths`` when a sample's
    length depends on a per-epoch draw (stage 2 draws the target image of each sequence, and with
    it how many conditioning frames, i.e. latent tokens, it brings).
    """

    def __init__(self, lengths: Sequence[int] | Callable[[int], Sequence[int]], budget: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, strategy: Strategy = "ffd", drop_remainder: bool = True,
                 truncate: bool = False, names: Sequence[str] | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise PackingError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if strategy not in STRATEGIES:
            raise PackingError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.lengths_fn = lengths if callable(lengths) else None
        self.fixed_lengths = None if callable(lengths) else _check_lengths(lengths, budget, truncate, names)
        self.budget, self.seed, self.strategy = int(budget), int(seed), strategy
        self.rank, self.world_size = rank, world_size
        self.drop_remainder, self.truncate, self.names = drop_remainder, truncate, names
        self.epoch = 0
        self.position = 0  # global index of the next pack in this epoch (shared by all ranks)
        self._cache: tuple[int, list[Pack], str] | None = None

    def _epoch(self, epoch: int) -> tuple[list[Pack], str]:
        """The packs of an epoch (computed once and cached) and the fingerprint of its lengths."""
        if self._cache is None or self._cache[0] != epoch:
            lengths = self.fixed_lengths if self.lengths_fn is None else \
                _check_lengths(self.lengths_fn(epoch), self.budget, self.truncate, self.names)
            packs = pack_items(lengths, self.budget, seed=[self.seed, epoch], strategy=self.strategy,
                               truncate=self.truncate)
            if len(packs) < self.world_size and self.drop_remainder:
                raise PackingError(f"epoch {epoch} has {len(packs)} packs, fewer than world_size "
                                   f"{self.world_size}: every rank would get none (use more data or a smaller budget)")
            self._cache = (epoch, packs, _fingerprint(lengths))
        return self._cache[1], self._cache[2]

    def _epoch_end(self, num_packs: int) -> int:
        """Global positions used this epoch: a multiple of world_size (remainder dropped or padded)."""
        w = self.world_size
        return num_packs // w * w if self.drop_remainder else -(-num_packs // w) * w

    def packs_per_epoch(self, epoch: int | None = None) -> int:
        """How many packs this rank gets in a whole epoch (the same on every rank)."""
        packs, _ = self._epoch(self.epoch if epoch is None else epoch)
        return self._epoch_end(len(packs)) // self.world_size

    def __iter__(self) -> Iterator[Pack]:
        while True:
            packs, _ = self._epoch(self.epoch)
            end = self._epoch_end(len(packs))
            while self.position < end:
                g = self.position + self.rank
                self.position += self.world_size  # advance before yielding: the state says "this pack is taken"
                yield dataclasses.replace(packs[g % len(packs)], epoch=self.epoch, position=g)
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """The position after the last pack yielded, plus what must match for a resume to be exact."""
        _, fingerprint = self._epoch(self.epoch)
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "budget": self.budget,
                "strategy": self.strategy, "drop_remainder": self.drop_remainder,
                "world_size": self.world_size, "lengths_fingerprint": fingerprint}

    def state_after(self, pack: Pack) -> dict[str, Any]:
        """The state that resumes right after ``pack`` (for loops that prefetch ahead of training)."""
        if pack.epoch < 0:
            raise PackingError("this pack was not yielded by a PackedSampler (it has no epoch/position)")
        state = self.state_dict()
        state.update(epoch=pack.epoch, position=pack.position - self.rank + self.world_size,
                     lengths_fingerprint=self._epoch(pack.epoch)[1])
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "budget", "strategy", "drop_remainder"):
            if state.get(key) != getattr(self, key):
                raise PackingError(f"sampler state has {key}={state.get(key)!r} but this sampler has "
                                   f"{getattr(self, key)!r}: resuming would draw different data")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise PackingError(f"sampler state has a negative epoch/position: {epoch}, {position}")
        packs, fingerprint = self._epoch(epoch)
        if state.get("lengths_fingerprint") != fingerprint:
            raise PackingError(f"sampler state was saved for other sample lengths (fingerprint "
                               f"{state.get('lengths_fingerprint')!r}, this data has {fingerprint!r}): "
                               "the dataset changed since the checkpoint")
        if position > len(packs) + int(state.get("world_size", 1)):  # a saved end is < packs + saved W
            raise PackingError(f"sampler position {position} is past the end of epoch {epoch} ({len(packs)} packs)")
        self.epoch, self.position = epoch, position


# --- padding ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaddingReport:
    packed: float      # share of token slots that are padding when each pack is padded to the budget
    padded: float      # share when batch_size samples are padded to the longest of them
    num_packs: int
    num_batches: int


def padding_fraction(lengths: Sequence[int], budget: int, batch_size: int, seed: int = 0,
                     strategy: Strategy = "ffd") -> PaddingReport:
    """Padding waste of packing (``budget`` per pack) versus padded-to-longest batches of ``batch_size``.

    Both see the same samples in the same shuffled order. With a varlen kernel a pack need not be
    padded at all; ``packed`` is the waste when it is (static shapes, torch.compile, CUDA graphs).
    """
    if batch_size < 1:
        raise PackingError(f"batch_size must be >= 1, got {batch_size}")
    arr = _check_lengths(lengths, budget, truncate=False, names=None)
    if arr.size == 0:
        raise PackingError("padding_fraction needs at least one sample")
    packs = pack_items(arr, budget, seed=seed, strategy=strategy)
    real = int(arr.sum())
    packed = 1.0 - real / (len(packs) * budget)
    order = np.random.default_rng(seed).permutation(len(arr))
    batches = [arr[order[i:i + batch_size]] for i in range(0, len(arr), batch_size)]
    slots = sum(len(b) * int(b.max()) for b in batches)
    return PaddingReport(packed=packed, padded=1.0 - real / slots, num_packs=len(packs), num_batches=len(batches))
