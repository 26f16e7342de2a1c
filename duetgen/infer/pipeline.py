"""The Python API of interleaved generation: a model directory in, records out.

    from duetgen.infer.pipeline import DuetGenPipeline
    pipe = DuetGenPipeline.from_pretrained("checkpoints/shapeworld-toy")
    record = pipe("How do I arrange a red circle at the top left and a blue square in the center?")
    record = pipe([Message("user", [TextPart("Here is my canvas. ..."), ImagePart(canvas)])], seed=3)
    for event in pipe.stream("Draw a purple square at the bottom."):
        ...   # TextDelta, ImageStarted, DenoisingStep, ImageDone, Finished (its .record is the answer)

Design choices:
- A call returns one ``Record`` (DESIGN section 3): the conversation given plus the assistant turn
  (text parts and in-memory PIL image parts, in order). ``duetgen.infer.render.save_output``
  stores it as a one-record dataset with an HTML page. ``meta`` says how it was made (model,
  settings, seed, finish reason, timings), so an output can be reproduced and audited.
- The loop itself is ``duetgen.infer.engine``; this file only turns prompts into messages, checks
  input, and turns the final event into a record.
- Input checks before any model work (a clear ``ValueError`` naming the input): an empty prompt, a
  prompt over ``max_prompt_chars``, an image that is not a PIL image or a readable file under the
  pixel cap. Image paths are read only here, in the trusted local API; the server hands over
  already-decoded images and never a path.
- Settings can be given as a ``GenerationConfig`` or as keyword overrides (``pipe(p, seed=3,
  num_steps=10)``); unknown keywords are an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from duetgen.data.images import DEFAULT_MAX_PIXELS, inspect_image
from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart, validate
from duetgen.infer.engine import Event, Finished, GenerationConfig, InterleavedEngine

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "shapeworld-toy"  # shipped ShapeWorld model
MAX_PROMPT_CHARS = 20_000  # a ShapeWorld prompt is < 200 characters; a real chat prompt rarely needs more
SOURCE = "duetgen"  # Record.source of generated answers

PromptLike = str | Sequence[Message]


class DuetGenPipeline:
    """Generate interleaved answers with a ``DuetGen`` model (one answer at a time)."""

    def __init__(self, model, model_id: str = "custom", max_prompt_chars: int = MAX_PROMPT_CHARS,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS):
        self.model = model.eval()
        self.engine = InterleavedEngine(model)
        self.model_id = model_id  # recorded in every output's meta
        self.max_prompt_chars = max_prompt_chars
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str = "cpu", dtype=None,
                        expect: str | None = None, **kwargs) -> "DuetGenPipeline":
        """Load a DuetGen directory (``DuetGen.save_pretrained``). Errors name the directory and the problem."""
        from duetgen.models.builder import load
        from duetgen.models.duetgen import ModelDirectoryError

        root = Path(path)
        if not root.exists():
            raise ModelDirectoryError(f"{root}: no such model directory")
        model = load(root, device=device, dtype=dtype, expect=expect)
        return cls(model, model_id=str(root), **kwargs)

    # ------------------------------------------------------------------ input
    def messages(self, prompt: PromptLike, images: Sequence = ()) -> list[Message]:
        """A prompt string (+ images) or a message list -> checked messages whose images are PIL images."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            # images first, then the text: Qwen2.5-VL's usual layout and ShapeWorld's (a canvas, then the request)
            messages = [Message("user", [*(ImagePart(im) for im in images), TextPart(prompt)])]
        else:
            if images:
                raise ValueError("pass images inside the messages when giving a message list")
            messages = [Message(m.role, list(m.content)) for m in prompt]  # the caller's list is left as it is
        if not messages:
            raise ValueError("no messages")
        chars = sum(len(p.text) for m in messages for p in m.content if isinstance(p, TextPart))
        if chars > self.max_prompt_chars:
            raise ValueError(f"prompt is {chars:,} characters, over the cap of {self.max_prompt_chars:,}")
        if messages[-1].role == "user" and not any(
                isinstance(p, TextPart) and p.text.strip() or isinstance(p, ImagePart) for p in messages[-1].content):
            raise ValueError("the last user message is empty")
        for mi, m in enumerate(messages):
            for pi, part in enumerate(m.content):
                if isinstance(part, ImagePart):
                    m.content[pi] = ImagePart(self._load(part.image, f"messages[{mi}].content[{pi}]"))
        validate(Record(id="prompt", messages=messages))
        return messages

    def _load(self, image, where: str) -> Image.Image:
        if isinstance(image, Image.Image):
            w, h = image.size
            if w * h > self.max_image_pixels:
                raise ValueError(f"{where}: image is {w}x{h}, over the cap of {self.max_image_pixels:,} pixels")
            return image
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise ValueError(f"{where}: image file {str(path)!r} not found")
            try:
                with open(path, "rb") as f:
                    return inspect_image(f, f"{where}: {path}", self.max_image_pixels)
            except RecordError as e:
                raise ValueError(str(e)) from None
        raise ValueError(f"{where}: expected a PIL image or an image file path; got {type(image).__name__}")

    def config(self, config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
        config = config or GenerationConfig()
        known = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown generation setting(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(config, **overrides) if overrides else config  # a new config checks itself

    # ------------------------------------------------------------------ generation
    def stream(self, prompt: PromptLike, config: GenerationConfig | None = None, *, images: Sequence = (),
               record_id: str | None = None, **overrides) -> Iterator[Event]:
        """Yield events as they happen; the last is ``Finished`` with ``.record`` set."""
        messages = self.messages(prompt, images)
        config = self.config(config, overrides)
        for event in self.engine.stream(messages, config):
            if isinstance(event, Finished):
                event.record = self.record(messages, event, config, record_id)
            yield event

    def __call__(self, prompt: PromptLike, config: GenerationConfig | None = None, *, images: Sequence = (),
                 record_id: str | None = None, **overrides) -> Record:
        """Generate one answer synchronously; returns the conversation with the answer as a ``Record``."""
        messages = self.messages(prompt, images)
        config = self.config(config, overrides)
        finished = self.engine.run(messages, config)
        return self.record(messages, finished, config, record_id)

    def record(self, messages: list[Message], finished: Finished, config: GenerationConfig,
               record_id: str | None) -> Record:
        if messages[-1].role == "assistant":  # an answer being continued: the new parts extend it
            messages = [*messages[:-1], Message("assistant", [*messages[-1].content, *finished.content])]
        else:
            messages = [*messages, Message("assistant", list(finished.content))]
        if record_id is None:
            first_text = next((p.text for m in messages for p in m.content if isinstance(p, TextPart)), "")
            digest = hashlib.sha256(f"{first_text}\x00{config.seed}".encode()).hexdigest()[:12]
            record_id = f"gen-{digest}"
        meta = {
            "model": self.model_id,
            "preset": self.model.config.preset,
            "generation": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
            "finish_reason": finished.reason,
            "stats": finished.stats,
        }
        record = Record(id=record_id, messages=messages, source=SOURCE, meta=meta)
        validate(record)
        return record
