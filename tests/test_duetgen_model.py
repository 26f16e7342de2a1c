"""DuetGen composition: save/load round trips, plain-library loading, clear errors, text condition, VAE.

Drawing an image is tests/test_draw.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.models.duetgen import CONNECTOR_FILE, DuetGen, DuetGenConfig, ModelDirectoryError
from duetgen.models.image_processor import ImageProcessor
from duetgen.models.mllm import all_layer_states, condition_hidden_states, layer_states, model_inputs, render_record
from duetgen.models.builder import assemble, build, load, materialize
from duetgen.models.presets import get_preset, tiny
from duetgen.models.tokenizer import BOV, build_tokenizer, tiny_corpus
from duetgen.models.vae import PixelShuffleConfig
from duetgen.models.video_dit import install_padding_mask_resize_shim

torch.set_num_threads(1)
install_padding_mask_resize_shim()  # the stock diffusers forward resizes its padding mask with torchvision


def noise_image(h, w, seed):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def canvas(shapes):
    """A ShapeWorld-style canvas (DESIGN section 9): white, filled shapes, no anti-aliasing."""
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for kind, colour, (cx, cy) in shapes:
        if kind == "circle":
            draw.ellipse([cx - 7, cy - 7, cx + 7, cy + 7], fill=colour)
        elif kind == "square":
            draw.rectangle([cx - 7, cy - 7, cx + 7, cy + 7], fill=colour)
        else:
            draw.polygon([(cx, cy - 7), (cx - 7, cy + 7), (cx + 7, cy + 7)], fill=colour)
    return image


def record():
    return Record("howto-1", [
        Message("user", [TextPart("How do I bathe a cat?"), ImagePart(noise_image(24, 40, 1))]),
        Message("assistant", [TextPart("Step 1: fill the tub."), ImagePart(noise_image(32, 32, 2)),
                              TextPart("Step 2: place the cat."), ImagePart(noise_image(16, 24, 3))]),
    ])


@pytest.fixture(scope="module")
def tiny_model():
    return build("tiny", seed=0).eval()


@pytest.fixture(scope="module")
def saved_tiny(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def saved_toy(tmp_path_factory):
    return build("toy").save_pretrained(tmp_path_factory.mktemp("models") / "toy")


def dit_inputs(model, seed=0):
    """Two packed samples: 2 conditioning frames of different sizes + a target, and a lone target."""
    g = torch.Generator().manual_seed(seed)
    c = model.dit.latent_channels
    frames = [[torch.randn(c, 8, 12, generator=g), torch.randn(c, 4, 4, generator=g), torch.randn(c, 8, 8, generator=g)],
              [torch.randn(c, 6, 10, generator=g)]]
    times = [torch.tensor([0.0, 0.0, 0.6]), torch.tensor([0.3])]
    masks = [torch.tensor([True, True, False]), torch.tensor([False])]
    return frames, times, masks


def outputs(model, rendered):
    """MLLM logits, connector outputs (text condition) and packed DiT outputs of a model, no grad."""
    with torch.no_grad():
        logits = model.mllm(**model_inputs(model.mllm, rendered, with_labels=False)).logits
        text = model.connect(condition_hidden_states(model.mllm, rendered, rendered.bov_positions[1]))
        frames, times, masks = dit_inputs(model)
        dit = model.dit(frames, times, masks, [text, text[:5]])
    return logits, text, [f for sample in dit for f in sample]


# ----------------------------------------------------------------------------- save / load


def test_round_trip_gives_identical_outputs(tiny_model, saved_tiny):
    loaded = load(saved_tiny, expect="tiny").eval()
    rendered = render_record(record(), tiny_model.tokenizer, tiny_model.image_processor)
    assert len(rendered.bov_positions) == 2
    assert render_record(record(), loaded.tokenizer, loaded.image_processor).input_ids.equal(rendered.input_ids)
    (logits_a, text_a, dit_a), (logits_b, text_b, dit_b) = outputs(tiny_model, rendered), outputs(loaded, rendered)
    assert torch.equal(logits_a, logits_b)
    assert torch.equal(text_a, text_b)
    assert all(torch.equal(a, b) for a, b in zip(dit_a, dit_b))
    assert loaded.config == tiny_model.config
    saved, restored = tiny_model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)


def test_saved_parts_load_in_plain_transformers_and_diffusers(tiny_model, saved_tiny):
    from diffusers import CosmosTransformer3DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(saved_tiny / "mllm").eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_tiny / "mllm")
    assert BOV in tokenizer.get_vocab() and len(tokenizer) == len(tiny_model.tokenizer)
    rendered = render_record(record(), tokenizer, ImageProcessor.from_pretrained(saved_tiny / "mllm"))
    with torch.no_grad():
        plain = mllm(**model_inputs(mllm, rendered, with_labels=False)).logits
        ours = tiny_model.mllm(**model_inputs(tiny_model.mllm, rendered, with_labels=False)).logits
    assert torch.equal(plain, ours)

    # dit/ in plain diffusers: its crossattn_proj is the connector, so the STOCK forward fed raw all-layer
    # MLLM features equals our packed forward fed the connector's output.
    dit = CosmosTransformer3DModel.from_pretrained(saved_tiny / "dit").eval()
    assert dit.config.crossattn_proj_in_channels == tiny_model.connector.in_channels == 2 * 64
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 12, 3, 4, 6, generator=g)  # 2 conditioning frames + 1 target, equal sizes
    times, cond = torch.tensor([0.0, 0.0, 0.5]), torch.tensor([True, True, False])
    with torch.no_grad():
        raw = condition_hidden_states(tiny_model.mllm, rendered, rendered.bov_positions[0])[None]  # (1, L, 128)
        stock = dit(hidden_states=latents, timestep=times.view(1, 1, 3, 1, 1), encoder_hidden_states=raw,
                    condition_mask=cond.float().view(1, 1, 3, 1, 1).expand(1, 1, 3, 4, 6),
                    padding_mask=torch.zeros(1, 1, 8, 12), return_dict=False)[0]
        packed = tiny_model.dit([list(latents[0].unbind(1))], [times], [cond], [tiny_model.connect(raw[0])])[0]
    assert max((p - s).abs().max().item() for p, s in zip(packed, stock[0].unbind(1))) < 1e-5


def test_wan_vae_round_trip_and_plain_diffusers(tmp_path):
    from diffusers import AutoencoderKLWan

    model = build("tiny-wan").eval()
    path = model.save_pretrained(tmp_path / "tiny-wan")
    assert json.loads((path / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKLWan"
    plain = AutoencoderKLWan.from_pretrained(path / "vae").eval()
    loaded = load(path, expect="tiny-wan")
    images = [noise_image(32, 32, 5), noise_image(16, 24, 6)]
    ours, theirs = model.encode_images(images), loaded.encode_images(images)
    assert [tuple(z.shape) for z in ours] == [(4, 16, 16), (4, 8, 12)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    with torch.no_grad():  # plain diffusers, one image = one frame, mode of the posterior, then normalised
        pixels = torch.from_numpy(np.asarray(images[0], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)  # (3, H, W)
        mu = plain.encode(pixels[None, :, None]).latent_dist.mode()[:, :, 0]  # (1, z, h, w)
    mean = torch.tensor(plain.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(plain.config.latents_std).view(1, -1, 1, 1)
    assert torch.allclose((mu - mean) / std, ours[0][None], atol=1e-5)


def test_save_refuses_an_existing_directory_unless_overwrite(tiny_model, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny_model.save_pretrained(path)
    (path / "stale.txt").write_text("from the old save")
    tiny_model.save_pretrained(path, overwrite=True)
    assert not (path / "stale.txt").exists() and (path / "duetgen.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind


def test_connector_and_dit_projection_are_one_module(tmp_path):
    """Training the connector changes what dit/ saves (no stale pretrained copy), counted once in the groups."""
    from diffusers import CosmosTransformer3DModel

    model = build("tiny")
    assert model.transformer.crossattn_proj[0] is model.connector.proj
    with torch.no_grad():
        model.connector.proj.weight.add_(1.0)  # stands for an optimizer step
    path = model.save_pretrained(tmp_path / "m")
    plain = CosmosTransformer3DModel.from_pretrained(path / "dit")
    assert torch.equal(plain.crossattn_proj[0].weight, model.connector.proj.weight)
    assert torch.equal(load_file(path / CONNECTOR_FILE)["proj.weight"], model.connector.proj.weight)
    groups = model.generator_parameters()
    assert len({id(p) for p in groups}) == len(groups)
    assert {id(p) for p in groups}.isdisjoint(id(p) for p in model.mllm.parameters())
    assert len(groups) + len(list(model.mllm.parameters())) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- clear errors


def test_loading_a_toy_directory_as_tiny_names_the_difference(saved_toy):
    with pytest.raises(ModelDirectoryError) as error:
        load(saved_toy, expect="tiny")
    message = str(error.value)
    assert message.startswith(str(saved_toy))
    assert "preset 'toy'" in message and "preset 'tiny'" in message
    assert "mllm text_config.hidden_size is 256, expected 64" in message
    assert load(saved_toy, expect="toy").config.preset == "toy"  # and it loads as itself


def copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_connector_shape(saved_tiny, tmp_path):
    path = copy_model(saved_tiny, tmp_path / "m")
    save_file({"proj.weight": torch.zeros(32, 100), "proj.bias": torch.zeros(32)}, path / CONNECTOR_FILE)
    with pytest.raises(ModelDirectoryError, match=r"connector input width 100 does not match the MLLM's n_layers x "
                                                  r"width = 2 x 64 = 128") as error:
        DuetGen.from_pretrained(path)
    assert str(error.value).startswith(str(path))

    save_file({"proj.weight": torch.zeros(24, 128), "proj.bias": torch.zeros(24)}, path / CONNECTOR_FILE)
    with pytest.raises(ModelDirectoryError, match="connector output width 24 does not match the DiT's "
                                                  "cross-attention width text_embed_dim=32"):
        DuetGen.from_pretrained(path)

    save_file({"weight": torch.zeros(32, 128)}, path / CONNECTOR_FILE)
    with pytest.raises(ModelDirectoryError, match=r"connector.safetensors holds \['weight'\]"):
        DuetGen.from_pretrained(path)


def test_dit_and_connector_from_different_models(saved_tiny, tmp_path):
    path = copy_model(saved_tiny, tmp_path / "m")
    config = json.loads((path / "dit" / "config.json").read_text())
    config["crossattn_proj_in_channels"] = 100352
    (path / "dit" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match="dit/ crossattn_proj takes 100352 channels but the connector 128"):
        DuetGen.from_pretrained(path)


@pytest.mark.parametrize("part", ["dit", "mllm", "vae", CONNECTOR_FILE, "duetgen.json"])
def test_missing_part(saved_tiny, tmp_path, part):
    import shutil

    path = copy_model(saved_tiny, tmp_path / "m")
    target = path / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelDirectoryError, match="not a complete DuetGen directory: missing") as error:
        DuetGen.from_pretrained(path)
    assert str(error.value).startswith(str(path)) and part in str(error.value)


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelDirectoryError, match="not a directory"):
        DuetGen.from_pretrained(tmp_path / "nothing-here")


def test_tokenizer_without_bov(saved_tiny, tmp_path):
    path = copy_model(saved_tiny, tmp_path / "m")
    stock = build_tokenizer(tmp_path / "stock", tiny_corpus(), vocab_size=300, include_bov=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / "mllm" / name).unlink()
    stock.save_pretrained(path / "mllm")
    with pytest.raises(ModelDirectoryError, match="the tokenizer has no <BOV> token"):
        DuetGen.from_pretrained(path)


def test_vocab_larger_than_embeddings(saved_tiny, tmp_path):
    path = copy_model(saved_tiny, tmp_path / "m")
    config = json.loads((path / "mllm" / "config.json").read_text())
    config["text_config"]["vocab_size"] = 200  # the tokenizer has 300 tokens
    (path / "mllm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match="tokenizer has 300 tokens but the model only 200 embedding rows"):
        DuetGen.from_pretrained(path)


def test_settings_errors(saved_tiny, tmp_path):
    path = copy_model(saved_tiny, tmp_path / "m")
    saved = json.loads((path / "duetgen.json").read_text())
    (path / "duetgen.json").write_text(json.dumps({**saved, "format_version": 99}))
    with pytest.raises(ModelDirectoryError, match="format_version 99; this DuetGen reads 1"):
        DuetGen.from_pretrained(path)
    (path / "duetgen.json").write_text(json.dumps({**saved, "settings": {**saved["settings"], "guidence_scale": 3}}))
    with pytest.raises(ModelDirectoryError, match=r"unknown field\(s\) \['guidence_scale'\]"):
        DuetGen.from_pretrained(path)
    (path / "duetgen.json").write_text(json.dumps({**saved, "settings": {**saved["settings"], "image_size": [30, 30]}}))
    with pytest.raises(ModelDirectoryError, match=r"image_size=\[30, 30\] is not a multiple of 4"):
        DuetGen.from_pretrained(path)
    (path / "duetgen.json").write_text(json.dumps({**saved, "settings": {**saved["settings"], "mllm_max_side": 480}}))
    with pytest.raises(ModelDirectoryError, match="image processor max_side=48 but settings mllm_max_side=480"):
        DuetGen.from_pretrained(path)


def test_constructor_rejects_parts_that_do_not_fit():
    model = build("tiny")
    with pytest.raises(ValueError, match="the VAE has 48 latent channels but the DiT's out_channels is 12"):
        from duetgen.models.vae import PixelShuffleAE

        DuetGen(model.mllm, model.tokenizer, model.image_processor, model.connector, model.transformer,
                PixelShuffleAE(PixelShuffleConfig(factor=4)), model.config)


# ----------------------------------------------------------------------------- assembling real-style parts


@pytest.fixture(scope="module")
def local_parts(tmp_path_factory):
    """Directories laid out like downloaded weights, written by the plain libraries: a Qwen2.5-VL whose
    tokenizer has no <BOV>, a Cosmos DiT whose crossattn_proj matches the MLLM's 2 x 64, one whose does not,
    and a Wan VAE."""
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from duetgen.models.mllm import tiny_image_processor, tiny_qwen2_5_vl_config
    from duetgen.models.vae import tiny_wan_vae_config
    from duetgen.models.video_dit import tiny_cosmos_config

    root = tmp_path_factory.mktemp("downloads")
    tokenizer = build_tokenizer(root / "qwen", tiny_corpus(), vocab_size=300, include_bov=False)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(len(tokenizer) + 4)).save_pretrained(root / "qwen")
    tiny_image_processor().save_pretrained(root / "qwen")
    CosmosTransformer3DModel(**tiny_cosmos_config(in_channels=5, out_channels=4, crossattn_proj_in_channels=128)) \
        .save_pretrained(root / "cosmos" / "transformer")
    CosmosTransformer3DModel(**tiny_cosmos_config(in_channels=5, out_channels=4, crossattn_proj_in_channels=96)) \
        .save_pretrained(root / "other-dit")
    AutoencoderKLWan(**tiny_wan_vae_config()).save_pretrained(root / "cosmos" / "vae")
    CosmosTransformer3DModel(**tiny_cosmos_config(in_channels=13, out_channels=12, crossattn_proj_in_channels=128)) \
        .save_pretrained(root / "pixel-dit")
    return root


def test_assemble_adds_bov_and_copies_the_matching_projection(local_parts):
    from diffusers import CosmosTransformer3DModel

    settings = replace(get_preset("tiny-wan").settings)
    model = assemble(local_parts / "qwen", local_parts / "cosmos" / "transformer", local_parts / "cosmos" / "vae",
                               settings=settings)
    assert BOV in model.tokenizer.get_vocab()
    assert model.tokenizer.convert_tokens_to_ids(BOV) < model.mllm.get_input_embeddings().weight.shape[0]  # spare row
    pretrained = CosmosTransformer3DModel.from_pretrained(local_parts / "cosmos" / "transformer")
    assert torch.equal(model.connector.proj.weight, pretrained.crossattn_proj[0].weight)
    assert model.config.preset == "tiny-wan"  # the architecture matches that preset, so the name is kept
    rendered = render_record(record(), model.tokenizer, model.image_processor)
    text = model.connect(condition_hidden_states(model.mllm, rendered, rendered.bov_positions[0]))
    assert text.shape == (rendered.bov_positions[0], 32)


def test_assemble_fresh_connector_when_widths_differ(local_parts):
    from diffusers import CosmosTransformer3DModel

    model = assemble(local_parts / "qwen", local_parts / "other-dit", local_parts / "cosmos" / "vae")
    assert model.connector.proj.weight.shape == (32, 128)  # MLLM 2 x 64 -> DiT cross-attention 32
    assert CosmosTransformer3DModel.from_pretrained(local_parts / "other-dit").crossattn_proj[0].weight.shape == (32, 96)
    assert model.transformer.config.crossattn_proj_in_channels == 128  # the DiT now takes this MLLM's features
    # default settings are the real preset's; these parts are not that architecture, so the name is dropped
    assert model.config.preset == "custom" and model.config.image_size == (768, 768)


def test_assemble_with_the_pixel_shuffle_autoencoder(local_parts, tmp_path):
    model = assemble(local_parts / "qwen", local_parts / "pixel-dit", PixelShuffleConfig(factor=2),
                               settings=replace(tiny().settings))
    assert model.config.preset == "tiny" and model.vae.latent_channels == 12
    assert load(model.save_pretrained(tmp_path / "m"), expect="tiny").config.preset == "tiny"


def test_assemble_names_a_missing_config(local_parts):
    with pytest.raises(ModelDirectoryError, match="dit_dir has no config.json .*pass its transformer/ folder"):
        assemble(local_parts / "qwen", local_parts / "cosmos", local_parts / "cosmos" / "vae")


# ----------------------------------------------------------------------------- text condition


def test_text_condition_shape_and_gradients():
    model = build("tiny").freeze_mllm()
    rendered = render_record(record(), model.tokenizer, model.image_processor)
    bov = rendered.bov_positions[1]
    with torch.no_grad():  # the frozen MLLM, as stage 2 reads it
        states = condition_hidden_states(model.mllm, rendered, bov)  # its own forward over the prefix only
    text = model.connect(states)
    assert text.requires_grad
    assert text.shape == (bov, model.transformer.config.text_embed_dim)
    with torch.no_grad():  # one forward of the whole sequence, sliced: the path training uses for many images
        sliced = model.connect(all_layer_states(model.mllm, rendered)[:bov])
    assert (text - sliced).abs().max() < 1e-5
    text.square().sum().backward()
    assert model.connector.proj.weight.grad is not None and model.connector.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.mllm.parameters())
    assert all(p.grad is None for p in model.dit.parameters())


def test_guidance_negative_is_a_prefix_of_the_positive():
    from duetgen.models.mllm import negative_prefix_length

    model = build("tiny").eval()
    rendered = render_record(record(), model.tokenizer, model.image_processor)
    bov = rendered.bov_positions[1]
    with torch.no_grad():
        pos = model.connect(condition_hidden_states(model.mllm, rendered, bov))
        n = negative_prefix_length(rendered, bov)
        neg = model.connect(layer_states(model.mllm.model(**model_inputs(model.mllm, rendered.prefix(n), False),
                                                          output_hidden_states=True).hidden_states)[0])
    assert (pos[:n] - neg).abs().max() < 1e-5


# ----------------------------------------------------------------------------- images and latents


def test_pixel_shuffle_round_trip_is_exact_through_the_model():
    model = build("toy")
    canvases = [canvas([("circle", (220, 40, 40), (12, 12)), ("square", (40, 90, 220), (32, 32))]),
                canvas([("triangle", (40, 170, 70), (52, 52))]), noise_image(32, 48, 9)]
    latents = model.encode_images(canvases)
    assert [tuple(z.shape) for z in latents] == [(48, 16, 16), (48, 16, 16), (48, 8, 12)]
    decoded = model.decode_latents(latents)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(canvases, decoded))


def test_encode_rejects_sizes_the_dit_cannot_patchify():
    model = build("toy")
    with pytest.raises(ValueError, match=r"image 1: size 60x64 is not a multiple of 16"):
        model.encode_images([canvas([]), noise_image(64, 60, 0)])
    assert model.generation_size(64, 60) == (64, 64)
    assert model.generation_size(300, 200) == (64, 48)  # area capped at image_size (64x64), aspect kept


# ----------------------------------------------------------------------------- building


def test_materialize_initialises_buffers_like_a_normal_construction():
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = build("tiny")
    reference = Qwen2_5_VLForConditionalGeneration(model.mllm.config)
    assert all(torch.equal(a, b) for a, b in zip(reference.buffers(), model.mllm.buffers()))  # rotary inv_freq
    assert all(torch.isfinite(p).all() for p in model.parameters())
    norm = model.dit.transformer_blocks[0].attn1.norm_q.weight
    assert torch.equal(norm, torch.ones_like(norm))


def test_materialize_refuses_an_uninitialised_parameter():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))  # no reset_parameters covers it

    with torch.device("meta"):
        module = Odd()
    with pytest.raises(RuntimeError, match=r"no initialiser covers \['scale'\]"):
        materialize(module, torch.device("cpu"))


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build("tiny", seed=1)
    assert torch.equal(torch.rand(1), before)
    b, c = build("tiny", seed=1), build("tiny", seed=2)
    assert torch.equal(a.dit.proj_out.weight, b.dit.proj_out.weight)
    assert not torch.equal(a.dit.proj_out.weight, c.dit.proj_out.weight)


def test_dtype_casts_parameters_and_keeps_the_tie():
    model = build("tiny-wan", dtype=torch.bfloat16)
    assert {p.dtype for p in [*model.mllm.parameters(), *model.generator_parameters()]} == {torch.bfloat16}
    assert {b.dtype for b in model.mllm.buffers()} == {torch.float32}  # rotary inv_freq, as transformers keeps it
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    assert model.transformer.crossattn_proj[0].weight is model.connector.proj.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_settings_validation():
    with pytest.raises(ValueError, match="parameterisation='eps'"):
        DuetGenConfig(parameterisation="eps")
    with pytest.raises(ValueError, match="dit_attention='dense'"):
        DuetGenConfig(dit_attention="dense")
    assert DuetGenConfig.from_dict(tiny().settings.to_dict()) == tiny().settings


# ----------------------------------------------------------------------------- CLI


def test_cli_model_init_assemble_check(tmp_path, local_parts):
    from typer.testing import CliRunner

    from duetgen.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["model", "init", str(tmp_path / "toy"), "--preset", "toy"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["model", "check", str(tmp_path / "toy"), "--expect", "toy"]).exit_code == 0
    mismatch = runner.invoke(app, ["model", "check", str(tmp_path / "toy"), "--expect", "tiny"])
    assert mismatch.exit_code == 2 and "does not match preset 'tiny'" in mismatch.output
    empty = runner.invoke(app, ["model", "check", str(tmp_path / "toy"), "--expect", ""])  # skipped the check
    assert empty.exit_code == 2, empty.output
    # an audit: model check passed default sampler settings that generate then refused
    settings = json.loads((tmp_path / "toy" / "duetgen.json").read_text())
    for bad in ({"num_steps": -5}, {"solver": "bogus"}, {"shift": float("nan")}):
        broken = json.loads(json.dumps(settings))
        broken["settings"]["sampler"].update(bad)
        (tmp_path / "toy" / "duetgen.json").write_text(json.dumps(broken))
        checked = runner.invoke(app, ["model", "check", str(tmp_path / "toy")])
        assert checked.exit_code == 2 and f"sampler.{next(iter(bad))}" in checked.output, checked.output
    (tmp_path / "toy" / "duetgen.json").write_text(json.dumps(settings))
    result = runner.invoke(app, ["model", "assemble", str(tmp_path / "real"), "--mllm", str(local_parts / "qwen"),
                                 "--dit", str(local_parts / "cosmos" / "transformer"),
                                 "--vae", str(local_parts / "cosmos" / "vae")])
    assert result.exit_code == 0, result.output
    loaded = DuetGen.from_pretrained(tmp_path / "real")
    assert loaded.connector.proj.weight.dtype == torch.bfloat16 and BOV in loaded.tokenizer.get_vocab()
    missing = runner.invoke(app, ["model", "assemble", str(tmp_path / "x"), "--mllm", str(tmp_path),
                                  "--dit", str(tmp_path), "--vae", str(tmp_path)])
    assert missing.exit_code == 2 and "mllm_dir has no config.json" in missing.output
    # an audit: --overwrite replaced any folder (a dataset, a folder of notes); only a model or an empty one now
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("mine")
    refused = runner.invoke(app, ["model", "init", str(tmp_path / "notes"), "--preset", "tiny", "--overwrite"])
    assert refused.exit_code == 2 and "is not a DuetGen model directory" in refused.output
    assert (tmp_path / "notes" / "thesis.txt").read_text() == "mine"
    again = runner.invoke(app, ["model", "init", str(tmp_path / "toy"), "--preset", "tiny", "--overwrite"])
    assert again.exit_code == 0, again.output
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    refused = runner.invoke(app, ["model", "init", str(blocked / "m"), "--preset", "tiny"])
    assert refused.exit_code == 2 and "error:" in refused.output  # a traceback before


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError
LONG_INT = '{"n": ' + "1" * 5000 + "}"  # json.loads: ValueError (Python's 4300-digit limit)


@pytest.mark.parametrize("name, change, problem", [
    ("mllm/config.json", DEEP, "mllm/config.json is not valid JSON"),
    ("mllm/config.json", "[1]", "mllm/config.json must hold a JSON object; got list"),
    ("mllm/config.json", LONG_INT, "mllm/config.json is not valid JSON .*4300"),
    ("mllm/config.json", {"text_config": [1]}, "mllm/config.json is not a readable Qwen2.5-VL config"),
    ("dit/config.json", DEEP, "dit/config.json is not valid JSON"),
    ("dit/config.json", "[1]", "dit/config.json must hold a JSON object"),
    ("mllm/tokenizer_config.json", DEEP, "mllm/tokenizer_config.json is not valid JSON"),
    ("mllm/tokenizer.json", DEEP, "mllm/tokenizer.json is not valid JSON"),
    ("mllm/preprocessor_config.json", DEEP, "mllm/preprocessor_config.json is not valid JSON"),
    ("mllm/preprocessor_config.json", "[1]", "mllm/preprocessor_config.json must hold a JSON object"),
    ("mllm/preprocessor_config.json", {"size": [1, 2]}, "preprocessor_config.json: must hold a JSON object"),
    ("mllm/preprocessor_config.json", {"patch_size": [14]}, "preprocessor_config.json: int.. argument"),
], ids=lambda x: x if isinstance(x, str) and len(x) < 40 else None)
def test_malformed_json_in_a_model_directory_is_named(saved_tiny, tmp_path, name, change, problem):
    """An audit: a copied model directory whose JSON is nested too deep, holds a 5000-digit number or has
    the wrong shape crashed `duetgen model info` with a RecursionError / TypeError traceback."""
    path = copy_model(saved_tiny, tmp_path / "m")
    if isinstance(change, dict):
        change = json.dumps({**json.loads((path / name).read_text()), **change})
    (path / name).write_text(change)
    with pytest.raises(ModelDirectoryError, match=problem) as error:
        DuetGen.from_pretrained(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
