"""Concurrent answers batched through one model: one MLLM forward decodes a token for every answer, one packed DiT call
steps every image being drawn.

    engine = BatchedEngine(model, max_batch=4)           # a drop-in InterleavedEngine (max_image_wait=8, max_text_wait=20)
    pipe = DuetGenPipeline(model); pipe.engine = engine  # what `duetgen serve --batch 4` does
    # call engine.run / engine.stream from up to 4 threads at once (the server does, one per request)

How it works:
- Each answer runs the ``InterleavedEngine`` loop unchanged, in its own thread (the server already
  gives each request one). Only its two model calls go elsewhere: the MLLM context is a
  ``BatchedContext`` (registered in ``engine.CONTEXTS``) and ``draw`` samples through a DiT whose
  calls are batched. Both hand their call to the ``BatchScheduler`` and wait for the result.
- The scheduler runs a step when every joined answer is waiting on it (a barrier: an answer busy
  with its own CPU work, e.g. sampling a token or decoding a picture, is waited for, so which
  answers share a step depends only on who is joined, not on timing). A step runs, in order:
  the single-token decodes of two or more answers as one batched MLLM forward over their KV caches
  (left-padded to the longest, padding masked, explicit 3D rope positions per row); every other
  MLLM call (a prefill, an image's vision block with its pixels, a lone decode) alone; every DiT
  call as one packed DiT call (the DiT attends within each sample only, so packing requests is the
  same computation as calling it per request). A lone answer runs its calls in its own thread.
- Image alignment (``max_image_wait``, default 8 steps): the first sampler step of an image is
  held back while other answers are still writing, so images of different answers start together
  and all their sampler steps share packed DiT calls (on the shipped toy model one DiT call for 4
  answers costs 2x one answer's, not 4x). Held at most ``max_image_wait`` steps (a few ms each),
  so an answer's image is never delayed for long; a drawing already started is never held.
- Text alignment (``max_text_wait``, default 20 steps): while other answers draw and one of the
  drawings ends within ``max_text_wait`` sampler steps, a lone writer's next token waits for it, so
  that it decodes together with the drawers' answers afterwards instead of alone beside every DiT
  step (a lone decode costs ~2-3 ms on one CPU thread, a fourth row in a batched decode well under
  1 ms). A token waits at most ``max_text_wait`` steps. 16 ShapeWorld answers at concurrency 4:
  1.40x -> 1.55x the one-at-a-time engine (medians of 6 alternating rounds; docs/serving.md).
- Answers join when their prefill arrives (at most ``max_batch`` at a time; a further one waits)
  and leave when their loop ends, for any reason (finished, cancelled, timed out, failed), so the
  others run on. An error in a step reaches only the answers in it; a batched call that fails (a decode, image
  blocks, a packed DiT call) is run again answer by answer, so that only the answer causing it fails (e.g. an
  image size past the DiT's grid; out of memory in a batch that fits answer by answer).
- Same seed, same answer: token sampling and image noise use the answer's own generators (the
  engine's), so a batched answer equals the answer alone in tokens; images and states agree within
  float tolerance (padding and packing change the reduction order, not the maths).
- Each answer keeps its own KV cache as per-layer (1, H, L, Dh) tensors (its own ``DynamicCache``
  between batched decodes). A batched decode pads them into one ``DynamicCache`` and slices the
  rows back as views; while the same answers decode step after step (the common case) the next
  step extends that padded cache instead of copying every answer's cache again
  (``reusable_batch``); it is rebuilt when the rows change or an answer runs a forward alone.
- Image blocks (``<BOV>`` + vision block + pixels) of two or more answers with equal lengths go through
  the MLLM in one forward too (``batched_append``); aligned images end in the same step, so they do.
- The model's settings apply as in ``InterleavedEngine``: conditioning frames are shown to the DiT at
  the model's ``condition_frame_time``. Only the ``duetgen`` framing is batched: a model or a request
  with ``framing="cosmos"`` (one caption -> one image, no text; duetgen.models.cosmos_predict) is refused
  with a ValueError, at construction (so `duetgen serve --batch N` stops at startup) or in ``run``;
  ``InterleavedEngine`` (`--batch 1`, `duetgen generate`) runs it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from duetgen.diffusion.draw import draw_latent
from duetgen.infer.engine import CONTEXTS, NOISE_SEED_STRIDE, GenerationConfig, InterleavedEngine, ResolvedGeneration
from duetgen.models.mllm import layer_states, rope_position_ids

log = logging.getLogger(__name__)


# ============================================================================ the scheduler
@dataclass(eq=False)  # jobs compare by identity (`job in jobs`), never by their tensors
class _Job:
    kind: str  # "mllm" | "dit"
    context: "BatchedContext | None"
    inputs: tuple
    first: bool = False  # dit: the first sampler step of an image (the only one that may be held back)
    remaining: int = 0  # dit: sampler steps of the image still to come after this one
    held: int = 0  # steps it was held back (image alignment for a DiT job, text alignment for a decode)
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class BatchScheduler:
    """Collects the model calls of up to ``max_batch`` concurrent answers and runs them as batched steps."""

    def __init__(self, model, max_batch: int, max_image_wait: int = 0, max_text_wait: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}")
        if max_image_wait < 0 or max_text_wait < 0:
            raise ValueError(f"max_image_wait and max_text_wait must be >= 0; got {max_image_wait}, {max_text_wait}")
        self.model, self.max_batch, self.max_image_wait = model, max_batch, max_image_wait
        self.max_text_wait = max_text_wait
        self._cond = threading.Condition()
        self._members: dict[int, BatchedContext] = {}  # thread id -> its answer's context
        self._pending: list[_Job] = []
        self._busy = False  # a step is running (in the scheduler's thread, or inline in a lone answer's)
        self._thread: threading.Thread | None = None
        self._joined = 0  # answers joined so far: each context's serial number
        self.steps = 0  # batched steps run (for tests and benchmarks)
        self.max_rows = 0  # the most answers decoded in one MLLM forward
        self.max_images = 0  # the most answers' images in one packed DiT call
        self.held = 0  # image starts held back a step (image alignment)
        self.text_held = 0  # decodes held back a step (text alignment)
        self.reused = 0  # batched decodes that extended the last padded cache instead of copying every answer's
        self.image_blocks = 0  # image blocks that went through the MLLM batched with another answer's
        self.split_calls = 0  # batched calls that failed and were run again answer by answer (logged too)

    def join(self, context: "BatchedContext") -> None:
        """The calling thread's answer joins (waits while ``max_batch`` answers run)."""
        with self._cond:
            while len(self._members) >= self.max_batch:
                self._cond.wait()
            self._members[threading.get_ident()] = context
            self._joined += 1
            context.serial = self._joined
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="duetgen-batch", daemon=True)
                self._thread.start()

    def leave(self) -> None:
        """The calling thread's answer is over (no-op if it never joined); its caches are let go at once."""
        with self._cond:
            context = self._members.pop(threading.get_ident(), None)
            if context is not None:
                context.release()
                self._cond.notify_all()

    def submit(self, kind: str, context, *inputs, first: bool = False, remaining: int = 0):
        """Block until the step that runs this call is over; its result, or its error raised here."""
        job = _Job(kind, context, inputs, first=first, remaining=remaining)
        with self._cond:
            # a lone answer runs its call in its own thread, with no hand-off to the scheduler and back (the
            # batched server answered one request at a time at 0.88-0.92x of the one-at-a-time server; with
            # this, a lone decode as a plain forward and an answer's own cache between batches: 1.02x)
            alone = not self._busy and not self._pending and list(self._members) == [threading.get_ident()]
            if alone:
                self._busy = True
            else:
                self._pending.append(job)
                self._cond.notify_all()
        if alone:
            try:
                self._step([job])  # nothing to hold: no other answer writes
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            with self._cond:
                # a step when every joined answer waits on one (a leaving answer wakes this up)
                while self._busy or not self._pending or len(self._pending) < len(self._members):
                    self._cond.wait()
                jobs, self._pending = self._pending, []
                self._busy = True
            try:
                held = self._step(jobs)
            except BaseException as e:  # a failure outside the model calls (those fail only their own jobs):
                held = []  # every job of this step gets it, and this thread lives on for the other answers
                for job in jobs:
                    if not job.done.is_set():
                        job.error = e
                        job.done.set()
            with self._cond:
                self._pending[:0] = held  # still waiting: they count for the next step's barrier
                self._busy = False
                self._cond.notify_all()

    def _step(self, jobs: list[_Job]) -> list[_Job]:
        """Run one step of ``jobs``; the jobs held back for a later step."""
        self.steps += 1
        decode = sorted((j for j in jobs if j.kind == "mllm" and j.context.kv is not None
                         and j.inputs[0].numel() == 1 and j.inputs[1] is None),
                        key=lambda j: j.context.serial)  # a fixed row order: the padded cache is reused
        dit = [j for j in jobs if j.kind == "dit"]
        # Image alignment: an image's first sampler step waits (up to max_image_wait steps) while other
        # answers are still writing, so that images start together and their steps share packed DiT calls
        # (a DiT call of 4 answers costs 2x one answer's on the toy model, not 4x).
        held = [j for j in dit if j.first and decode and j.held < self.max_image_wait]
        if len(held) == len(dit) and len(jobs) > len(held):  # hold only if the step has other work to run
            for job in held:
                job.held += 1
            self.held += len(held)
            dit = []
        else:
            held = []
        # Text alignment: a lone writer's next token waits (up to max_text_wait steps) while other answers draw
        # and one of the drawings ends within max_text_wait steps, so it decodes with that answer afterwards
        # instead of alone beside every DiT step (two writers or more already share their decode)
        if (dit and len(decode) == 1 and decode[0].held < self.max_text_wait
                and min(j.remaining for j in dit) < self.max_text_wait):
            decode[0].held += 1
            self.text_held += 1
            held, decode = held + decode, []
        if len(decode) == 1:  # one row: the plain cached forward (no padding mask, nothing to copy)
            decode = []
        # image blocks (<BOV> + vision block + pixels) of equal length: one forward too (aligned images end together)
        blocks: dict[int, list[_Job]] = {}
        for j in jobs:
            if j.kind == "mllm" and j.context.kv is not None and j.inputs[1] is not None:
                blocks.setdefault(j.inputs[0].numel(), []).append(j)
        blocks = {n: sorted(group, key=lambda j: j.context.serial) for n, group in blocks.items() if len(group) > 1}
        batched = decode + [j for group in blocks.values() for j in group]
        single = [j for j in jobs if j.kind == "mllm" and j not in batched and j not in held]
        if decode:
            contexts = [j.context for j in decode]
            self.reused += reusable_batch(contexts) is not None
            self._run(decode, lambda: decode_step(self.model.mllm, contexts, [int(j.inputs[0]) for j in decode]),
                      alone=_forward_alone)
            self.max_rows = max(self.max_rows, len(decode))
        for group in blocks.values():
            self._run(group, lambda group=group: batched_append(
                self.model.mllm, [j.context for j in group], [j.inputs[0] for j in group],
                [j.inputs[1] for j in group], [j.inputs[2] for j in group]), alone=_forward_alone)
            self.image_blocks += len(group)
        for job in single:
            self._run([job], lambda job=job: _forward_alone(job))
        if dit:
            self._run(dit, lambda: packed_dit_step(self.model.dit, [j.inputs[0] for j in dit]),
                      alone=lambda job: packed_dit_step(self.model.dit, [job.inputs[0]]))
            self.max_images = max(self.max_images, len(dit))
        return held

    def _run(self, jobs: list[_Job], call, alone=None) -> None:
        try:
            results = call()
        except BaseException as e:
            if alone is None or len(jobs) == 1 or not isinstance(e, Exception):
                for job in jobs:  # only the answers in this call fail; the others run on
                    job.error = e
                    job.done.set()
                return
            error = f"{type(e).__name__}: {e}"[:300]
        else:
            for job, result in zip(jobs, results):
                job.result = result
                job.done.set()
            return
        # A batched call failed: each answer alone, so that only the one causing it fails. Outside the except block,
        # so that the failed call's tensors (its traceback holds them) are gone, and with the rows' links to that
        # call's padded cache dropped first: a batch too big for memory leaves the memory to the answers alone.
        self.split_calls += 1
        log.warning("a batched call of %d answers failed (%s); running it answer by answer", len(jobs), error)
        for job in jobs:
            if job.context is not None:
                job.context.batch = None
        for job in jobs:
            self._run([job], lambda job=job: alone(job))


