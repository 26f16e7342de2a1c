"""Offline tokenizer builder: round trip, special tokens, chat template, ShapeWorld vocabulary."""

import os

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from duetgen.models.tokenizer import (
    BOV,
    DEFAULT_SYSTEM_PROMPT,
    OFFLINE_TOKEN_IDS,
    SPECIAL_TOKENS,
    build_tokenizer,
    shapeworld_corpus,
    tiny_corpus,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tiny"
    build_tokenizer(out, tiny_corpus(), vocab_size=300)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)  # a plain, offline load from the saved directory


def test_loads_as_qwen2_fast_tokenizer(tok_dir, tok):
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert sorted(os.listdir(tok_dir)) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert len(tok) == 300


@pytest.mark.parametrize(
    "text",
    [
        "How do I bathe a cat? Step 1: fill the tub.",
        "Zebras never appeared in the corpus: xylophone, quokka!",
        "héllo wörld — 日本語 🙂 tabs\tand\nnewlines\r\n  spaces  ",
        "",
    ],
)
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_special_tokens_have_fixed_ids_and_encode_whole(tok):
    vocab = tok.get_vocab()
    for token in SPECIAL_TOKENS:
        assert vocab[token] == OFFLINE_TOKEN_IDS[token]
        assert tok.encode(f"a{token}b", add_special_tokens=False)[1] == OFFLINE_TOKEN_IDS[token]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    # encode(..., add_special_tokens=True) adds nothing: Qwen has no BOS
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


def test_bpe_learned_merges(tok):
    # a real BPE: frequent corpus words are single tokens, not bytes
    assert len(tok.encode(" the", add_special_tokens=False)) == 1
    assert len(tok.encode(" cat", add_special_tokens=False)) == 1


def test_chat_template_renders_bov_before_assistant_images_only(tok):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Fix this:"}, {"type": "image", "image": "a.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Step 1"}, {"type": "image", "image": "b.png"},
                                          {"type": "text", "text": "Done."}]},
    ]
    out = tok.apply_chat_template(messages, tokenize=False)
    assert out == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nFix this:<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        f"<|im_start|>assistant\nStep 1{BOV}<|vision_start|><|image_pad|><|vision_end|>Done.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_without_bov(tmp_path):
    tok = build_tokenizer(tmp_path / "nobov", tiny_corpus(), vocab_size=280, include_bov=False)
    assert BOV not in tok.get_vocab()
    assert tok.convert_tokens_to_ids("<|video_pad|>") == OFFLINE_TOKEN_IDS["<|video_pad|>"]


def test_shapeworld_words_are_single_tokens(tmp_path):
    tok = build_tokenizer(tmp_path / "toy", shapeworld_corpus(), vocab_size=512)
    assert len(tok) <= 512
    for word in [" red", " purple", " orange", " circle", " square", " triangle", " left", " center", " Place", "Remove"]:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    step = "Step 3: Move the blue square to the bottom right."
    ids = tok.encode(step, add_special_tokens=False)
    assert len(ids) <= 14 and tok.decode(ids) == step


def test_rebuild_replaces_atomically(tmp_path):
    out = tmp_path / "tok"
    build_tokenizer(out, ["alpha beta"], vocab_size=270)
    tok = build_tokenizer(out, tiny_corpus(), vocab_size=300)
    assert len(tok) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp or old directories left


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tokenizer(tmp_path / "a", tiny_corpus(), vocab_size=100)
    with pytest.raises(TypeError, match="not one string"):
        build_tokenizer(tmp_path / "b", "a whole corpus as one string", vocab_size=300)
    with pytest.raises(TypeError, match="corpus item 1 is int"):
        build_tokenizer(tmp_path / "c", ["ok", 3], vocab_size=300)
    assert not (tmp_path / "a").exists()
