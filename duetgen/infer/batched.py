"""Concurrent answers batched through one model: one MLLM forward decodes a token for every answer, one packed DiT call
steps every image being drawn.

    engine = BatchedEngine(model, max_batch=4)           # a drop-in InterleavedEngine
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
  every single-token decode of an answer as one batched MLLM forward over their KV caches
  (left-padded to the longest, padding masked, explicit 3D rope positions per row); every other
  MLLM call (a prefill, an image's vision block with its pixels) alone; every DiT call as one
  packed DiT call (the DiT attends within each sample only, so packing requests is the same
  computation as calling it per request).
- Answers join when their prefill arrives (at most ``max_batch`` at a time; a further one waits)
  and leave when their loop ends, for any reason (finished, cancelled, timed out, failed), so the
  others run on. An error in a step reaches only the answers in it.
- Same seed, same answer: token sampling and image noise use the answer's own generators (the
  engine's), so a batched answer equals the answer alone in tokens; images and states agree within
  float tolerance (padding and packing change the reduction order, not the maths).
- Each answer keeps its own KV cache as per-layer (1, H, L, Dh) tensors; a batched step pads
  them into one ``DynamicCache`` and slices the rows back (a copy per step, small next to the
  forward at serving batch sizes; a persistent padded cache is the next optimisation).
- The model's settings apply as in ``InterleavedEngine``: conditioning frames are shown to the DiT at
  the model's ``condition_frame_time``. Only the ``duetgen`` framing is batched: a model or a request
  with ``framing="cosmos"`` (one caption -> one image, no text; duetgen.models.cosmos_predict) is refused
  with a ValueError, at construction (so `duetgen serve --batch N` stops at startup) or in ``run``;
  ``InterleavedEngine`` (`--batch 1`, `duetgen generate`) runs it.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from duetgen.diffusion.draw import draw_latent
from duetgen.infer.engine import CONTEXTS, NOISE_SEED_STRIDE, GenerationConfig, InterleavedEngine, ResolvedGeneration
from duetgen.models.mllm import layer_states, rope_position_ids


# ============================================================================ the scheduler
@dataclass
class _Job:
    kind: str  # "mllm" | "dit"
    context: "BatchedContext | None"
    inputs: tuple
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class BatchScheduler:
    """Collects the model calls of up to ``max_batch`` concurrent answers and runs them as batched steps."""

    def __init__(self, model, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self._cond = threading.Condition()
        self._members: dict[int, BatchedContext] = {}  # thread id -> its answer's context
        self._pending: list[_Job] = []
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched steps run (for tests and benchmarks)
        self.max_rows = 0  # the most answers decoded in one MLLM forward

    def join(self, context: "BatchedContext") -> None:
        """The calling thread's answer joins (waits while ``max_batch`` answers run)."""
        with self._cond:
            while len(self._members) >= self.max_batch:
                self._cond.wait()
            self._members[threading.get_ident()] = context
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="duetgen-batch", daemon=True)
                self._thread.start()

    def leave(self) -> None:
        """The calling thread's answer is over (no-op if it never joined)."""
        with self._cond:
            if self._members.pop(threading.get_ident(), None) is not None:
                self._cond.notify_all()

    def submit(self, kind: str, context, *inputs):
        """Block until the step that runs this call is over; its result, or its error raised here."""
        job = _Job(kind, context, inputs)
        with self._cond:
            self._pending.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            with self._cond:
                # a step when every joined answer waits on one (a leaving answer wakes this up)
                while not self._pending or len(self._pending) < len(self._members):
                    self._cond.wait()
                jobs, self._pending = self._pending, []
            self._step(jobs)

    def _step(self, jobs: list[_Job]) -> None:
        self.steps += 1
        decode = [j for j in jobs if j.kind == "mllm" and j.context.kv is not None
                  and j.inputs[0].numel() == 1 and j.inputs[1] is None]
        single = [j for j in jobs if j.kind == "mllm" and j not in decode]
        dit = [j for j in jobs if j.kind == "dit"]
        if decode:
            self._run(decode, lambda: decode_step(self.model.mllm, [j.context for j in decode],
                                                  [int(j.inputs[0]) for j in decode]))
            self.max_rows = max(self.max_rows, len(decode))
        for job in single:
            self._run([job], lambda job=job: [job.context.forward(*job.inputs)])
        if dit:
            self._run(dit, lambda: packed_dit_step(self.model.dit, [j.inputs[0] for j in dit]))

    @staticmethod
    def _run(jobs: list[_Job], call) -> None:
        try:
            results = call()
        except BaseException as e:  # only the answers in this call fail; the others run on
            for job in jobs:
                job.error = e
                job.done.set()
            return
        for job, result in zip(jobs, results):
            job.result = result
            job.done.set()


