"""Real weights as their makers trained them (issue 19): our model with the Cosmos framing equals the stock
diffusers Cosmos-Predict2.5 pipeline.

Tiny random parts of the real classes (a Qwen2.5-VL text encoder, a CosmosTransformer3DModel with
`use_crossattn_projection`, an AutoencoderKLWan with Wan2.1's 8x spatial / 4x temporal layout, Cosmos'
UniPC scheduler config) are saved as a `Cosmos2_5_PredictBasePipeline` directory. The stock pipeline
loads it with `from_pretrained`; our model is assembled from the same directory (`assemble_from_pipeline`)
and draws with the Cosmos framing. Same caption, seed, steps and guidance (their g = 7 is our w = 8);
the stock pipeline's negative is the all-zero embedding Cosmos was trained with (`negative_prompt_embeds`).

The conditioned case goes through the pipeline's `video=` input with one conditioning latent frame
(its docstring: "Set to 1 for Image2World-like behavior"): the `image=` path calls torchvision, which
cannot be imported here. The clip is the image's [-1, 1] pixels, as our autoencoder reads a PIL image;
the frames the pipeline pads it with only fill the target frame's conditioning slot, which its mask
discards. The pipeline draws noise for both latent frames, so the test hands it `latents` whose target
frame is the noise our sampler draws from the same seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from duetgen.diffusion.flow_matching import COSMOS_CONDITION_FRAME_TIME
from duetgen.diffusion.schedules import SamplerConfig
from duetgen.models.cosmos_predict import (
    COSMOS_MAX_TOKENS,
    COSMOS_SYSTEM_PROMPT,
    PipelineDirectoryError,
    cosmos_prompt_ids,
)
from duetgen.infer.engine import GenerationConfig, draw_cosmos
from duetgen.models.builder import assemble_from_pipeline
from duetgen.models.duetgen import DuetGen, DuetGenConfig
from duetgen.models.mllm import tiny_image_processor, tiny_qwen2_5_vl_config
from duetgen.models.presets import tiny
from duetgen.models.video_dit import install_padding_mask_resize_shim, tiny_cosmos_config

CAPTION = "Draw a purple square at the bottom."
STEPS = 5
COSMOS_G = 7.0  # diffusers' guidance_scale; ours is w = g + 1
SIZE = 64  # pixels: 8x8 latents, 4x4 DiT tokens per frame
LATENT_CHANNELS = 4
TOLERANCE = 1e-4


def tiny_wan_vae_layout() -> dict:
    """A tiny AutoencoderKLWan with Wan2.1's layout: 8x spatial, 4x temporal (5 frames -> 2 latent frames)."""
    return dict(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                latents_std=[1.5, 0.5, 2.0, 1.0])


def tiny_cosmos_preset():
    """What the tiny pipeline must match (the real preset's role for real weights)."""
    preset = tiny()
    mllm = tiny_qwen2_5_vl_config(vocab_size=300)
    return replace(preset, name="tiny-cosmos-pipeline", mllm=mllm,
                   dit=tiny_cosmos_config(in_channels=LATENT_CHANNELS + 1, out_channels=LATENT_CHANNELS,
                                          crossattn_proj_in_channels=2 * 64),
                   vae={"_class_name": "AutoencoderKLWan", **tiny_wan_vae_layout()})


def settings() -> DuetGenConfig:
    return DuetGenConfig(parameterisation="cosmos", sampler=SamplerConfig(solver="unipc", num_steps=STEPS,
                                                                          schedule="karras"),
                         guidance_scale=COSMOS_G + 1, image_size=(SIZE, SIZE), max_images=4, mllm_max_side=48,
                         condition_frame_time=COSMOS_CONDITION_FRAME_TIME, framing="cosmos")


class AcceptAll:
    """Stands in for cosmos_guardrail's safety checker (not installed): the pipeline refuses to run without one."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt):
        return True


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A Cosmos2_5_PredictBasePipeline directory of tiny random parts, written by diffusers itself."""
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, UniPCMultistepScheduler
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import Cosmos2_5_PredictBasePipeline
    from transformers import Qwen2_5_VLForConditionalGeneration

    from duetgen.models.tokenizer import build_tokenizer, tiny_corpus

    root = tmp_path_factory.mktemp("cosmos")
    torch.manual_seed(0)
    preset = tiny_cosmos_preset()
    tokenizer = build_tokenizer(root / "tok", tiny_corpus(), 300, include_bov=False)  # a stock tokenizer: no <BOV>
    text_encoder = Qwen2_5_VLForConditionalGeneration(preset.mllm).eval()
    transformer = CosmosTransformer3DModel(**preset.dit)
    vae = AutoencoderKLWan(**tiny_wan_vae_layout())
    scheduler = UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True,
                                        prediction_type="flow_prediction", sigma_max=200.0, sigma_min=0.01)
    pipe = Cosmos2_5_PredictBasePipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                         vae=vae, scheduler=scheduler, safety_checker=lambda *a, **k: None)
    pipe.save_pretrained(root / "pipeline", safe_serialization=True)  # as diffusers' convert script saves one
    tiny_image_processor().save_pretrained(root / "processor")  # the snapshot has none
    return root


