"""The interleaved decode loop: the MLLM writes, and on ``<BOV>`` the DiT draws (DESIGN section 7).

    engine = InterleavedEngine(model)                        # a duetgen.models.duetgen.DuetGen
    for event in engine.stream(messages, GenerationConfig(seed=0)):
        ...                                                  # TextDelta, ImageStarted, DenoisingStep, ImageDone, Finished
    finished = engine.run(messages, config, emit=print)      # the same loop, synchronous

The loop, for one assistant answer (paper section 4, "During inference ..."):
1. Render the conversation so far (``render_prompt``: it ends in an open assistant turn), encode
   every earlier image once with the autoencoder (the DiT's clean conditioning frames).
2. Prefill the MLLM once. Its per-layer hidden states (``layer_states``) are kept.
3. Decode a token. Text: feed it, keep its states, stream the text. End of turn or a limit: stop.
4. ``<BOV>`` at position b: the DiT text condition is the kept states of tokens [0, b) through the
   connector; the guidance negative is its prefix without the final text chunk (a slice: no extra
   MLLM pass). Sample the target latent with guidance (positive and negative as two samples of one
   packed DiT call), decode it, then feed ``<BOV><|vision_start|><|image_pad|>*n<|vision_end|>``
   plus the new image's pixels to the MLLM in one forward: the image enters the KV cache with its
   3D rope positions, and the logits after ``<|vision_end|>`` give the next token. Back to 3.

Design choices:
- One ``DynamicCache`` for the whole answer (``KVCacheContext``). ``RecomputeContext`` is the naive
  baseline that re-prefills the whole history for every token; both expose the same three calls
  (prefill / append / states), so the loop is written once and the test and the benchmark compare
  only the MLLM bookkeeping.
- Hidden states are kept as they are produced (prefill, each decode step, each image block) and
  never recomputed: ``states(b)`` concatenates the kept chunks.
- 3D rope positions are tracked by the context itself: a chunk appended at ``next_position`` gets
  ``rope_position_ids(chunk) + next_position`` (Qwen2.5-VL's ``get_rope_index`` is translation
  invariant: text advances by one, an image's t/h/w start at the running position and the text
  after it resumes at ``start + max(h, w) / merge``). Tested equal to ``rope_position_ids`` of the
  full sequence. Positions are always passed explicitly (transformers 5.23 only computes mrope
  itself when it also gets ``mm_token_type_ids``).
- The vision tokens are written by the engine, never sampled: every special token except
  ``<BOV>``, ``<|im_end|>`` and ``<|endoftext|>`` is masked out of the logits (a sampled
  ``<|image_pad|>`` without pixels would be meaningless to the model).
- Settings are resolved once per answer (``GenerationConfig.resolve``: the caller's overrides over the
  checkpoint's defaults). The DiT side is ``duetgen.diffusion.draw.draw_latent`` (the one drawing of an
  image: noise, frames, the x0 rule the network was trained with, guidance, sampler) with the model's
  ``encode_images`` / ``decode_latents`` / ``generation_size``: the engine adds only the text condition
  (kept states -> connector) and its negative slice.
- A generated image is re-encoded from its uint8 pixels for later conditioning, not reused as the
  sampled float latent: the condition is then exactly what a later run on the saved record sees.
  An input image is resized with ``generation_size`` (aspect kept, at most ``image_size`` pixels).
- Reproducibility: every random draw comes from CPU generators seeded from ``config.seed`` (token
  sampling: one generator for the answer; image noise: ``seed + 1000 * (image index + 1)``), so a
  seed gives the same answer on any device within float tolerance, and image k's noise does not
  depend on how many tokens came before it.
- Limits: ``max_new_tokens`` counts sampled tokens (text and ``<BOV>``; the vision block the engine
  writes is not counted); a ``<BOV>`` beyond ``max_images`` ends the answer with reason
  ``max_images`` rather than silently dropping the picture the model asked for.
- ``logits_processor(generated_ids, logits) -> logits`` is a hook for constrained decoding. The
  tests use it to force ``<BOV>`` at chosen points in a random tiny model (which writes one only by
  chance); it is applied identically in both contexts.
- ``stream`` runs ``run`` in a worker thread and hands its events over a queue, so denoising steps
  arrive while the sampler runs; closing the stream cancels the answer at its next event.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from duetgen.data.images import to_rgb
from duetgen.data.record import ImagePart, Message, RecordError, TextPart
from duetgen.diffusion.draw import draw_latent
from duetgen.diffusion.schedules import SOLVERS, SamplerConfig
from duetgen.models.duetgen import FRAMINGS
from duetgen.models.mllm import (TokenIds, final_text_chunk_start, layer_states, render_prompt, rope_position_ids,
                                 vision_block)

FINISH_REASONS = ("end_of_turn", "max_tokens", "max_images")
NOISE_SEED_STRIDE = 1000  # image k's noise generator is seeded with seed + STRIDE * (k + 1)


# ============================================================================ configs and events
@dataclass
class GenerationConfig:
    """Sampling settings of one answer, checked when built. ``None`` takes the model's default
    (its ``DuetGenConfig``): ``resolve`` fills them in once per answer."""

    max_new_tokens: int = 512  # sampled tokens (text + <BOV>); the engine-written vision tokens do not count
    max_images: int | None = None  # generated images; a <BOV> past the limit ends the answer ("max_images").
    # None: as many as the model's max_images (inputs + generated) leaves after the prompt's images
    temperature: float = 0.0  # 0 = greedy; otherwise softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
    seed: int = 0  # token sampling and image noise (see module docstring)
    num_steps: int | None = None  # DiT sampler steps per image (calibration: 10 nearly as good as 50 on ShapeWorld)
    guidance_scale: float | None = None  # w in v = v_neg + w (v_pos - v_neg); 1 = no guidance (one branch per step)
    solver: str | None = None  # "euler" | "unipc" (duetgen.diffusion.sampling)
    image_size: tuple[int, int] | None = None  # (height, width) of generated images in pixels
    # "duetgen" | "cosmos": how the DiT's text condition is framed (DuetGenConfig.framing; None = the model's).
    # "cosmos": no text is written; one image is drawn from the prompt as a Cosmos-Predict2.5 caption
    framing: str | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.max_images is not None and self.max_images < 0:
            raise ValueError(f"max_images must be >= 0; got {self.max_images}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1; got {self.num_steps}")
        if self.guidance_scale is not None and not (self.guidance_scale > 0 and math.isfinite(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number > 0; got {self.guidance_scale}")
        if self.solver is not None and self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {self.solver!r}")
        if self.image_size is not None:
            if len(self.image_size) != 2 or min(self.image_size) < 1:
                raise ValueError(f"image_size must be (height, width) in pixels; got {self.image_size}")
        if self.framing is not None and self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}; got {self.framing!r}")

    def resolve(self, model_config, pixel_multiple: int) -> "ResolvedGeneration":
        """The settings one answer runs with: every ``None`` replaced by the model's default, once.

        model_config: the model's ``DuetGenConfig`` (its sampler, guidance, image size and framing are the
        checkpoint's defaults); pixel_multiple: ``DuetGen.pixel_multiple`` (image sides must be multiples).
        """
        height, width = self.image_size or model_config.image_size
        if height % pixel_multiple or width % pixel_multiple:
            raise ValueError(f"image_size {height}x{width}: height and width must be multiples of {pixel_multiple} "
                             f"(autoencoder factor x DiT patch)")
        overrides = {k: v for k, v in (("num_steps", self.num_steps), ("solver", self.solver)) if v is not None}
        if self.guidance_scale is not None:  # the caller's w holds for every image
            with_frames = without_frames = self.guidance_scale
        else:
            with_frames = model_config.guidance_scale
            without_frames = model_config.guidance_scale_without_frames
            if without_frames is None:  # the checkpoint sets no separate w for images without earlier ones
                without_frames = model_config.guidance_scale
        return ResolvedGeneration(
            config=self,
            sampler=dataclasses.replace(model_config.sampler, **overrides),
            guidance_with_frames=with_frames,
            guidance_without_frames=without_frames,
            image_size=(height, width),
            framing=self.framing or model_config.framing,
        )


@dataclass(frozen=True)
class ResolvedGeneration:
    """``GenerationConfig`` with the model's defaults filled in (``GenerationConfig.resolve``)."""

    config: GenerationConfig  # as given: token limits, temperature, top_p, seed, max_images
    sampler: SamplerConfig  # the model's sampler with the caller's num_steps / solver
    guidance_with_frames: float  # w of an image drawn with earlier images
    guidance_without_frames: float  # w of an image with none (DuetGenConfig.guidance_scale_without_frames)
    image_size: tuple[int, int]  # (height, width) of generated images
    framing: str  # "duetgen" | "cosmos"

    def guidance_for(self, has_frames: bool) -> float:
        return self.guidance_with_frames if has_frames else self.guidance_without_frames