# ============================================================================ the MLLM side
class BatchedContext:
    """One answer's MLLM state (same calls as ``engine.KVCacheContext``); its forwards run in the scheduler's steps."""

    def __init__(self, scheduler: BatchScheduler, model):
        self.scheduler, self.model = scheduler, model
        self.kv: list[tuple[Tensor, Tensor]] | None = None  # per layer (keys, values), each (1, H, L, Dh)
        self.input_ids: list[int] = []
        self.next_position = 0  # rope position of the next token (all three axes)
        self._states: list[Tensor] = []  # (n, n_layers * D) per chunk, as produced
        self.forward_seconds = 0.0  # time in the steps this answer was part of
        scheduler.join(self)

    def __len__(self) -> int:
        return len(self.input_ids)

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
        cache = DynamicCache(ddp_cache_data=self.kv, config=self.model.config)
        out = self.model(input_ids=ids[None], position_ids=positions[:, None], past_key_values=cache,
                         use_cache=True, output_hidden_states=True, logits_to_keep=1, **kwargs)
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._record(input_ids.tolist(), layer_states(out.hidden_states)[0], int(positions.max()) + 1)
        return out.logits[0, -1]  # (V,)

    def _record(self, ids: list[int], states: Tensor, next_position: int) -> None:
        self.input_ids.extend(ids)
        self._states.append(states)
        self.next_position = next_position


@torch.no_grad()
def decode_step(mllm, contexts: list[BatchedContext], tokens: list[int]) -> list[Tensor]:
    """One token for each of B answers in one forward over their left-padded caches -> B logits (V,)."""
    from transformers import DynamicCache

    device = mllm.device
    lengths = [len(c) for c in contexts]
    longest = max(lengths)
    pads = [longest - n for n in lengths]
    cache_data = []
    for layer in range(len(contexts[0].kv)):
        keys = torch.cat([F.pad(c.kv[layer][0], (0, 0, p, 0)) for c, p in zip(contexts, pads)])  # (B, H, longest, Dh)
        values = torch.cat([F.pad(c.kv[layer][1], (0, 0, p, 0)) for c, p in zip(contexts, pads)])
        cache_data.append((keys, values))
    cache = DynamicCache(ddp_cache_data=cache_data, config=mllm.config)
    mask = torch.ones(len(contexts), longest + 1, dtype=torch.long, device=device)  # (B, longest + 1)
    for row, p in enumerate(pads):
        mask[row, :p] = 0  # the padding is never attended to
    positions = torch.tensor([c.next_position for c in contexts], device=device)  # (B,)
    out = mllm(
        input_ids=torch.tensor(tokens, device=device)[:, None],  # (B, 1)
        position_ids=positions[None, :, None].expand(3, -1, 1),  # (3, B, 1): a text token advances all axes by one
        attention_mask=mask,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    states = layer_states(out.hidden_states)  # (B, 1, n_layers * D)
    for row, (c, p) in enumerate(zip(contexts, pads)):
        c.kv = [(layer.keys[row:row + 1, :, p:], layer.values[row:row + 1, :, p:]) for layer in cache.layers]
        c._record([tokens[row]], states[row], c.next_position + 1)
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

    def __init__(self, model, max_batch: int = 4):
        if model.config.framing != "duetgen":
            raise ValueError(f"BatchedEngine batches the 'duetgen' framing only; this model's framing is "
                             f"{model.config.framing!r} (duetgen.json settings.framing): serve it one request at a "
                             f"time (duetgen serve --batch 1) or use duetgen generate")
        super().__init__(model)
        self.scheduler = BatchScheduler(model, max_batch)
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
        return draw_latent(
            self.model, cond_latents, text_pos, text_neg, size=settings.image_size, generator=generator,
            sampler=settings.sampler, guidance_scale=settings.guidance_for(bool(cond_latents)),
            callback=lambda i, n, t, x: on_step(i + 1, n),
            dit=lambda targets_only, **inputs: self.scheduler.submit("dit", None, inputs),  # packed: targets only
        )
