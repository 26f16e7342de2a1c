"""The MLLM side of DuetGen: Qwen2.5-VL, ``<BOV>``, record rendering and the DiT text condition.

The model is transformers' own ``Qwen2_5_VLForConditionalGeneration`` (DESIGN section 5); this
file holds what DuetGen adds around it, readable top to bottom:

1. tiny / toy configs of the real class (tests; ShapeWorld on 2 CPU cores),
2. ``add_bov``: the one new token, embeddings resized when needed,
3. ``render_record`` / ``render_prompt``: a record -> token ids, loss labels, pixels, image slots,
4. ``model_inputs``: a rendered sequence -> the model's kwargs, with 3D mrope positions,
5. ``all_layer_states`` / ``condition_hidden_states``: the DiT's text condition.

Design choices:
- Chat layout is Qwen2.5-VL's (``<|im_start|>role\\n ... <|im_end|>\\n``; the default system
  prompt is inserted when a chat has none, as Qwen's template does). A user image is
  ``<|vision_start|><|image_pad|>*n<|vision_end|>``; an assistant image is the same preceded by
  ``<BOV>`` (DESIGN section 4). ``n`` = merged patch count of that image.
- Loss (``labels != -100``) on exactly: assistant text, each ``<BOV>``, and each assistant turn's
  closing ``<|im_end|>`` (paper section 4: "<BOV> in the assistant turn is included in the loss").
  Never on system/user tokens, role headers, the ``\\n`` after ``<|im_end|>``, or any vision token
  (``<|vision_start|>``, pads, ``<|vision_end|>``): at inference those are written by the engine,
  not predicted.
- The role header (``role\\n``) and each run of text are tokenised separately, at the same
  boundaries the inference engine sees (it decodes right after ``assistant\\n``). Record text is
  tokenised with ``split_special_tokens=True``: a literal ``<BOV>`` or ``<|image_pad|>`` in web
  text stays text and can never fake an image slot.
- Positions: Qwen2.5-VL's 3D mrope from the model's own ``get_rope_index`` (text advances by 1;
  an image's tokens get (t, h, w) from its own grid), passed explicitly as ``position_ids``
  (transformers 5.x only computes them itself when given ``mm_token_type_ids``).
- Text condition (DESIGN section 4, paper section 4.1 "concatenate the hidden states from all
  decoder layers"): ``outputs.hidden_states[1:]`` — one entry per decoder layer, the embedding
  output ``hidden_states[0]`` excluded — each normalised per token as ``(h - mean) / (std + 1e-8)``
  over channels (unbiased std, no affine), concatenated on channels: n_layers * D
  (28 * 3584 = 100,352 for Qwen2.5-VL-7B). The recipe is, operation for operation, the one diffusers'
  ``Cosmos2_5_PredictBasePipeline._get_prompt_embeds`` applies before ``crossattn_proj``, so the
  pretrained projection can initialise the connector; the input is not the same: Cosmos encodes one
  caption with Cosmos-Reason1-7B in its own framing, padded to 512 tokens without a mask
  (``duetgen.models.cosmos_predict``), we encode the conversation before ``<BOV>``. Measured on transformers 5.23: ``hidden_states[-1]`` is
  the last layer AFTER the final RMSNorm (``capture_outputs`` ties it to ``last_hidden_state``),
  the other entries are raw layer outputs; we keep that, because Cosmos' recipe does the same.
- The condition for the image whose ``<BOV>`` sits at position ``b`` is the states of tokens
  ``[0, b)``. The model is causal, so one forward over the whole sequence gives every image's
  condition (and the guidance negative) by slicing; ``condition_hidden_states`` runs the prefix
  alone and is the reference the sliced form is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart, validate
from duetgen.models.image_processor import ImageProcessor
from duetgen.models.tokenizer import BOV, CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, OFFLINE_TOKEN_IDS

IGNORE_INDEX = -100  # labels value the HF causal-LM loss skips
NORM_EPS = 1e-8  # diffusers' Cosmos2.5 pipeline adds this to the per-token std


# ============================================================================ 1. configs
def tiny_qwen2_5_vl_config(vocab_size: int, token_ids: dict[str, int] | None = None):
    """A Qwen2.5-VL of ~0.16M parameters for unit tests: 2 text layers of width 64, 2 vision blocks.

    Vision: patch 4, merge 2, so an image costs one token per 8x8 pixels (use ``tiny_image_processor``).
    ``token_ids`` maps special-token strings to ids; default: the offline tokenizer's fixed ids.
    """
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,  # head_dim 32
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},  # sums to head_dim/2
            **_text_token_ids(token_ids),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,  # 16 // merge 2 // patch 4 = windows of 2x2 tokens, so window attention is exercised
            fullatt_block_indexes=[1],
            out_hidden_size=64,  # = text hidden size
        ),
        tie_word_embeddings=False,
        **_vision_token_ids(token_ids),
    )


def toy_qwen2_5_vl_config(vocab_size: int, token_ids: dict[str, int] | None = None):
    """The ShapeWorld MLLM (~4.1M parameters): 4 text layers of width 256, 2 vision blocks of width 128.

    Vision: patch 8, merge 2; ``toy_image_processor`` shows a canvas at 48x48, i.e. 3x3 = 9 LLM tokens:
    the calibration note (shared/notes) found steps/second, i.e. few tokens and few layers, is what
    bounds progress on 2 CPU cores.
    """
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,  # head_dim 64
            num_key_value_heads=2,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},  # Qwen's [16,24,24] halved
            **_text_token_ids(token_ids),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=128,
            intermediate_size=256,
            num_heads=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=64,  # one window = a whole 64x64 canvas
            fullatt_block_indexes=[1],
            out_hidden_size=256,
        ),
        tie_word_embeddings=False,
        **_vision_token_ids(token_ids),
    )


def tiny_image_processor() -> ImageProcessor:
    """Processor matching ``tiny_qwen2_5_vl_config``: 8-pixel tokens, sides up to 48 pixels."""
    return ImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=48 * 48, max_side=48)


TOY_MLLM_SIDE = 48  # a 64x64 ShapeWorld canvas is shown to the toy MLLM at 48x48: 3x3 tokens, one per grid cell


def toy_image_processor() -> ImageProcessor:
    """Processor matching ``toy_qwen2_5_vl_config``: a 64x64 canvas becomes 48x48, i.e. 3x3 = 9 LLM tokens.

    Two choices made the toy MLLM learn to read canvases (docs/training.md, "reading canvases"):
    - 48 pixels: each merged 16x16 token then covers exactly one cell of the 3x3 grid (cell centres
      12/32/52 -> 9/24/39, shapes +-5.25), so a token is one object or empty, in reading order.
    - white as the normalisation mean (std 0.5): an empty cell is an all-zero patch, and the bias-free
      patch embedding keeps it zero, so only objects carry signal into the language model. With the
      CLIP mean/std every token shared a large background component and a from-scratch model did not
      learn to read them (understanding-only probe, token accuracy after 400 steps: 0.68 -> 0.985).
    """
    side = TOY_MLLM_SIDE
    return ImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=side * side,
                          max_side=side, image_mean=(1.0, 1.0, 1.0), image_std=(0.5, 0.5, 0.5))


def _text_token_ids(token_ids: dict[str, int] | None) -> dict:
    t = OFFLINE_TOKEN_IDS if token_ids is None else token_ids
    return dict(bos_token_id=None, eos_token_id=t["<|im_end|>"], pad_token_id=t["<|endoftext|>"])


def _vision_token_ids(token_ids: dict[str, int] | None) -> dict:
    t = OFFLINE_TOKEN_IDS if token_ids is None else token_ids
    return dict(
        image_token_id=t["<|image_pad|>"],
        video_token_id=t["<|video_pad|>"],
        vision_start_token_id=t["<|vision_start|>"],
        vision_end_token_id=t["<|vision_end|>"],
    )


# ============================================================================ 2. tokens
@dataclass(frozen=True)
class TokenIds:
    """The special-token ids rendering needs, looked up once from a tokenizer."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    bov: int
    newline: tuple[int, ...]  # tokens of "\n" (the separator after <|im_end|>)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenIds":
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>") if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks Qwen special token(s) {missing}; it is not a Qwen2.5-VL-style tokenizer")
        if BOV not in vocab:
            raise ValueError(f"tokenizer has no {BOV} token; call duetgen.models.mllm.add_bov(tokenizer, model) first")
        return cls(
            im_start=vocab["<|im_start|>"],
            im_end=vocab["<|im_end|>"],
            vision_start=vocab["<|vision_start|>"],
            vision_end=vocab["<|vision_end|>"],
            image_pad=vocab["<|image_pad|>"],
            bov=vocab[BOV],
            newline=tuple(_encode_text(tokenizer, "\n")),
        )