def _forward_alone(job: _Job) -> list[Tensor]:
    """A job of a failed batched MLLM call, run again through its answer's own cache. A forward that failed part-way
    changed nothing the answer keeps: its kv still views the last good cache, since transformers' DynamicCache
    grows a layer with torch.cat, a new tensor (tests/test_batched_engine.py fails a batch inside a layer)."""
    return [job.context.forward(*job.inputs)]


# ============================================================================ the MLLM side
class BatchedContext:
    """One answer's MLLM state (same calls as ``engine.KVCacheContext``); its forwards run in the scheduler's steps."""

    def __init__(self, scheduler: BatchScheduler, model):
        self.scheduler, self.model = scheduler, model
        self.kv: list[tuple[Tensor, Tensor]] | None = None  # per layer (keys, values), each (1, H, L, Dh)
        self.batch: _PaddedBatch | None = None  # the padded cache whose row this kv is a view of (decode_step)
        self.cache = None  # this answer's own DynamicCache while its kv is not a batch's row (forward)
        self.serial = 0  # join order (the scheduler's): this answer's row order in a batched decode
        self.input_ids: list[int] = []
        self.next_position = 0  # rope position of the next token (all three axes)
        self._states: list[Tensor] = []  # (n, n_layers * D) per chunk, as produced
        self.forward_seconds = 0.0  # time in the steps this answer was part of
        scheduler.join(self)

    def __len__(self) -> int:
        return len(self.input_ids)

    def release(self) -> None:
        """Let the caches go (the answer is over). A padded batch and its rows point at each other: without this,
        only the cycle collector (rarely run) freed finished answers' caches (a KV cache and all-layer states each:
        GBs on a real model)."""
        self.batch = self.kv = self.cache = None
        self._states = []

    def prefill(self, input_ids: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        return self.append(input_ids, pixel_values, image_grid_thw)

    def append(self, input_ids: Tensor, pixel_values: Tensor | None = None,
               image_grid_thw: Tensor | None = None) -> Tensor:
        start = time.perf_counter()
        logits = self.scheduler.submit("mllm", self, input_ids, pixel_values, image_grid_thw)
        self.forward_seconds += time.perf_counter() - start
        return logits

    def states(self, length: int) -> Tensor:
        if len(self._states) > 1:
            self._states = [torch.cat(self._states)]
        return self._states[0][:length]

    @torch.no_grad()
    def forward(self, input_ids: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        """A chunk alone through this answer's cache (a prefill or a vision block): as ``KVCacheContext.append``."""
        from transformers import DynamicCache

        device = self.model.device
        ids = input_ids.to(device)  # (n,)
        grid = image_grid_thw.to(device) if image_grid_thw is not None else None
        positions = rope_position_ids(self.model, ids, grid) + self.next_position  # (3, n)
        kwargs = {"pixel_values": pixel_values.to(device), "image_grid_thw": grid} if pixel_values is not None else {}
        if self.cache is None:  # first call, or the kv is a row of a batched decode: copied into a cache of its own
            self.cache = DynamicCache(ddp_cache_data=self.kv, config=self.model.config)
        cache = self.cache
        out = self.model(input_ids=ids[None], position_ids=positions[:, None], past_key_values=cache,
                         use_cache=True, output_hidden_states=True, logits_to_keep=1, **kwargs)
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.batch = None
        self._record(input_ids.tolist(), layer_states(out.hidden_states)[0], int(positions.max()) + 1)
        return out.logits[0, -1]  # (V,)

    def _record(self, ids: list[int], states: Tensor, next_position: int) -> None:
        self.input_ids.extend(ids)
        self._states.append(states)
        self.next_position = next_position


@dataclass
class _PaddedBatch:
    """The left-padded KV cache of the last batched decode: reused while the same answers decode in a row."""

    contexts: list  # the rows, in order
    pads: list[int]  # left padding of each row
    cache: object  # transformers.DynamicCache, (B, H, longest, Dh) per layer


def reusable_batch(contexts: list[BatchedContext]) -> _PaddedBatch | None:
    """The last step's padded cache if exactly these answers, in this order, decoded in it and did nothing since."""
    batch = contexts[0].batch
    if batch is not None and batch.contexts == contexts and all(c.batch is batch for c in contexts):
        return batch
    return None


@torch.no_grad()
def decode_step(mllm, contexts: list[BatchedContext], tokens: list[int]) -> list[Tensor]:
    """One token for each of B answers in one forward over their left-padded caches -> B logits (V,)."""
    return batched_append(mllm, contexts, [torch.tensor([t]) for t in tokens])


@torch.no_grad()
def batched_append(mllm, contexts: list[BatchedContext], chunks: list[Tensor], pixel_values: list[Tensor] | None = None,
                   grids: list[Tensor] | None = None) -> list[Tensor]:
    """B answers' chunks of equal length n (single tokens, or image blocks with their pixels and (1, 3) grids)
    in one forward over their left-padded caches -> B logits (V,) after each chunk.

    The padded cache is built by copying each answer's cache (padded to the longest) only when the
    rows changed since the last step (an answer joined, left, or ran a forward of its own); while the
    same answers go on together (decoding, drawing, taking their image blocks), the last step's padded
    cache is extended in place.
    """
    from transformers import DynamicCache

    device = mllm.device
    n = len(chunks[0])
    if any(len(chunk) != n for chunk in chunks):
        raise ValueError(f"batched_append takes chunks of one length; got {[len(c) for c in chunks]}")
    batch = reusable_batch(contexts)
    if batch is not None:
        pads, cache = batch.pads, batch.cache  # each row's kv is still its view of this cache
        longest = cache.get_seq_length()
    else:
        lengths = [len(c) for c in contexts]
        longest = max(lengths)
        pads = [longest - length for length in lengths]
        cache_data = []
        for layer in range(len(contexts[0].kv)):
            keys = torch.cat([F.pad(c.kv[layer][0], (0, 0, p, 0)) for c, p in zip(contexts, pads)])  # (B, H, longest, Dh)
            values = torch.cat([F.pad(c.kv[layer][1], (0, 0, p, 0)) for c, p in zip(contexts, pads)])
            cache_data.append((keys, values))
        cache = DynamicCache(ddp_cache_data=cache_data, config=mllm.config)
        batch = _PaddedBatch(list(contexts), pads, cache)
    mask = torch.ones(len(contexts), longest + n, dtype=torch.long, device=device)  # (B, longest + n)
    for row, p in enumerate(pads):
        mask[row, :p] = 0  # the padding is never attended to
    ids = torch.stack(chunks).to(device)  # (B, n)
    kwargs = {}
    if pixel_values is None:  # text tokens advance all three rope axes by one
        positions = torch.stack([torch.arange(n, device=device) + c.next_position for c in contexts])  # (B, n)
        positions = positions[None].expand(3, -1, -1)  # (3, B, n)
    else:
        grid = torch.cat(grids).to(device)  # (B, 3)
        positions = torch.stack([rope_position_ids(mllm, ids[row], grid[row:row + 1]) + c.next_position
                                 for row, c in enumerate(contexts)], dim=1)  # (3, B, n)
        kwargs = {"pixel_values": torch.cat(pixel_values).to(device), "image_grid_thw": grid}  # images in row order
    out = mllm(
        input_ids=ids,  # (B, n)
        position_ids=positions,  # (3, B, n)
        attention_mask=mask,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
        **kwargs,
    )
    states = layer_states(out.hidden_states)  # (B, n, n_layers * D)
    for row, (c, p) in enumerate(zip(contexts, pads)):
        c.kv = [(layer.keys[row:row + 1, :, p:], layer.values[row:row + 1, :, p:]) for layer in cache.layers]  # views
        c.batch, c.cache = batch, None
        c._record(chunks[row].tolist(), states[row], int(positions[:, row].max()) + 1)
    return [out.logits[row, -1] for row in range(len(contexts))]


# ============================================================================ the DiT side
@torch.no_grad()
def packed_dit_step(dit, calls: list[dict]) -> list[list]:
    """Several requests' DiT calls (per-sample lists each) as one packed call -> each request's outputs."""
    keys = ("frames", "timesteps", "condition_mask", "text")
    packed = {k: [s for call in calls for s in call[k]] for k in keys}
    out = dit(**packed, targets_only=True)  # one list of frame outputs per sample
    results, at = [], 0
    for call in calls:
        n = len(call["frames"])
        results.append(out[at:at + n])
        at += n
    return results


# ============================================================================ the engine
class BatchedEngine(InterleavedEngine):
    """``InterleavedEngine`` whose concurrent answers (one per calling thread) share batched model steps."""

    def __init__(self, model, max_batch: int = 4, max_image_wait: int = 8, max_text_wait: int = 20):
        if model.config.framing != "duetgen":
            raise ValueError(f"BatchedEngine batches the 'duetgen' framing only; this model's framing is "
                             f"{model.config.framing!r} (duetgen.json settings.framing): serve it one request at a "
                             f"time (duetgen serve --batch 1) or use duetgen generate")
        super().__init__(model)
        self.scheduler = BatchScheduler(model, max_batch, max_image_wait, max_text_wait)
        self.context_name = f"batched-{id(self):x}"
        CONTEXTS[self.context_name] = functools.partial(BatchedContext, self.scheduler)  # engine.run(context=...)

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    def run(self, messages, config: GenerationConfig | None = None, *, context: str | None = None, **kwargs):
        if config is not None and config.framing == "cosmos":  # refused before the answer joins: nothing waits
            raise ValueError("BatchedEngine batches the 'duetgen' framing only; got framing='cosmos': run it with "
                             "InterleavedEngine (duetgen generate --framing cosmos)")
        try:
            return super().run(messages, config, context=context or self.context_name, **kwargs)
        finally:
            self.scheduler.leave()  # whatever ended the answer, the others do not wait for it

    @torch.no_grad()
    def draw(self, context, bov_position: int, system_length: int, cond_latents: list[Tensor],
             settings: ResolvedGeneration, image_index: int, on_step) -> Tensor:
        """As ``InterleavedEngine.draw``; the sampler's DiT calls are packed with the other answers'."""
        if not isinstance(context, BatchedContext):  # context="kv_cache" / "recompute": the engine's own path
            return super().draw(context, bov_position, system_length, cond_latents, settings, image_index, on_step)
        text_pos, text_neg = self.condition(context, bov_position, system_length)
        generator = torch.Generator().manual_seed(settings.config.seed + NOISE_SEED_STRIDE * (image_index + 1))
        calls = 0

        def dit(targets_only, **inputs):  # packed with the other answers' calls; targets only
            nonlocal calls
            calls += 1
            return self.scheduler.submit("dit", None, inputs, first=calls == 1,
                                         remaining=settings.sampler.num_steps - calls)

        return draw_latent(
            self.model, cond_latents, text_pos, text_neg, size=settings.image_size, generator=generator,
            sampler=settings.sampler, guidance_scale=settings.guidance_for(bool(cond_latents)),
            callback=lambda i, n, t, x: on_step(i + 1, n), dit=dit,
        )