@dataclass
class TextDelta:
    text: str  # new answer text since the last event (never splits a UTF-8 character)


@dataclass
class ImageStarted:
    index: int  # 0-based among the images generated in this answer
    height: int
    width: int


@dataclass
class DenoisingStep:
    index: int  # image index
    step: int  # 1-based step just finished
    num_steps: int


@dataclass
class ImageDone:
    index: int
    image: Image.Image  # RGB, the decoded picture
    seconds: float  # DiT sampling + decode time of this image


@dataclass
class Finished:
    reason: str  # one of FINISH_REASONS
    content: list  # the answer's parts in order: TextPart / ImagePart(PIL image)
    stats: dict  # token / image counts and timings (time_to_first_token_s, mllm_s, dit_s, total_s, ...)
    record: object = None  # the answer as a Record, set by DuetGenPipeline.stream


Event = TextDelta | ImageStarted | DenoisingStep | ImageDone | Finished


# ============================================================================ MLLM contexts
class KVCacheContext:
    """The answer's MLLM state: one KV cache, kept hidden states, running 3D rope position."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.input_ids: list[int] = []
        self.next_position = 0  # rope position of the next token (all three axes)
        self.positions: list[Tensor] = []  # (3, n) per chunk; the test compares them with the full sequence
        self._states: list[Tensor] = []  # (n, n_layers * D) per chunk, as produced
        self.forward_seconds = 0.0

    def __len__(self) -> int:
        return len(self.input_ids)

    def prefill(self, input_ids: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        """The prompt in one forward; returns the next-token logits (V,)."""
        return self.append(input_ids, pixel_values, image_grid_thw)

    @torch.no_grad()
    def append(self, input_ids: Tensor, pixel_values: Tensor | None = None,
               image_grid_thw: Tensor | None = None) -> Tensor:
        """Feed a chunk (text tokens, or a vision block with its pixels) through the cache; logits (V,) after it."""
        start = time.perf_counter()
        device = self.model.device
        ids = input_ids.to(device)  # (n,)
        grid = image_grid_thw.to(device) if image_grid_thw is not None else None
        positions = rope_position_ids(self.model, ids, grid) + self.next_position  # (3, n): translation invariant
        kwargs = {}
        if pixel_values is not None:
            kwargs = {"pixel_values": pixel_values.to(device), "image_grid_thw": grid}
        out = self.model(
            input_ids=ids[None],  # (1, n)
            position_ids=positions[:, None],  # (3, 1, n)
            past_key_values=self.cache,  # transformers 5.23 name (the cache object is updated in place)
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
            **kwargs,
        )
        self._states.append(layer_states(out.hidden_states)[0])  # (n, n_layers * D)
        self.positions.append(positions)
        self.next_position = int(positions.max()) + 1
        self.input_ids.extend(input_ids.tolist())
        self.forward_seconds += time.perf_counter() - start
        return out.logits[0, -1]  # (V,)

    def states(self, length: int) -> Tensor:
        """(length, n_layers * D): the kept states of tokens [0, length)."""
        if len(self._states) > 1:  # consolidate so repeated conditions do not re-concatenate every chunk
            self._states = [torch.cat(self._states)]
        return self._states[0][:length]


class RecomputeContext:
    """Baseline: no cache; every call re-runs the whole history (prompt, answer so far, every image)."""

    def __init__(self, model):
        self.model = model
        self.input_ids: list[int] = []
        self._pixels: list[Tensor] = []
        self._grids: list[Tensor] = []
        self._states: Tensor | None = None
        self.forward_seconds = 0.0

    def __len__(self) -> int:
        return len(self.input_ids)

    def prefill(self, input_ids: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        return self.append(input_ids, pixel_values, image_grid_thw)

    @torch.no_grad()
    def append(self, input_ids: Tensor, pixel_values: Tensor | None = None,
               image_grid_thw: Tensor | None = None) -> Tensor:
        start = time.perf_counter()
        device = self.model.device
        self.input_ids.extend(input_ids.tolist())
        if pixel_values is not None:
            self._pixels.append(pixel_values)
            self._grids.append(image_grid_thw)
        ids = torch.tensor(self.input_ids, dtype=torch.long, device=device)  # (L,)
        grid = torch.cat(self._grids).to(device) if self._grids else None
        kwargs = {}
        if grid is not None:
            kwargs = {"pixel_values": torch.cat(self._pixels).to(device), "image_grid_thw": grid}
        out = self.model(
            input_ids=ids[None],
            position_ids=rope_position_ids(self.model, ids, grid)[:, None],  # (3, 1, L)
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
            **kwargs,
        )
        self._states = layer_states(out.hidden_states)[0]  # (L, n_layers * D), recomputed every time
        self.forward_seconds += time.perf_counter() - start
        return out.logits[0, -1]

    def states(self, length: int) -> Tensor:
        return self._states[:length]


CONTEXTS = {"kv_cache": KVCacheContext, "recompute": RecomputeContext}


# ============================================================================ token sampling
def special_token_mask(tokenizer, vocab_rows: int, allowed: Sequence[int]) -> Tensor:
    """(V,) bool, True for tokens the model may not sample: every special token except ``allowed``."""
    banned = torch.zeros(vocab_rows, dtype=torch.bool)
    for token_id in tokenizer.all_special_ids + [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_added_vocab()]:
        if token_id is not None and 0 <= token_id < vocab_rows and token_id not in allowed:
            banned[token_id] = True
    banned[len(tokenizer):] = True  # padding rows of the embedding matrix are no tokens
    return banned


TINY_TEMPERATURE = 1e-3  # below it, logits are scaled in float64 from their maximum


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy for temperature 0, else nucleus sampling with ``generator`` (CPU, float32)."""
    logits = logits.float().cpu()
    if temperature == 0:
        return int(logits.argmax())
    if temperature < TINY_TEMPERATURE:  # logits / temperature would overflow float32 (inf / inf = nan)
        probs = torch.softmax((logits.double() - logits.max()) / temperature, dim=-1).float()
    else:
        probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        keep[0] = True  # the most likely token, also when top_p is below float32's smallest number
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class _TextStream:
    """Incremental detokenisation: deltas of ``decode(ids)`` that never end in half a character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence; wait for the next token
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def flush(self) -> tuple[str, str]:
        """End the segment: (its full text, the part not yet emitted, e.g. a held-back broken character)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False) if self.ids else ""
        rest = text[len(self.emitted):]
        self.ids, self.emitted = [], ""
        return text, rest