@pytest.fixture(scope="module")
def stock(pipeline_dir):
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import Cosmos2_5_PredictBasePipeline

    install_padding_mask_resize_shim()  # the stock DiT forward resizes its padding mask with torchvision
    pipe = Cosmos2_5_PredictBasePipeline.from_pretrained(pipeline_dir / "pipeline", safety_checker=AcceptAll())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(pipeline_dir):
    return assemble_from_pipeline(pipeline_dir / "pipeline", processor_dir=pipeline_dir / "processor",
                                  expect=tiny_cosmos_preset(), settings=settings()).eval()


def zero_negative(pipe):
    channels = pipe.transformer.config.crossattn_proj_in_channels
    return torch.zeros(1, COSMOS_MAX_TOKENS, channels)


def canvas() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- the equivalence


def test_prompt_ids_are_the_chat_template_padded_right(stock, ours):
    conversation = [{"role": "system", "content": [{"type": "text", "text": COSMOS_SYSTEM_PROMPT}]},
                    {"role": "user", "content": [{"type": "text", "text": CAPTION}]}]
    theirs = stock.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=False,
                                                 max_length=COSMOS_MAX_TOKENS, truncation=True, padding="max_length")
    theirs = theirs["input_ids"] if not isinstance(theirs, list) else theirs
    ids = cosmos_prompt_ids(ours.tokenizer, CAPTION)  # ours has <BOV> and our chat template: the ids must not care
    assert ids.tolist() == list(theirs)
    assert ids.shape == (COSMOS_MAX_TOKENS,) and ids[-1] == ours.tokenizer.pad_token_id


def defaults(model):
    """The model's own drawing settings (what `duetgen generate` runs with no overrides)."""
    return GenerationConfig().resolve(model.config, model.pixel_multiple)


def test_text_to_image_final_latents_match_diffusers(stock, ours):
    theirs = stock(prompt=CAPTION, height=SIZE, width=SIZE, num_frames=1, num_inference_steps=STEPS,
                   guidance_scale=COSMOS_G, generator=torch.Generator().manual_seed(11), output_type="latent",
                   negative_prompt_embeds=zero_negative(stock)).frames  # (1, C, 1, h, w)
    latent = draw_cosmos(ours, CAPTION, None, defaults(ours), generator=torch.Generator().manual_seed(11))  # (C, h, w)
    difference = (latent - theirs[0, :, 0]).abs().max().item()
    assert theirs.abs().mean() > 0.1  # a real drawing, not zeros
    print(f"max |ours - diffusers| = {difference:.3g}")
    assert difference < TOLERANCE, difference


