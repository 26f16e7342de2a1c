"""Running the engine on a stored conversation's truth: its prompt, a teacher-forced draw, an answer with
the truth's images.

Every sample a training stage shows and every ShapeWorld evaluation answer comes from
`duetgen.infer.pipeline.DuetGenPipeline`, the object behind `duetgen generate` and `duetgen serve`; these
helpers only choose what it is given and which hook steers it:
- `truth_prompt`: the user turns of a stored record, images loaded (ShapeWorld evaluation, stage 1).
- `draw_teacher_forced` + `teacher_forced_context`: stage 2's samples. The truth conversation up to one
  answer image (its text and earlier images) is given as an assistant turn being continued; the engine is
  made to emit `<BOV>` at once (a logits hook), so the DiT draws that image from the truth context.
- `greedy_answer_with_truth_images`: stage 1's samples. The MLLM writes; after each `<BOV>` the truth's
  image enters the context (the engine's `image_source` hook): an MLLM alone cannot draw.
"""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.infer.engine import Finished, GenerationConfig


def truth_prompt(truth, rec: Record) -> list[Message]:
    """The user turns of a stored record, images loaded (through the dataset: its root is enforced)."""
    return [Message(m.role, [p if isinstance(p, TextPart) else ImagePart(truth.open_image(p.path, rec.id))
                             for p in m.content]) for m in rec.messages if m.role != "assistant"]


def force_bov_first(bov_id: int):
    """A logits hook that makes the first sampled token ``<BOV>`` (a teacher-forced draw)."""

    def hook(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if generated:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[..., bov_id] = 0.0
        return forced

    return hook


def draw_teacher_forced(pipe, messages: list[Message], config: GenerationConfig) -> Image.Image:
    """The image the model draws right after ``messages`` (the last one an assistant turn being continued,
    or a user turn): the engine's own draw, with ``<BOV>`` forced as the next token."""
    config = dataclasses.replace(config, max_new_tokens=1, max_images=1)
    finished: Finished = pipe.engine.run(pipe.messages(messages), config,
                                         logits_processor=force_bov_first(pipe.engine.ids.bov))
    images = [p.image for p in finished.content if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise RuntimeError(f"teacher-forced draw made {len(images)} images ({finished.reason})")
    return images[0]


def teacher_forced_context(ds, rec: Record, image_index: int) -> tuple[list[Message], Image.Image]:
    """(the conversation right before assistant image ``image_index`` (0-based among the answer's images),
    the truth image)."""
    messages: list[Message] = []
    seen = 0
    for m in rec.messages:
        loaded = [p if isinstance(p, TextPart) else ImagePart(ds.open_image(p.path, rec.id)) for p in m.content]
        if m.role != "assistant":
            messages.append(Message(m.role, loaded))
            continue
        parts = []
        for p in loaded:
            if isinstance(p, ImagePart):
                if seen == image_index:  # the answer so far becomes an assistant turn being continued
                    if parts:
                        messages.append(Message("assistant", parts))
                    return messages, p.image
                seen += 1
            parts.append(p)
        messages.append(Message("assistant", parts))
    raise ValueError(f"record {rec.id!r} has no assistant image {image_index}")


def greedy_answer_with_truth_images(pipe, prompt: list[Message], truth_images: list[Image.Image],
                                    max_new_tokens: int) -> Message:
    """Greedy answer of the MLLM; the k-th ``<BOV>`` is followed by the truth's k-th image (none left: stop)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, max_images=len(truth_images), temperature=0.0)
    finished = pipe.engine.run(pipe.messages(prompt), config,
                               image_source=lambda k: truth_images[k] if k < len(truth_images) else None)
    return Message("assistant", list(finished.content) or [TextPart("")])