# ============================================================================ the engine
class InterleavedEngine:
    """Runs one assistant answer of a ``DuetGen`` model (duetgen.models.duetgen) as a stream of events.

    Not thread-safe: one answer at a time per engine (the server serialises requests per model).
    """

    def __init__(self, model):
        self.model = model
        self.ids = TokenIds.from_tokenizer(model.tokenizer)
        self.eos_ids = {self.ids.im_end}
        eot = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if isinstance(eot, int) and eot >= 0:
            self.eos_ids.add(eot)
        rows = model.mllm.get_output_embeddings().weight.shape[0]
        self.banned = special_token_mask(model.tokenizer, rows, allowed=[self.ids.bov, *self.eos_ids])

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def load_image(part: ImagePart) -> Image.Image:
        if isinstance(part.image, Image.Image):
            return to_rgb(part.image)
        raise RecordError(f"image {part.image!r} is not an in-memory PIL image; the caller loads images")

    def condition_latent(self, image: Image.Image) -> Tensor:
        """An earlier image -> its clean conditioning latent (C, h, w), resized to a size the DiT can take."""
        return self.model.encode_images([self.model.fit_image(image)])[0]

    def condition(self, context, bov_position: int, system_length: int) -> tuple[Tensor, Tensor]:
        """(text_pos (b, D_cross), text_neg): the kept states of every token before the <BOV> through the
        connector, and its guidance negative, a prefix slice (causal MLLM, paper section 4)."""
        text_pos = self.model.connect(context.states(bov_position))  # (b, D_cross)
        negative_length = final_text_chunk_start(context.input_ids[:bov_position], self.ids.vision_end,
                                                 system_length)
        return text_pos, text_pos[:negative_length]

    @torch.no_grad()
    def draw(self, context, bov_position: int, system_length: int, cond_latents: list[Tensor],
             settings: "ResolvedGeneration", image_index: int, on_step: Callable[[int, int], None]) -> Tensor:
        """Sample the latent of the image whose <BOV> is at ``bov_position`` -> (C, h, w)."""
        text_pos, text_neg = self.condition(context, bov_position, system_length)
        generator = torch.Generator().manual_seed(settings.config.seed + NOISE_SEED_STRIDE * (image_index + 1))
        return draw_latent(
            self.model, cond_latents, text_pos, text_neg, size=settings.image_size, generator=generator,
            sampler=settings.sampler, guidance_scale=settings.guidance_for(bool(cond_latents)),
            callback=lambda i, n, t, x: on_step(i + 1, n),
        )  # (C, h, w); positive and negative in one packed DiT call per step

    # ------------------------------------------------------------------ the loop
    def stream(self, messages: Sequence[Message], config: GenerationConfig | None = None, **kwargs) -> Iterator[Event]:
        """Yield the events of ``run`` as they happen (the loop runs in a worker thread).

        Closing the generator early cancels the answer at its next event (at most one decode step
        or one denoising step later); an exception in the loop is re-raised here.
        """
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        done = object()

        def work() -> None:
            try:
                self.run(messages, config, emit=events.put, cancel=cancel, **kwargs)
            except BaseException as e:  # handed to the consumer, raised there
                events.put(_Failed(e))
            finally:
                events.put(done)

        worker = threading.Thread(target=work, name="duetgen-engine", daemon=True)
        worker.start()
        try:
            while (item := events.get()) is not done:
                if isinstance(item, _Failed):
                    if isinstance(item.error, Cancelled):
                        continue
                    raise item.error
                yield item
        finally:
            cancel.set()
            worker.join()

    def run(self, messages: Sequence[Message], config: GenerationConfig | None = None, *,
            emit: Callable[[Event], None] = lambda event: None,
            cancel: threading.Event | None = None,
            context: str = "kv_cache",
            logits_processor: Callable[[list[int], Tensor], Tensor] | None = None,
            image_source: Callable[[int], Image.Image | None] | None = None) -> Finished:
        """Generate the assistant answer to ``messages`` (image parts hold PIL images).

        ``emit`` receives every event as it happens (the last one is the returned ``Finished``);
        setting ``cancel`` stops the answer at the next event with ``Cancelled``.
        ``context``: "kv_cache" (the engine) or "recompute" (the re-prefill baseline).
        ``image_source(k)``: the k-th image of the answer comes from it instead of the DiT (stage-1
        samples put the truth's images there: an MLLM alone cannot draw); ``None`` from it ends the
        answer ("max_images"). With it, the DiT and the autoencoder are never called.
        """
        settings = (config or GenerationConfig()).resolve(self.model.config, self.model.pixel_multiple)
        config = settings.config
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {sorted(CONTEXTS)}; got {context!r}")

        def send(event: Event) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            emit(event)

        t_start = time.perf_counter()
        size = settings.image_size
        m = self.model
        if settings.framing == "cosmos":
            if image_source is not None or logits_processor is not None or context != "kv_cache":
                raise ValueError("the Cosmos framing writes no text: image_source, logits_processor and context "
                                 "do not apply")
            return self.run_cosmos(messages, settings, send, t_start)

        # 1. Render the prompt; earlier images become conditioning latents (encoded once)
        rendered = render_prompt(messages, m.tokenizer, m.image_processor, self.load_image)
        earlier = [self.load_image(p) for msg in messages for p in msg.content if isinstance(p, ImagePart)]
        cond_latents = [self.condition_latent(image) for image in earlier] if image_source is None else []
        room = max(m.config.max_images - len(earlier), 0)  # the DiT takes at most max_images frames
        max_images = room if config.max_images is None else min(config.max_images, room)

        # 2. Prefill once
        ctx = CONTEXTS[context](m.mllm)
        logits = ctx.prefill(rendered.input_ids, rendered.pixel_values, rendered.image_grid_thw)
        time_to_first_token = None
        generator = torch.Generator().manual_seed(config.seed)
        generated: list[int] = []  # sampled tokens of this answer (text and <BOV>)
        content: list = []
        text = _TextStream(m.tokenizer)
        n_images, dit_seconds, reason = 0, 0.0, "max_tokens"

        def close_text() -> None:
            segment, rest = text.flush()
            if rest:
                send(TextDelta(rest))
            if segment:
                content.append(TextPart(segment))

        # 3. Decode until end of turn or a limit
        while len(generated) < config.max_new_tokens:
            logits = logits.float().masked_fill(self.banned.to(logits.device), float("-inf"))
            if logits_processor is not None:
                logits = logits_processor(list(generated), logits)
            token = sample_token(logits, config.temperature, config.top_p, generator)
            if time_to_first_token is None:
                time_to_first_token = time.perf_counter() - t_start
            if token in self.eos_ids:
                reason = "end_of_turn"
                break
            if token != self.ids.bov:
                generated.append(token)
                delta = text.push(token)
                if delta:
                    send(TextDelta(delta))
                logits = ctx.append(torch.tensor([token]))
                continue
            supplied = image_source(n_images) if image_source is not None and n_images < max_images else None
            if n_images >= max_images or (image_source is not None and supplied is None):
                reason = "max_images"
                break
            generated.append(token)

            # 4. <BOV>: draw with the kept states of every token before it and every earlier image
            close_text()
            send(ImageStarted(n_images, *size))
            t_image = time.perf_counter()
            if supplied is not None:
                picture = to_rgb(supplied)
            else:
                latent = self.draw(ctx, len(ctx), rendered.system_length, cond_latents, settings, n_images,
                                   on_step=lambda s, n, k=n_images: send(DenoisingStep(k, s, n)))
                picture = m.decode_latents([latent])[0]  # RGB PIL
                cond_latents.append(m.encode_images([picture])[0])  # the uint8 picture, as a saved record gives it
            seconds = time.perf_counter() - t_image
            dit_seconds += seconds
            content.append(ImagePart(picture))
            send(ImageDone(n_images, picture, round(seconds, 4)))
            n_images += 1

            # 5. The image enters the context: <BOV> + vision block + pixels, one forward
            pixel_values, grid = m.image_processor.process_one(picture)
            n_tokens = grid[0] * grid[1] * grid[2] // m.image_processor.merge_size**2
            block = torch.tensor([self.ids.bov, *vision_block(self.ids, n_tokens)])
            logits = ctx.append(block, torch.from_numpy(pixel_values), torch.tensor([grid]))

        close_text()
        stats = {
            "finish_reason": reason,
            "new_tokens": len(generated),
            "images": n_images,
            "context_tokens": len(ctx),
            "time_to_first_token_s": round(time_to_first_token or 0.0, 4),
            "mllm_s": round(ctx.forward_seconds, 4),
            "dit_s": round(dit_seconds, 4),
            "total_s": round(time.perf_counter() - t_start, 4),
        }
        self.last_context = ctx  # for tests and benchmarks: positions, ids
        finished = Finished(reason, content, stats)
        send(finished)
        return finished


    def run_cosmos(self, messages: Sequence[Message], settings: ResolvedGeneration, send: Callable[[Event], None],
                   t_start: float) -> Finished:
        """The Cosmos framing (duetgen.models.cosmos_predict): one user message is a caption (and at most
        one image, the conditioning frame); one image is drawn, no text is written. A fresh assembly of
        real weights reproduces Cosmos-Predict2.5 this way (docs/model.md, "Real weights")."""
        if len(messages) != 1 or messages[0].role != "user":
            raise ValueError(f"the Cosmos framing takes one user message (a caption and at most one image); got "
                             f"{len(messages)} message(s) with roles {[msg.role for msg in messages]}")
        images = [self.load_image(p) for p in messages[0].content if isinstance(p, ImagePart)]
        if len(images) > 1:
            raise ValueError(f"the Cosmos framing takes at most one image (Cosmos' Image2World); got {len(images)}")
        caption = "".join(p.text for p in messages[0].content if isinstance(p, TextPart))
        send(ImageStarted(0, *settings.image_size))
        generator = torch.Generator().manual_seed(settings.config.seed + NOISE_SEED_STRIDE)  # image 0's, as in run
        latent = draw_cosmos(self.model, caption, images[0] if images else None, settings, generator=generator,
                             callback=lambda i, n, t, x: send(DenoisingStep(0, i + 1, n)))
        picture = self.model.decode_latents([latent])[0]
        seconds = time.perf_counter() - t_start
        send(ImageDone(0, picture, round(seconds, 4)))
        stats = {"finish_reason": "max_images", "new_tokens": 0, "images": 1, "context_tokens": 0,
                 "time_to_first_token_s": 0.0, "mllm_s": 0.0, "dit_s": round(seconds, 4),
                 "total_s": round(time.perf_counter() - t_start, 4), "framing": "cosmos"}
        finished = Finished("max_images", [ImagePart(picture)], stats)
        send(finished)
        return finished


@torch.no_grad()
def draw_cosmos(model, caption: str, image: Image.Image | None, settings: ResolvedGeneration,
                generator: torch.Generator | None = None, callback=None) -> Tensor:
    """One image's latent (C, h, w) drawn from ``caption`` with the Cosmos framing (duetgen.models.cosmos_predict).

    ``image``: an earlier image, the one clean conditioning frame (Image2World), resized to the output size
    (bilinear) as the Cosmos pipeline resizes its input; the DiT sees it at `condition_frame_time`.
    """
    from duetgen.models.cosmos_predict import cosmos_condition

    if not caption.strip():
        raise ValueError("the Cosmos framing needs a caption (the prompt text); got an empty one")
    height, width = settings.image_size
    cond = []
    if image is not None:
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        cond = model.encode_images([image])  # [(C, h, w)]
    text_pos, text_neg = cosmos_condition(model, caption)
    return draw_latent(model, cond, text_pos, text_neg, size=(height, width), generator=generator,
                       sampler=settings.sampler, guidance_scale=settings.guidance_for(bool(cond)), callback=callback)


class Cancelled(Exception):
    """The consumer stopped listening (closed the stream or set ``cancel``)."""


@dataclass
class _Failed:
    error: BaseException