def test_one_conditioning_image_final_latents_match_diffusers(stock, ours):
    image = canvas()
    clip = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W), our reading
    noise = torch.randn(LATENT_CHANNELS, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    latents = torch.stack([torch.randn_like(noise), noise], dim=1)[None]  # (1, C, 2, h, w): frame 1 is the target
    theirs = stock(video=clip[None, :, None], prompt=CAPTION, height=SIZE, width=SIZE, num_frames=5,
                   num_latent_conditional_frames=1, num_inference_steps=STEPS, guidance_scale=COSMOS_G,
                   latents=latents, output_type="latent", negative_prompt_embeds=zero_negative(stock)).frames
    latent = draw_cosmos(ours, CAPTION, image, defaults(ours), generator=torch.Generator().manual_seed(5))
    difference = (latent - theirs[0, :, 1]).abs().max().item()
    print(f"max |ours - diffusers| = {difference:.3g}")
    assert difference < TOLERANCE, difference
    # the conditioning frame's time matters: at 0 (our checkpoints' value) the result moves
    ours.config = replace(ours.config, condition_frame_time=0.0)
    try:
        moved = draw_cosmos(ours, CAPTION, image, defaults(ours), generator=torch.Generator().manual_seed(5))
    finally:
        ours.config = replace(ours.config, condition_frame_time=COSMOS_CONDITION_FRAME_TIME)
    assert (moved - latent).abs().max() > 0


def test_generate_with_cosmos_framing_draws_one_image(ours):
    from duetgen.infer.pipeline import DuetGenPipeline

    pipe = DuetGenPipeline(ours)
    record = pipe(CAPTION, seed=2, framing="cosmos")
    answer = record.messages[-1]
    assert answer.role == "assistant" and len(answer.content) == 1
    assert answer.content[0].image.size == (SIZE, SIZE)
    assert record.meta["generation"]["framing"] == "cosmos"
    expected = draw_cosmos(ours, CAPTION, None, defaults(ours), generator=torch.Generator().manual_seed(2 + 1000))
    assert np.array_equal(np.asarray(answer.content[0].image), np.asarray(ours.decode_latents([expected])[0]))
    with pytest.raises(ValueError, match="at most one image"):
        pipe(CAPTION, images=[canvas(), canvas()], framing="cosmos")


# ----------------------------------------------------------------------------- assembly, save, info


def test_assembled_model_records_its_sources_and_round_trips(pipeline_dir, ours, tmp_path):
    provenance = ours.provenance
    assert provenance["pipeline"]["class"] == "Cosmos2_5_PredictBasePipeline"
    assert provenance["connector_init"] == "the DiT's pretrained crossattn_proj"
    assert provenance["connector_pretrained_against"] == "unknown"  # a tiny DiT is not Cosmos-Predict2.5-2B
    assert provenance["assembled_from"]["tokenizer"].endswith("tokenizer")
    path = ours.save_pretrained(tmp_path / "model")
    saved = json.loads((path / "duetgen.json").read_text())
    assert saved["settings"]["framing"] == "cosmos" and saved["provenance"] == provenance
    loaded = DuetGen.from_pretrained(path)
    assert loaded.provenance == provenance and loaded.config == ours.config

    from duetgen.cli import app

    result = CliRunner().invoke(app, ["model", "info", str(path)])
    assert result.exit_code == 0, result.output
    assert "connector pretrained against: unknown" in result.output
    assert "framing: cosmos" in result.output


def test_default_settings_write_duetgen_json_as_before(tmp_path):
    from duetgen.models.builder import build

    path = build("tiny").save_pretrained(tmp_path / "tiny")
    saved = json.loads((path / "duetgen.json").read_text())
    assert set(saved) == {"format_version", "settings"}
    assert "framing" not in saved["settings"] and "condition_frame_time" not in saved["settings"]
    assert DuetGen.from_pretrained(path).config.framing == "duetgen"


# ----------------------------------------------------------------------------- bad pipeline directories


def copy_pipeline(pipeline_dir, tmp_path):
    target = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir / "pipeline", target)
    return target


def edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_pipeline_without_tokenizer_is_refused(pipeline_dir, tmp_path):
    root = copy_pipeline(pipeline_dir, tmp_path)
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(PipelineDirectoryError, match="missing tokenizer/tokenizer_config.json"):
        assemble_from_pipeline(root, processor_dir=pipeline_dir / "processor", expect=tiny_cosmos_preset())


def test_pipeline_without_processor_names_the_folders(pipeline_dir):
    with pytest.raises(PipelineDirectoryError, match=r"no preprocessor_config.json in processor/, tokenizer/, "
                                                     r"text_encoder/.*--processor"):
        assemble_from_pipeline(pipeline_dir / "pipeline", expect=tiny_cosmos_preset())


def test_dit_that_does_not_match_the_preset_is_refused(pipeline_dir, tmp_path):
    # the CLI checks against the real preset: the tiny DiT's config is named field by field
    from duetgen.cli import app

    result = CliRunner().invoke(app, ["model", "assemble", str(tmp_path / "out"), "--pipeline",
                                      str(pipeline_dir / "pipeline"), "--processor", str(pipeline_dir / "processor")])
    assert result.exit_code == 2
    assert "transformer/config.json num_layers is 2, expected 28" in result.output
    assert not (tmp_path / "out").exists()


def test_text_encoder_that_does_not_fit_the_connector_is_refused(pipeline_dir, tmp_path):
    root = copy_pipeline(pipeline_dir, tmp_path)
    config = json.loads((root / "text_encoder" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    config["text_config"].pop("layer_types", None)  # transformers derives one type per layer
    (root / "text_encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineDirectoryError, match=r"text_encoder/config.json text_config num_hidden_layers x "
                                                     r"hidden_size = 3 x 64 = 192 does not fit the connector"):
        assemble_from_pipeline(root, processor_dir=pipeline_dir / "processor", expect=tiny_cosmos_preset())


def test_scheduler_other_than_cosmos_karras_is_refused(pipeline_dir, tmp_path):
    root = copy_pipeline(pipeline_dir, tmp_path)
    edit_json(root / "scheduler" / "scheduler_config.json", sigma_max=80.0)
    with pytest.raises(PipelineDirectoryError, match="scheduler/scheduler_config.json sigma_max is 80.0"):
        assemble_from_pipeline(root, processor_dir=pipeline_dir / "processor", expect=tiny_cosmos_preset())
