"""Offline tokenizer builder: a Qwen-style byte-level BPE trained with `tokenizers` (DESIGN section 8).

Nothing may be downloaded at run time, so tests and the ShapeWorld toy model get a tokenizer
trained here from a small corpus; real runs load Qwen2.5-VL's own tokenizer from a local
directory and only gain ``<BOV>`` (see ``duetgen.models.mllm.add_bov``).

Design choices:
- Same pipeline as ``transformers.Qwen2Tokenizer``: NFC normaliser, Qwen's pre-tokenise regex
  (``PRETOKENIZE_REGEX``) then byte-level, byte-level decoder. Byte-level means any text
  round-trips, even words the corpus never contained.
- Special tokens get fixed ids 0..7 in ``SPECIAL_TOKENS`` order (the trainer puts them first).
  Tiny/toy model configs use these ids (``OFFLINE_TOKEN_IDS``) for ``image_token_id`` etc.
- Saved as a ``Qwen2Tokenizer`` (transformers 5.x: ``extra_special_tokens`` replaces
  ``additional_special_tokens``), ``eos_token = <|im_end|>`` (end of an assistant turn, where
  generation stops, as in Qwen2.5-VL-Instruct), ``pad_token = <|endoftext|>``.
- The chat template is Qwen2.5-VL's, plus one rule: an image in an assistant turn is preceded by
  ``<BOV>`` (DESIGN section 4). Like Qwen's, it writes ONE ``<|image_pad|>`` per image; the
  renderer (``duetgen.models.mllm.render_record``) expands it to the image's token count.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

BOV = "<BOV>"

# Order fixes the ids of the offline tokenizer: <|endoftext|> = 0 ... <BOV> = 7.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    BOV,
)
OFFLINE_TOKEN_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2.5-VL's default, inserted when a chat has none

# Qwen2.5-VL-Instruct's template with <BOV> before assistant images. Kept on one logical line per
# block so that the only newlines emitted are the ones after the role and after <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{% if message['role'] == 'assistant' %}" + BOV + "{% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX, copied so the builder does not
# depend on a private module path.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

MAX_CORPUS_CHARS = 200_000_000  # a builder for small offline vocabularies; refuse to read more


def build_tokenizer(out_dir: str | os.PathLike, corpus: Iterable[str], vocab_size: int = 512, include_bov: bool = True):
    """Train a byte-level BPE on ``corpus`` and save a Qwen2Tokenizer to ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` then loads it offline. ``vocab_size`` counts the
    256 byte symbols and the special tokens, so it must be at least 264; the trainer stops
    earlier when the corpus has no more pairs to merge. ``include_bov=False`` leaves ``<BOV>`` out,
    like a stock Qwen2.5-VL tokenizer (for testing ``add_bov``). Returns the loaded tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, Qwen2Tokenizer

    min_size = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size!r}: must be an int >= {min_size} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    if isinstance(corpus, str):
        raise TypeError("corpus must be an iterable of strings, not one string (it would be read character by character)")

    specials = [t for t in SPECIAL_TOKENS if include_bov or t != BOV]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_checked_corpus(corpus), trainer=trainer)
    for name in specials:
        got, want = tok.token_to_id(name), OFFLINE_TOKEN_IDS[name]
        if got != want:  # the trainer's contract; if it ever changes, configs built from OFFLINE_TOKEN_IDS break
            raise RuntimeError(f"special token {name} got id {got}, expected {want}")

    hf = Qwen2Tokenizer(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=[t for t in specials if t != "<|endoftext|>"],
        model_max_length=32768,
    )
    hf.chat_template = CHAT_TEMPLATE

    # Atomic: save into a sibling temp dir, then swap it into place.
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    hf.save_pretrained(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        _rmtree(old)
    else:
        os.replace(tmp, out)
    return AutoTokenizer.from_pretrained(out)


def _checked_corpus(corpus: Iterable[str]) -> Iterator[str]:
    total = 0
    for i, line in enumerate(corpus):
        if not isinstance(line, str):
            raise TypeError(f"corpus item {i} is {type(line).__name__}, expected str")
        total += len(line)
        if total > MAX_CORPUS_CHARS:
            raise ValueError(f"corpus exceeds {MAX_CORPUS_CHARS:,} characters; this builder is for small offline vocabularies")
        yield line


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- corpora
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PLACE_PHRASES = (
    "at the top left", "at the top", "at the top right", "on the left", "in the center",
    "on the right", "at the bottom left", "at the bottom", "at the bottom right",
)


def shapeworld_corpus() -> Iterator[str]:
    """Sentences of the ShapeWorld language (DESIGN section 9), enough to learn its words as tokens.

    Not the data set: every step, prompt and answer form once per colour/shape/position, so the
    BPE learns whole-word tokens for the toy vocabulary and the toy model's sequences stay short.
    """
    yield DEFAULT_SYSTEM_PROMPT
    yield "system\nuser\nassistant\n"
    for colour in COLOURS:
        for shape in SHAPES:
            obj = f"{colour} {shape}"
            for pos, place in zip(POSITIONS, PLACE_PHRASES):
                yield f"Place the {obj} {place}."
                yield f"Move the {obj} to the {pos}."
                yield f"Draw a {obj} {place}."
                yield f"Add a {obj} {place}."
                yield f"How do I arrange a {obj} {place}, a {obj} {place} and a {obj} {place}?"
                yield f"Here is my canvas. How do I add a {obj} {place}, then remove the {obj}?"
                yield f"The canvas has a {obj} {place} and a {obj} {place}."
                yield f"move the {obj} to the {pos}, then make the {obj} {colour}"
            yield f"Remove the {obj}."
            yield f"remove the {obj}"
            for new in COLOURS:
                yield f"Make the {obj} {new}."
    for k in range(1, 10):
        yield f"Step {k}: Place the red circle at the top left."
    yield "What is on my canvas?"
    yield "Here is my canvas."
    yield "The canvas is empty."
    yield "Done. The canvas is ready."


def tiny_corpus() -> list[str]:
    """A few sentences for unit tests: enough merges to be a real BPE, trained in milliseconds."""
    return [
        DEFAULT_SYSTEM_PROMPT,
        "How do I bathe a cat? Step 1: fill the tub. Step 2: place the cat in the water.",
        "Draw a red circle at the top left. Here is my canvas.",
        "The quick brown fox jumps over the lazy dog. 0123456789",
        "system\nuser\nassistant\n",
    ]