def add_bov(tokenizer, model) -> int:
    """Add ``<BOV>`` to the tokenizer if missing, make sure the model has a row for it; return its id.

    Real Qwen2.5-VL checkpoints have spare embedding rows (152,064 rows for 151,665 tokens), so
    usually nothing is resized; when the id is past the last row, input embeddings and lm_head grow
    to ``len(tokenizer)``. Either way the ``<BOV>`` rows of the input embedding and of lm_head are
    set to the mean of the tokenizer's other rows (an untrained spare row would make the first
    ``<BOV>`` logits arbitrary), and the chat template becomes ours (Qwen's layout plus ``<BOV>``).
    Only done when the token is new: calling again changes nothing.
    """
    check_compatible(model.config, tokenizer, need_bov=False)
    if BOV in tokenizer.get_vocab():
        bov_id = tokenizer.convert_tokens_to_ids(BOV)
        if bov_id >= model.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"tokenizer has {BOV} (id {bov_id}) but the model has only "
                             f"{model.get_input_embeddings().weight.shape[0]} embedding rows")
        return bov_id
    tokenizer.add_special_tokens({"extra_special_tokens": [BOV]})  # transformers 5.x name
    tokenizer.chat_template = CHAT_TEMPLATE  # Qwen2.5-VL's layout + <BOV> before assistant images
    bov_id = tokenizer.convert_tokens_to_ids(BOV)
    if bov_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
    with torch.no_grad():
        for weight in _bov_rows(model):
            weight[bov_id] = weight[:bov_id].mean(0, dtype=torch.float32).to(weight.dtype)
    return bov_id


