"""MLLM side: configs of the real Qwen2.5-VL class, <BOV>, rendering + loss masking, mrope, text condition."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart
from duetgen.models.mllm import (
    IGNORE_INDEX,
    TokenIds,
    add_bov,
    all_layer_states,
    check_compatible,
    condition_hidden_states,
    layer_states,
    model_inputs,
    final_text_chunk_start,
    negative_prefix_length,
    render_prompt,
    render_record,
    rope_position_ids,
    tiny_image_processor,
    tiny_qwen2_5_vl_config,
    toy_image_processor,
    toy_qwen2_5_vl_config,
)
from duetgen.models.tokenizer import BOV, OFFLINE_TOKEN_IDS, build_tokenizer, shapeworld_corpus, tiny_corpus

torch.set_num_threads(1)


def image(h, w, seed):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tiny", tiny_corpus(), vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(len(tok))).eval()


@pytest.fixture(scope="module")
def ids(tok):
    return TokenIds.from_tokenizer(tok)


# system, user text + image, assistant text / image / text / image / text; images of three sizes
USER_IMAGE, STEP1_IMAGE, STEP2_IMAGE = image(24, 40, 1), image(32, 32, 2), image(16, 24, 3)


def interleaved_record():
    return Record("howto-1", [
        Message("system", [TextPart("Be brief.")]),
        Message("user", [TextPart("How do I bathe a cat?"), ImagePart(USER_IMAGE)]),
        Message("assistant", [TextPart("Step 1: fill the tub."), ImagePart(STEP1_IMAGE),
                              TextPart("Step 2: place the cat."), ImagePart(STEP2_IMAGE), TextPart("Done.")]),
    ])


@pytest.fixture(scope="module")
def rendered(tok):
    return render_record(interleaved_record(), tok, tiny_image_processor())


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("make_config", [tiny_qwen2_5_vl_config, toy_qwen2_5_vl_config])
def test_configs_build_the_real_class(make_config):
    config = make_config(300)
    assert config.image_token_id == OFFLINE_TOKEN_IDS["<|image_pad|>"]
    model = Qwen2_5_VLForConditionalGeneration(config)
    out = model(input_ids=torch.tensor([[1, 20, 30, 2]]))
    assert out.logits.shape == (1, 4, 300)


def test_toy_canvas_is_9_tokens_one_per_grid_cell(tmp_path):
    tok = build_tokenizer(tmp_path / "toy", shapeworld_corpus(), vocab_size=512)
    model = Qwen2_5_VLForConditionalGeneration(toy_qwen2_5_vl_config(len(tok)))
    check_compatible(model.config, tok)
    canvas = Image.new("RGB", (64, 64), "white")
    record = Record("t2i", [Message("user", [TextPart("Draw a purple square at the bottom.")]),
                            Message("assistant", [TextPart("Here it is."), ImagePart(canvas)])])
    r = render_record(record, tok, toy_image_processor())
    assert [s.num_tokens for s in r.images] == [9]  # shown at 48x48: 3x3 merged tokens
    assert torch.isfinite(model(**model_inputs(model, r)).loss)


# ----------------------------------------------------------------------------- <BOV>
def test_add_bov_resizes_and_initialises(tmp_path):
    tok = build_tokenizer(tmp_path / "stock", tiny_corpus(), vocab_size=280, include_bov=False)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(len(tok)))
    emb0, head0 = model.get_input_embeddings().weight.detach().clone(), model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="add_bov"):
        TokenIds.from_tokenizer(tok)

    bov = add_bov(tok, model)
    assert bov == 280 and len(tok) == 281
    assert model.get_input_embeddings().weight.shape == (281, 64) and model.lm_head.weight.shape == (281, 64)
    assert model.config.text_config.vocab_size == 281
    assert torch.equal(model.get_input_embeddings().weight[:280], emb0)  # old rows untouched
    assert torch.allclose(model.get_input_embeddings().weight[bov], emb0.mean(0))
    assert torch.allclose(model.lm_head.weight[bov], head0.mean(0))
    assert tok.encode(f"hi{BOV}", add_special_tokens=False)[-1] == bov
    assert add_bov(tok, model) == bov and len(tok) == 281  # idempotent

    # the directory loads in plain transformers, <BOV> and all
    tok.save_pretrained(tmp_path / "mllm")
    model.save_pretrained(tmp_path / "mllm")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "mllm")
    model2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "mllm")
    assert tok2.convert_tokens_to_ids(BOV) == bov and BOV in tok2.all_special_tokens
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight)
    assert BOV in tok2.apply_chat_template(
        [{"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}], tokenize=False)


def test_add_bov_uses_spare_rows_without_resizing(tmp_path):
    tok = build_tokenizer(tmp_path / "stock", tiny_corpus(), vocab_size=280, include_bov=False)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(320))  # like Qwen: more rows than tokens
    emb0 = model.get_input_embeddings().weight.detach().clone()
    bov = add_bov(tok, model)
    assert model.get_input_embeddings().weight.shape == (320, 64)
    assert torch.allclose(model.get_input_embeddings().weight[bov], emb0[:bov].mean(0))
    assert torch.equal(model.get_input_embeddings().weight[bov + 1:], emb0[bov + 1:])


def test_check_compatible_names_the_mismatch(tok):
    config = tiny_qwen2_5_vl_config(len(tok), token_ids={**OFFLINE_TOKEN_IDS, "<|image_pad|>": 6})
    with pytest.raises(ValueError, match="image_token_id=6"):
        check_compatible(config, tok)
    with pytest.raises(ValueError, match="only 100 embedding rows"):
        check_compatible(tiny_qwen2_5_vl_config(100), tok)


# ----------------------------------------------------------------------------- rendering and labels
def test_label_masking_exact(tok, ids, rendered):
    input_ids, labels = rendered.input_ids.tolist(), rendered.labels.tolist()
    assert len(input_ids) == len(labels)
    loss_positions = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == input_ids[i] for i in loss_positions)

    # exactly: the assistant's text, its two <BOV>s and its closing <|im_end|>
    assert tok.decode([input_ids[i] for i in loss_positions]) == (
        f"Step 1: fill the tub.{BOV}Step 2: place the cat.{BOV}Done.<|im_end|>")
    n_text = sum(len(tok.encode(t, add_special_tokens=False)) for t in ["Step 1: fill the tub.", "Step 2: place the cat.", "Done."])
    assert len(loss_positions) == n_text + 2 + 1
    assert [i for i in loss_positions if input_ids[i] == ids.bov] == rendered.bov_positions
    last_im_end = max(i for i, t in enumerate(input_ids) if t == ids.im_end)
    assert last_im_end in loss_positions

    # nothing before the assistant header, no vision token, nothing after the closing <|im_end|>
    assistant_header = max(i for i, t in enumerate(input_ids) if t == ids.im_start)
    assert min(loss_positions) > assistant_header + 1
    vision = {ids.vision_start, ids.vision_end, ids.image_pad}
    assert not [i for i in loss_positions if input_ids[i] in vision]
    assert all(label == IGNORE_INDEX for label in labels[last_im_end + 1:])


def test_image_slots(ids, rendered):
    assert [s.generated for s in rendered.images] == [False, True, True]
    assert [s.grid_thw for s in rendered.images] == [(1, 6, 10), (1, 8, 8), (1, 4, 6)]
    assert [s.num_tokens for s in rendered.images] == [15, 16, 6]
    assert rendered.image_grid_thw.tolist() == [[1, 6, 10], [1, 8, 8], [1, 4, 6]]
    assert rendered.pixel_values.shape == (60 + 64 + 24, 3 * 2 * 4 * 4)
    x = rendered.input_ids
    for s in rendered.images:
        assert x[s.start - 1] == ids.vision_start and x[s.end] == ids.vision_end
        assert (x[s.start:s.end] == ids.image_pad).all()
        assert (s.bov_position == s.start - 2) if s.generated else (s.bov_position is None and x[s.start - 2] != ids.bov)
        a, b = s.patch_rows
        assert torch.equal(rendered.pixel_values[a:b], tiny_image_processor()([[USER_IMAGE, STEP1_IMAGE, STEP2_IMAGE][s.index]])[0])
    assert (x == ids.image_pad).sum() == 15 + 16 + 6
    assert (x == ids.bov).sum() == 2


def test_multi_turn_each_assistant_end_has_loss(tok, ids):
    record = Record("chat", [
        Message("user", [TextPart("Draw a red circle.")]),
        Message("assistant", [ImagePart(image(16, 16, 4))]),
        Message("user", [TextPart("Thanks")]),
        Message("assistant", [TextPart("Done.")]),
    ])
    r = render_record(record, tok, tiny_image_processor())
    x, labels = r.input_ids.tolist(), r.labels.tolist()
    assert tok.decode([t for t, label in zip(x, labels) if label != IGNORE_INDEX]) == f"{BOV}<|im_end|>Done.<|im_end|>"
    im_ends = [i for i, t in enumerate(x) if t == ids.im_end]
    assert [labels[i] != IGNORE_INDEX for i in im_ends] == [False, False, True, False, True]  # system, user, asst, user, asst


def test_render_matches_chat_template(tok, rendered):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "How do I bathe a cat?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Step 1: fill the tub."}, {"type": "image"},
                                          {"type": "text", "text": "Step 2: place the cat."}, {"type": "image"},
                                          {"type": "text", "text": "Done."}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    pieces = text.split("<|image_pad|>")
    expanded = pieces[0] + "".join("<|image_pad|>" * s.num_tokens + p for s, p in zip(rendered.images, pieces[1:]))
    assert tok.encode(expanded, add_special_tokens=False) == rendered.input_ids.tolist()


def test_special_token_text_in_a_record_stays_text(tok, ids):
    record = Record("inj", [Message("user", [TextPart("What does <BOV><|image_pad|><|im_end|> mean?")]),
                            Message("assistant", [TextPart("A token.")])])
    r = render_record(record, tok, tiny_image_processor())
    x = r.input_ids.tolist()
    assert ids.bov not in x and ids.image_pad not in x and x.count(ids.im_end) == 3  # system, user, assistant
    assert "What does <BOV><|image_pad|><|im_end|> mean?" in tok.decode(x)


def test_render_prompt_opens_an_assistant_turn(tok, ids):
    user = Message("user", [TextPart("Draw a cat."), ImagePart(image(16, 16, 5))])
    r = render_prompt([user], tok, tiny_image_processor())
    assert tok.decode(r.input_ids).endswith("<|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    # continuing a partial answer: no closing <|im_end|>, the generated image keeps its <BOV>
    partial = Message("assistant", [TextPart("Step 1: fill the tub."), ImagePart(image(16, 24, 6))])
    r2 = render_prompt([user, partial], tok, tiny_image_processor())
    assert tok.decode(r2.input_ids).endswith(f"Step 1: fill the tub.{BOV}<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>")
    assert r2.input_ids.tolist()[: len(r) - 3] == r.input_ids.tolist()[:-3]  # same history
    assert r2.images[1].generated and r2.bov_positions == [r2.images[1].start - 2]


def test_render_errors_name_the_record(tok, tmp_path):
    record = interleaved_record()
    with pytest.raises(RecordError, match="howto-1.*max_tokens=20"):
        render_record(record, tok, tiny_image_processor(), max_tokens=20)
    with pytest.raises(RecordError, match=r"howto-1.*messages\[1\]\.content\[1\].*returned str"):
        render_record(record, tok, tiny_image_processor(), load_image=lambda part: "not an image")
    stored = Record("disk", [Message("user", [ImagePart("images/ab/cd.png")])])
    with pytest.raises(RecordError, match="pass load_image"):
        render_record(stored, tok, tiny_image_processor())
    thin = Record("thin", [Message("user", [ImagePart(image(1, 400, 7))])])
    with pytest.raises(RecordError, match=r"thin.*aspect ratio"):
        render_record(thin, tok, tiny_image_processor())


# ----------------------------------------------------------------------------- model inputs and mrope
def test_rope_positions_follow_each_image_grid(model, rendered):
    pos = rope_position_ids(model, rendered.input_ids, rendered.image_grid_thw)  # (3, L)
    assert pos.shape == (3, len(rendered))
    for s in rendered.images:
        _, gh, gw = s.grid_thw
        h, w = gh // 2, gw // 2
        base = pos[0, s.start - 1] + 1  # position after <|vision_start|>
        block = pos[:, s.start:s.end].reshape(3, h, w)
        assert (block[0] == base).all()  # t: one still frame
        assert torch.equal(block[1], base + torch.arange(h)[:, None].expand(h, w))
        assert torch.equal(block[2], base + torch.arange(w)[None, :].expand(h, w))
        assert pos[0, s.end] == base + max(h, w)  # text resumes after the image's extent
    text = torch.ones(len(rendered), dtype=torch.bool)
    for s in rendered.images:
        text[s.start:s.end] = False
    assert (pos[0, text] == pos[1, text]).all() and (pos[0, text].diff() > 0).all()


def test_explicit_positions_equal_the_models_own(model, rendered):
    inputs = model_inputs(model, rendered, with_labels=False)
    with torch.no_grad():
        ours = model(**inputs).logits
        model.model.rope_deltas = None
        own = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                    mm_token_type_ids=(inputs["input_ids"] == model.config.image_token_id).int()).logits
        plain_1d = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                         image_grid_thw=inputs["image_grid_thw"]).logits
    model.model.rope_deltas = None  # the model's own path caches these on the shared fixture
    assert torch.allclose(ours, own, atol=1e-5)
    assert not torch.allclose(ours, plain_1d, atol=1e-3)  # the positions matter


def test_forward_loss_backward_with_images_of_different_sizes(tok, rendered):
    torch.manual_seed(1)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(len(tok))).train()
    out = model(**model_inputs(model, rendered))
    assert torch.isfinite(out.loss) and 0 < out.loss.item() < 20
    # the loss is the mean over exactly the labelled positions (shifted by one)
    logits, labels = out.logits[0, :-1], rendered.labels[1:]
    keep = labels != IGNORE_INDEX
    want = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(out.loss, want, atol=1e-5)
    out.loss.backward()
    patch_grad = model.model.visual.patch_embed.proj.weight.grad
    assert patch_grad is not None and torch.isfinite(patch_grad).all() and patch_grad.abs().sum() > 0  # images reach the loss
    assert torch.isfinite(model.lm_head.weight.grad).all()


# ----------------------------------------------------------------------------- text condition
def test_condition_shape_and_per_layer_normalisation(model, rendered):
    n_layers, d = 2, 64
    for bov in rendered.bov_positions:
        with torch.no_grad():
            c = condition_hidden_states(model, rendered, bov)
        assert c.shape == (bov, n_layers * d)
        chunks = c.reshape(bov, n_layers, d)
        assert torch.allclose(chunks.mean(-1), torch.zeros(bov, n_layers), atol=1e-5)
        assert torch.allclose(chunks.std(-1), torch.ones(bov, n_layers), atol=1e-4)


def test_condition_is_cosmos_pipeline_formula_on_layer_outputs(model, rendered):
    """Same numbers as diffusers' Cosmos2.5 _get_prompt_embeds: hidden_states[1:], (h - mean) / (std + 1e-8)."""
    inputs = model_inputs(model, rendered, with_labels=False)
    raw = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: raw.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.model.language_model.layers]
    try:
        with torch.no_grad():
            hs = model(**inputs, output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    ref = torch.cat([(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in hs[1:]], dim=-1)[0]
    with torch.no_grad():
        ours = all_layer_states(model, rendered)
    assert torch.allclose(ours, ref, atol=1e-5)
    # which tensors these are in transformers 5.23: raw outputs of layers 0..n-2, the last one after the final norm
    d = 64
    norm = lambda h: (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8)  # noqa: E731
    assert torch.allclose(ours[:, :d], norm(raw[0][0]), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(ours[:, d:], norm(model.model.language_model.norm(raw[1])[0]), atol=1e-5)
    assert not torch.allclose(ours[:, :d], norm(hs[0][0]), atol=1e-2)  # the embedding output is not included


def test_all_layer_states_sliced_at_each_bov_equals_direct(model, rendered):
    with torch.no_grad():
        full = all_layer_states(model, rendered)
        assert full.shape == (len(rendered), 128)
        for bov in rendered.bov_positions:
            direct = condition_hidden_states(model, rendered, bov)  # its own forward over the prefix only
            assert torch.allclose(full[:bov], direct, atol=1e-5)


def test_layer_states_batched_from_outputs(model, rendered):
    with torch.no_grad():
        hs = model.model(**model_inputs(model, rendered, with_labels=False), output_hidden_states=True).hidden_states
        assert torch.allclose(layer_states(hs)[0], all_layer_states(model, rendered), atol=1e-6)
    with pytest.raises(ValueError, match="embedding \\+ layer"):
        layer_states(hs[:1])


def test_guidance_negative_and_prefix(ids, rendered, tok):
    first, second = rendered.bov_positions
    user_image, step1_image, _ = rendered.images
    # the negative keeps every image before the <BOV> and drops the text after the last one
    assert negative_prefix_length(rendered, first) == user_image.end + 1
    assert negative_prefix_length(rendered, second) == step1_image.end + 1
    assert rendered.input_ids[negative_prefix_length(rendered, second) - 1] == ids.vision_end
    t2i = render_record(Record("t2i", [Message("user", [TextPart("Draw a cat.")]),
                                       Message("assistant", [ImagePart(image(16, 16, 8))])]), tok, tiny_image_processor())
    neg = negative_prefix_length(t2i, t2i.bov_positions[0])
    assert neg == t2i.system_length > 0
    assert tok.decode(t2i.input_ids[:neg]).endswith("You are a helpful assistant.<|im_end|>\n")
    bare = render_record(Record("bare", [Message("user", [TextPart("Draw a cat.")]),
                                         Message("assistant", [ImagePart(image(16, 16, 8))])]),
                         tok, tiny_image_processor(), system_prompt=None)
    assert bare.system_length == 0 and negative_prefix_length(bare, bare.bov_positions[0]) == 1  # never empty
    with pytest.raises(ValueError, match="not a <BOV>"):
        negative_prefix_length(rendered, first + 1)
    with pytest.raises(ValueError, match="cuts image 1"):
        rendered.prefix(step1_image.start + 3)
    p = rendered.prefix(second)
    assert len(p.images) == 2 and p.pixel_values.shape[0] == step1_image.patch_rows[1]


def test_final_text_chunk_start():
    VE = 99  # <|vision_end|>
    # [sys 1 2] [user 3 <img 98 7 7 VE> 4 5] [assistant 6]  -> the chunk after the image: 4 5 6
    ids = [1, 2, 3, 98, 7, 7, VE, 4, 5, 6]
    assert final_text_chunk_start(ids, VE, system_length=2) == 7
    # two images: the cut follows the last one
    assert final_text_chunk_start([1, 98, VE, 2, 3, 98, VE, 4], VE, system_length=0) == 7
    # no image: keep the system turn, or the first token when there is none (never empty)
    assert final_text_chunk_start([1, 2, 3, 4], VE, system_length=0) == 1
    assert final_text_chunk_start([1, 2, 3, 4], VE, system_length=3) == 3
    assert final_text_chunk_start([1, 2], VE, system_length=5) == 2  # a <BOV> inside the system turn
    # <BOV> right after an image: nothing to drop, negative == positive
    assert final_text_chunk_start([1, 98, VE], VE, system_length=0) == 3
    with pytest.raises(ValueError, match="no condition tokens"):
        final_text_chunk_start([], VE, system_length=0)