def _bov_rows(model) -> list[Tensor]:
    rows = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != rows[0].data_ptr():  # untied lm_head
        rows.append(head.weight)
    return rows


def check_compatible(config, tokenizer, need_bov: bool = True) -> None:
    """Raise if the model config's special-token ids disagree with the tokenizer's."""
    vocab = tokenizer.get_vocab()
    pairs = {
        "image_token_id": "<|image_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    for attr, token in pairs.items():
        if token not in vocab:
            raise ValueError(f"tokenizer lacks {token}, which the model config uses as {attr}")
        if getattr(config, attr) != vocab[token]:
            raise ValueError(f"model config {attr}={getattr(config, attr)} but the tokenizer's {token} is {vocab[token]}")
    rows = config.text_config.vocab_size
    if need_bov and BOV not in vocab:
        raise ValueError(f"tokenizer has no {BOV}; call add_bov(tokenizer, model)")
    if len(tokenizer) > rows:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows")


# ============================================================================ 3. rendering
@dataclass(frozen=True)
class ImageSlot:
    """Where one image sits in a rendered sequence."""

    index: int  # order among the sequence's images = row of image_grid_thw
    start: int  # position of the first <|image_pad|> (<|vision_start|> is at start - 1)
    end: int  # one past the last <|image_pad|> (<|vision_end|> is at end)
    generated: bool  # assistant image: a generation target
    bov_position: int | None  # position of its <BOV> (= start - 2) for assistant images, else None
    grid_thw: tuple[int, int, int]  # patch grid before merging
    patch_rows: tuple[int, int]  # rows [a, b) of pixel_values holding its patches
    message_index: int  # where it came from in the record
    part_index: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class RenderedSequence:
    input_ids: Tensor  # (L,) int64
    labels: Tensor  # (L,) int64, IGNORE_INDEX where no loss
    pixel_values: Tensor | None  # (N_patches, C*T*P*P) float32, all images in order; None if no image
    image_grid_thw: Tensor | None  # (n_images, 3) int64
    images: list[ImageSlot] = field(default_factory=list)
    record_id: str = ""
    system_length: int = 0  # tokens of the leading system turn, "<|im_end|>\n" included; 0 if none

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def bov_positions(self) -> list[int]:
        """Positions of every <BOV>, in order (one per generated image)."""
        return [s.bov_position for s in self.images if s.generated]

    def prefix(self, length: int) -> "RenderedSequence":
        """The first ``length`` tokens with the images that lie wholly inside them."""
        if not 0 < length <= len(self):
            raise ValueError(f"prefix length {length} outside 1..{len(self)} of record {self.record_id!r}")
        cut = [s for s in self.images if s.start - 1 < length <= s.end]  # <|vision_start|> .. <|vision_end|>
        if cut:
            raise ValueError(f"prefix length {length} cuts image {cut[0].index} (tokens {cut[0].start}..{cut[0].end}) "
                             f"of record {self.record_id!r}")
        kept = [s for s in self.images if s.end < length]
        rows = kept[-1].patch_rows[1] if kept else 0
        return RenderedSequence(
            input_ids=self.input_ids[:length],
            labels=self.labels[:length],
            pixel_values=self.pixel_values[:rows] if kept else None,
            image_grid_thw=self.image_grid_thw[: len(kept)] if kept else None,
            images=kept,
            record_id=self.record_id,
            system_length=min(self.system_length, length),
        )


def default_load_image(part: ImagePart) -> Image.Image:
    """Accepts only in-memory images; stored paths need the dataset's loader (it enforces the root)."""
    if isinstance(part.image, Image.Image):
        return part.image
    raise RecordError(f"image {part.image!r} is not an in-memory PIL image; pass load_image= to read stored images")


def render_record(
    record: Record,
    tokenizer,
    image_processor: ImageProcessor,
    load_image: Callable[[ImagePart], Image.Image] = default_load_image,
    *,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    max_tokens: int | None = None,
) -> RenderedSequence:
    """A whole conversation -> token ids, stage-1 labels, pixels and image slots (training form).

    ``system_prompt`` is inserted when the record has no system turn (Qwen's default; ``None``
    inserts nothing). ``max_tokens`` caps the length: longer records raise RecordError before
    every image is loaded.
    """
    validate(record)
    return _render(record.messages, tokenizer, image_processor, load_image, record.id,
                   open_assistant=False, system_prompt=system_prompt, max_tokens=max_tokens)


def render_prompt(
    messages: Sequence[Message],
    tokenizer,
    image_processor: ImageProcessor,
    load_image: Callable[[ImagePart], Image.Image] = default_load_image,
    *,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    max_tokens: int | None = None,
    record_id: str = "prompt",
) -> RenderedSequence:
    """The conversation so far, ending in an open assistant turn (inference form).

    If the last message is from the assistant (an answer being continued), it is left open: no
    closing ``<|im_end|>``. Otherwise ``<|im_start|>assistant\\n`` is appended. The model's next
    token is the first one of the answer.
    """
    if not messages:
        raise RecordError(f"record {record_id!r}: no messages to render a prompt from")
    validate(Record(id=record_id, messages=list(messages)))
    return _render(list(messages), tokenizer, image_processor, load_image, record_id,
                   open_assistant=True, system_prompt=system_prompt, max_tokens=max_tokens)


def vision_block(ids: TokenIds, num_tokens: int) -> list[int]:
    """``<|vision_start|><|image_pad|>*n<|vision_end|>``: what the engine appends after a ``<BOV>``."""
    return [ids.vision_start] + [ids.image_pad] * num_tokens + [ids.vision_end]


def _encode_text(tokenizer, text: str) -> list[int]:
    # split_special_tokens: "<BOV>" typed in a record stays text (see module docstring).
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def _render(messages, tokenizer, image_processor, load_image, record_id, *, open_assistant, system_prompt, max_tokens):
    ids = TokenIds.from_tokenizer(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    slots: list[ImageSlot] = []
    patches: list = []
    patch_row = 0
    system_length = 0

    def emit(tokens: Sequence[int], loss: bool) -> None:
        input_ids.extend(tokens)
        labels.extend(tokens if loss else [IGNORE_INDEX] * len(tokens))
        if max_tokens is not None and len(input_ids) > max_tokens:
            raise RecordError(f"record {record_id!r}: longer than max_tokens={max_tokens}")

    if messages[0].role != "system" and system_prompt is not None:
        emit([ids.im_start] + _encode_text(tokenizer, "system\n") + _encode_text(tokenizer, system_prompt), loss=False)
        emit([ids.im_end, *ids.newline], loss=False)
        system_length = len(input_ids)

    for mi, message in enumerate(messages):
        assistant = message.role == "assistant"
        emit([ids.im_start] + _encode_text(tokenizer, f"{message.role}\n"), loss=False)
        pending_text: list[str] = []  # adjacent text parts are tokenised as one run

        def flush_text() -> None:
            text = "".join(pending_text)
            pending_text.clear()
            if text:
                emit(_encode_text(tokenizer, text), loss=assistant)

        for pi, part in enumerate(message.content):
            if isinstance(part, TextPart):
                pending_text.append(part.text)
                continue
            flush_text()
            image = load_image(part)
            if not isinstance(image, Image.Image):
                raise RecordError(f"record {record_id!r}: messages[{mi}].content[{pi}]: load_image returned "
                                  f"{type(image).__name__}, expected a PIL image")
            try:
                image_patches, grid = image_processor.process_one(image)
            except ValueError as e:
                raise RecordError(f"record {record_id!r}: messages[{mi}].content[{pi}]: {e}") from e
            n = grid[0] * grid[1] * grid[2] // image_processor.merge_size**2
            bov_position = None
            if assistant:
                bov_position = len(input_ids)
                emit([ids.bov], loss=True)  # the model learns WHEN to draw (paper section 4)
            start = len(input_ids) + 1
            emit(vision_block(ids, n), loss=False)  # written by the engine, never predicted
            slots.append(ImageSlot(
                index=len(slots), start=start, end=start + n, generated=assistant, bov_position=bov_position,
                grid_thw=grid, patch_rows=(patch_row, patch_row + image_patches.shape[0]),
                message_index=mi, part_index=pi,
            ))
            patches.append(image_patches)
            patch_row += image_patches.shape[0]
        flush_text()

        if open_assistant and assistant and mi == len(messages) - 1:
            break  # the answer being continued stays open
        emit([ids.im_end], loss=assistant)  # the model learns when its turn ends
        emit(ids.newline, loss=False)
        if mi == 0 and message.role == "system":
            system_length = len(input_ids)
    else:
        if open_assistant:
            emit([ids.im_start] + _encode_text(tokenizer, "assistant\n"), loss=False)

    if patches:
        pixel_values = torch.from_numpy(np.concatenate(patches, axis=0))
        image_grid_thw = torch.tensor([s.grid_thw for s in slots], dtype=torch.long)
    else:
        pixel_values = image_grid_thw = None
    return RenderedSequence(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        images=slots,
        record_id=record_id,
        system_length=system_length,
    )


def final_text_chunk_start(token_ids: Sequence[int], vision_end_id: int, system_length: int) -> int:
    """Length of the guidance negative of a ``<BOV>`` whose condition is ``token_ids`` (every token before it).

    Paper section 4: the negative keeps the visual conditions and removes the final text chunk. The
    context reads T_1, I_1, T_2, I_2, ..., T_N; the final chunk T_N is every token after the last image's
    ``<|vision_end|>`` (``vision_end_id``), so the negative is the prefix up to and including it. With no
    earlier image it is the leading system turn (``system_length`` tokens, the analogue of Cosmos encoding
    an empty prompt in its chat frame), or the first token when there is none: never empty, since
    cross-attention over zero tokens is undefined. A ``<BOV>`` right after an image gives
    ``len(token_ids)``: negative == positive, guidance is a no-op. The one rule for the engine and stage 2.
    """
    ids = list(token_ids)
    if not ids:
        raise ValueError("a <BOV> at position 0 has no condition tokens (the negative may not be empty)")
    last = max((i for i, token in enumerate(ids) if token == vision_end_id), default=-1)
    return max(last + 1, min(system_length, len(ids)), 1)


def negative_prefix_length(rendered: RenderedSequence, bov_position: int) -> int:
    """`final_text_chunk_start` of the ``<BOV>`` at ``bov_position`` of a rendered record (stage 2)."""
    _check_bov(rendered, bov_position)
    vision_end_id = int(rendered.input_ids[rendered.images[0].end]) if rendered.images else -1
    return final_text_chunk_start(rendered.input_ids[:bov_position].tolist(), vision_end_id, rendered.system_length)


def _check_bov(rendered: RenderedSequence, bov_position: int) -> None:
    if bov_position not in rendered.bov_positions:
        raise ValueError(f"position {bov_position} is not a <BOV> of record {rendered.record_id!r} "
                         f"(its <BOV>s are at {rendered.bov_positions})")


# ============================================================================ 4. model inputs
def rope_position_ids(model, input_ids: Tensor, image_grid_thw: Tensor | None) -> Tensor:
    """3D mrope positions (3, L) of one sequence, from the model's own ``get_rope_index``."""
    if image_grid_thw is None:  # text only: t = h = w = the 1D position
        return torch.arange(input_ids.shape[0], device=input_ids.device).expand(3, -1)
    mm_token_type_ids = (input_ids == model.config.image_token_id).int()  # 1 = image token, 0 = text
    position_ids, _ = model.model.get_rope_index(
        input_ids[None], mm_token_type_ids=mm_token_type_ids[None], image_grid_thw=image_grid_thw
    )  # (3, 1, L)
    return position_ids[:, 0]


def model_inputs(model, rendered: RenderedSequence, with_labels: bool = True) -> dict[str, Tensor]:
    """Keyword arguments for ``model(**inputs)`` (batch of one) on the model's device."""
    device = model.device
    input_ids = rendered.input_ids.to(device)
    grid = rendered.image_grid_thw.to(device) if rendered.image_grid_thw is not None else None
    inputs = {
        "input_ids": input_ids[None],  # (1, L)
        "position_ids": rope_position_ids(model, input_ids, grid)[:, None],  # (3, 1, L)
    }
    if rendered.pixel_values is not None:
        inputs["pixel_values"] = rendered.pixel_values.to(device)  # (N_patches, C*T*P*P)
        inputs["image_grid_thw"] = grid  # (n_images, 3)
    if with_labels:
        inputs["labels"] = rendered.labels.to(device)[None]  # (1, L)
    return inputs


# ============================================================================ 5. text condition
def normalize_per_token(h: Tensor, eps: float = NORM_EPS) -> Tensor:
    """(..., D) -> (..., D): each token standardised over channels, no affine (diffusers' Cosmos2.5)."""
    x = h.float()
    return ((x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + eps)).to(h.dtype)


def layer_states(hidden_states: Sequence[Tensor]) -> Tensor:
    """``outputs.hidden_states`` (n_layers + 1 of (B, L, D)) -> (B, L, n_layers * D), normalised per layer.

    Entry 0 (the embedding output) is dropped: the condition is the decoder layers' outputs.
    """
    if len(hidden_states) < 2:
        raise ValueError(f"expected embedding + layer hidden states, got {len(hidden_states)} tensor(s)")
    return torch.cat([normalize_per_token(h) for h in hidden_states[1:]], dim=-1)


def all_layer_states(model, rendered: RenderedSequence) -> Tensor:
    """(L, n_layers * D): the normalised all-layer states of every token of the sequence, one forward.

    Slice ``[:bov_position]`` for an image's condition (equal to ``condition_hidden_states``: the
    model is causal). Gradients flow if enabled; stage 2 calls it under ``torch.no_grad()``.
    """
    inputs = model_inputs(model, rendered, with_labels=False)
    outputs = model.model(**inputs, output_hidden_states=True, use_cache=False)  # no lm_head: logits unused
    return layer_states(outputs.hidden_states)[0]  # (L, n_layers * D)


def condition_hidden_states(model, rendered: RenderedSequence, bov_position: int) -> Tensor:
    """(bov_position, n_layers * D): the DiT text condition for the image whose ``<BOV>`` is at ``bov_position``.

    Runs the model on the tokens before the ``<BOV>`` (and the images among them) only.
    """
    _check_bov(rendered, bov_position)
    return all_layer_states(model, rendered.prefix(bov_position))
