"""Every model is built here: a preset with random weights, real weights from local parts or a Cosmos
pipeline directory, the MLLM stage 1 starts from, the DuetGen stage 2 trains around it.

    model = build("toy")                                          # random weights (presets.py)
    model = load("checkpoints/shapeworld-toy", expect="toy")      # a saved directory, checked against a preset
    model = assemble(mllm_dir, dit_dir, vae_dir)                  # real local weights (no hub)
    model = assemble_from_pipeline("Cosmos-Predict2.5-2B/")       # a diffusers Cosmos-Predict2.5 pipeline
    mllm, tokenizer, processor = stage1_mllm("toy", 512, run_dir / "tokenizer")
    model = around_mllm("toy", *load_mllm(stage1_dir), settings)  # stage 2

Design choices:
- Presets are data (`presets.py`: plain functions returning a full `ModelPreset`); this file turns them
  and weight directories into models, so the presets, the model file and the training scripts hold no
  construction code of their own, and `models/duetgen.py` imports no preset (no cycle).
- `build` always constructs on the `meta` device first, then (unless asked for `meta`) allocates on
  the target device and initialises every parameter and buffer (`materialize`): the path FSDP needs
  for the real model, exercised by the tiny tests. Every tensor is poisoned with NaN before
  initialisation and checked after, so a parameter no initialiser covers is an error, not garbage.
- Offline tokenizers are trained from a named corpus (`OFFLINE_CORPORA`), one rule for presets and
  stage 1: the tiny preset's unit-test corpus, ShapeWorld's language, and for stage 1's tiny MLLM the
  two together (it trains on ShapeWorld records, whose words must be tokens for its short test budgets).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from duetgen.diffusion.flow_matching import COSMOS_CONDITION_FRAME_TIME
from duetgen.models import cosmos_predict, presets
from duetgen.models.connector import Connector
from duetgen.models.cosmos_predict import COSMOS_TEXT_ENCODER
from duetgen.models import mllm as M
from duetgen.models.duetgen import (DirectoryParts, DuetGen, DuetGenConfig, ModelDirectoryError, _plain, build_vae,
                                    mllm_condition_channels, preset_differences, vae_spec)
from duetgen.models.image_processor import ImageProcessor
from duetgen.models.mllm import add_bov, check_compatible
from duetgen.models.tokenizer import build_tokenizer, shapeworld_corpus, tiny_corpus
from duetgen.models.vae import PixelShuffleAE, PixelShuffleConfig, WanImageVAE
from duetgen.models.video_dit import init_learnable_positions

OFFLINE_CORPORA = {
    "tiny": tiny_corpus,
    "shapeworld": shapeworld_corpus,
    "tiny+shapeworld": lambda: [*tiny_corpus(), *shapeworld_corpus()],
}
# stage 1's random MLLMs: spec -> (tokenizer corpus, config(vocab_size), image processor), the last two looked
# up in duetgen.models.mllm when called (a probe may swap the toy processor for another canvas view)
STAGE1_MLLMS = {
    "toy": ("shapeworld", lambda vocab_size: M.toy_qwen2_5_vl_config(vocab_size), lambda: M.toy_image_processor()),
    "tiny": ("tiny+shapeworld", lambda vocab_size: M.tiny_qwen2_5_vl_config(vocab_size), lambda: M.tiny_image_processor()),
}


def offline_tokenizer(corpus: str, vocab_size: int, directory: str | os.PathLike):
    """A byte-level BPE trained on the named corpus (DESIGN section 8's special tokens, `<BOV>`), saved in
    ``directory``."""
    if corpus not in OFFLINE_CORPORA:
        raise ValueError(f"unknown offline tokenizer corpus {corpus!r}; known: {sorted(OFFLINE_CORPORA)}")
    return build_tokenizer(directory, OFFLINE_CORPORA[corpus](), vocab_size=vocab_size)


# ----------------------------------------------------------------------------- presets: random weights


def build(
    preset: str | presets.ModelPreset,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> DuetGen:
    """A randomly initialised DuetGen of this preset.

    device "meta": nothing is allocated (parameter counts, FSDP planning). Otherwise the model is built
    on meta, allocated on `device` and initialised there (`materialize`). `dtype` (default float32)
    applies to the parameters of the MLLM, connector and DiT; buffers (rotary frequencies) and the VAE
    stay float32, as `DuetGen.from_pretrained` loads them. The global RNG is left untouched; `seed`
    fixes the weights.
    """
    from diffusers import CosmosTransformer3DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    preset = presets.get_preset(preset) if isinstance(preset, str) else preset
    device = torch.device(device)
    tokenizer = None
    mllm_config = copy.deepcopy(preset.mllm)
    if preset.tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = offline_tokenizer(preset.tokenizer, preset.tokenizer_vocab_size, tmp)
        mllm_config.text_config.vocab_size = len(tokenizer)
    image_processor = replace(preset.image_processor, max_side=preset.settings.mllm_max_side)

    with torch.device("meta"):
        mllm = Qwen2_5_VLForConditionalGeneration(mllm_config)
        dit = CosmosTransformer3DModel(**preset.dit)
        connector = Connector(mllm_condition_channels(mllm_config), dit.config.text_embed_dim)

    if dtype is not None:  # parameters only: rotary inv_freq buffers stay float32, as transformers loads them
        for module in (mllm, dit, connector):
            for parameter in module.parameters():
                parameter.data = parameter.data.to(dtype)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if device.type != "meta":
            materialize(mllm, device, hf_init=True)
            materialize(dit, device)
            materialize(connector, device)
            if dit.config.use_crossattn_projection and dit.config.crossattn_proj_in_channels == connector.in_channels:
                connector.load_dit_projection(dit)  # as assemble does with a pretrained DiT
        with torch.device(device):  # small and frozen: built directly where it runs, in float32
            vae = build_vae(preset.vae)

    return DuetGen(mllm, tokenizer, image_processor, connector, dit, vae, copy.deepcopy(preset.settings))


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device, hf_init: bool = False) -> None:
    """Allocate a meta-built module on `device` and initialise every floating parameter and buffer.

    hf_init: a transformers PreTrainedModel, initialised by its own `initialize_weights` (Linear /
    Embedding normal(0, initializer_range), norms 1, rotary inv_freq recomputed). Otherwise every
    submodule's `reset_parameters` runs (PyTorch defaults, which is how diffusers' Cosmos modules are
    initialised at construction) and diffusers' RMSNorm weights are set to 1. Tensors are NaN before
    initialisation; any left NaN raises, naming it.
    """
    from diffusers.models.normalization import RMSNorm

    module.to_empty(device=device)
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for tensor in tensors.values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    if hf_init:
        module.initialize_weights()
    else:
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
            elif isinstance(sub, RMSNorm) and sub.weight is not None:
                sub.weight.fill_(1.0)
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
    init_learnable_positions(module)  # a DiT with absolute positions (no reset_parameters of its own)
    uninitialised = [name for name, t in tensors.items() if t.is_floating_point() and bool(t.isnan().any())]
    if uninitialised:
        raise RuntimeError(f"materialize({type(module).__name__}): no initialiser covers {uninitialised[:8]}"
                           + (f" and {len(uninitialised) - 8} more" if len(uninitialised) > 8 else ""))


def load(path: str | os.PathLike, *, expect: str | presets.ModelPreset | None = None, **kwargs) -> DuetGen:
    """`DuetGen.from_pretrained`, with ``expect`` also a preset name (the directory must match it)."""
    preset = presets.get_preset(expect) if isinstance(expect, str) else expect
    return DuetGen.from_pretrained(path, expect=preset, **kwargs)


# ----------------------------------------------------------------------------- real weights from local parts


def assemble(
    mllm_dir: str | os.PathLike,
    dit_dir: str | os.PathLike,
    vae_dir: str | os.PathLike | PixelShuffleConfig,
    *,
    settings: DuetGenConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype = torch.float32,
    tokenizer_dir: str | os.PathLike | None = None,
    processor_dir: str | os.PathLike | None = None,
    connector_pretrained_against: str | None = None,
) -> DuetGen:
    """Assemble from separately downloaded local weights (no hub access).

    mllm_dir: a Qwen2.5-VL directory (config.json, safetensors, tokenizer, preprocessor_config.json),
      e.g. Qwen2.5-VL-7B-Instruct. `<BOV>` is added (`add_bov`: a spare embedding row when there is one).
    dit_dir: a diffusers CosmosTransformer3DModel directory, e.g. the `transformer/` folder of
      Cosmos-Predict2.5-2B converted to diffusers.
    vae_dir: a diffusers AutoencoderKLWan directory (e.g. that pipeline's `vae/`), or a PixelShuffleConfig
      (the parameter-free ShapeWorld autoencoder has no directory).
    The connector copies the DiT's pretrained crossattn_proj when its input width equals the MLLM's
    n_layers x width (28 x 3584 = 100,352 for these two), else starts fresh (connector.py).
    settings: default: the real preset's settings with Cosmos' conditioning-frame time (the DiT is the
      pretrained one), its name kept only if the architecture matches it.
    tokenizer_dir / processor_dir: where the tokenizer / preprocessor_config.json are when not in mllm_dir
      (a diffusers pipeline keeps the tokenizer in tokenizer/, beside text_encoder/).
    connector_pretrained_against: the MLLM the DiT's crossattn_proj was trained on, recorded in
      `provenance`; default: Cosmos-Reason1-7B for a Cosmos-Predict2.5-2B DiT, else "unknown".
    """
    from diffusers import CosmosTransformer3DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    mllm_dir, dit_dir = Path(mllm_dir), Path(dit_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else mllm_dir
    processor_dir = Path(processor_dir) if processor_dir is not None else mllm_dir
    for what, directory in (("mllm_dir", mllm_dir), ("dit_dir", dit_dir)):
        if not (directory / "config.json").is_file():
            hint = " (for a diffusers pipeline directory, pass its transformer/ folder)" if what == "dit_dir" else ""
            raise ModelDirectoryError(f"{directory}: {what} has no config.json{hint}")
    if not (processor_dir / "preprocessor_config.json").is_file():
        what = "mllm_dir" if processor_dir == mllm_dir else "processor_dir"
        raise ModelDirectoryError(f"{processor_dir}: {what} has no preprocessor_config.json")

    if settings is None:
        settings = replace(presets.get_preset(presets.REAL_PRESET).settings,
                           condition_frame_time=COSMOS_CONDITION_FRAME_TIME)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        mllm_dir, dtype=dtype or "auto", local_files_only=True, use_safetensors=True
    )
    add_bov(tokenizer, mllm)
    image_processor = replace(ImageProcessor.from_pretrained(processor_dir), max_side=settings.mllm_max_side)
    dit = CosmosTransformer3DModel.from_pretrained(dit_dir, torch_dtype=dtype, local_files_only=True,
                                                   use_safetensors=True)
    pretrained_projection = bool(dit.config.use_crossattn_projection
                                 and dit.config.crossattn_proj_in_channels == mllm_condition_channels(mllm.config))
    if pretrained_projection and connector_pretrained_against is None:
        real_dit = presets.cosmos_predict2_5_2b_config()
        is_cosmos = all(_plain(dict(dit.config).get(k)) == _plain(v) for k, v in real_dit.items())
        connector_pretrained_against = COSMOS_TEXT_ENCODER if is_cosmos else "unknown"
    connector = Connector.from_dit_projection(dit, mllm_condition_channels(mllm.config))
    if isinstance(vae_dir, PixelShuffleConfig):
        autoencoder = PixelShuffleAE(vae_dir)
    else:
        autoencoder = WanImageVAE.from_pretrained(vae_dir, torch_dtype=vae_dtype)
    model = DuetGen(mllm, tokenizer, image_processor, connector, dit, autoencoder, settings)
    if model.config.preset != "custom":
        parts = DirectoryParts(settings=settings, mllm_config=mllm.config, tokenizer=tokenizer,
                               image_processor=image_processor, dit_config=dict(dit.config),
                               connector_shape=(connector.out_channels, connector.in_channels),
                               vae=vae_spec(autoencoder))
        if preset_differences(parts, presets.get_preset(model.config.preset)):
            model.config = replace(model.config, preset="custom")
    model.provenance = {
        "assembled_from": {"mllm": str(mllm_dir), "tokenizer": str(tokenizer_dir),
                           "processor": str(processor_dir), "dit": str(dit_dir),
                           "vae": "PixelShuffleAE" if isinstance(vae_dir, PixelShuffleConfig) else str(vae_dir)},
        "connector_init": "the DiT's pretrained crossattn_proj" if pretrained_projection else "fresh",
        "connector_pretrained_against": connector_pretrained_against if pretrained_projection else None,
    }
    return model.to(device)


def assemble_from_pipeline(
    root: str | os.PathLike,
    *,
    processor_dir: str | os.PathLike | None = None,
    expect=None,  # default: the real preset (presets.REAL_PRESET); a ModelPreset for tiny test parts
    settings=None,  # DuetGenConfig; default: the real preset's, with Cosmos' conditioning-frame time
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    vae_dtype: torch.dtype = torch.float32,
):
    """A `DuetGen` from a diffusers Cosmos-Predict2.5 pipeline directory: its text encoder as the MLLM
    (`<BOV>` added), its DiT with `crossattn_proj` as the connector, its Wan VAE. Configs are checked
    first (`read_pipeline_directory`); `provenance` records the directory and the connector's MLLM."""
    if expect is None:
        expect = presets.REAL_PRESET
    parts = cosmos_predict.read_pipeline_directory(root, processor_dir, expect=expect)
    if settings is None:
        settings = replace(presets.get_preset(presets.REAL_PRESET).settings,
                           condition_frame_time=COSMOS_CONDITION_FRAME_TIME)
    model = assemble(parts.text_encoder, parts.transformer, parts.vae, settings=settings, device=device,
                     dtype=dtype, vae_dtype=vae_dtype, tokenizer_dir=parts.tokenizer, processor_dir=parts.processor)
    model.provenance["pipeline"] = {"directory": str(parts.root), "class": cosmos_predict.PIPELINE_CLASS,
                                    "diffusers_version": parts.model_index.get("_diffusers_version")}
    return model


# ----------------------------------------------------------------------------- training stages


def stage1_mllm(spec: str, vocab_size: int, tokenizer_dir: Path, meta: bool = False, where: str = "stage 1"):
    """(model, tokenizer, image_processor) for stage 1 to start from: a random toy/tiny Qwen2.5-VL with an
    offline tokenizer (``spec`` "toy" / "tiny"), or a local model directory (``spec`` its path, `<BOV>` added).

    The offline tokenizer is trained into ``tokenizer_dir`` once and read back from there (a resumed run
    keeps its ids). ``meta``: the same architecture on the meta device, without weights (distributed runs
    load rank 0's); a toy/tiny tokenizer must then already be in ``tokenizer_dir``. ``where`` names the
    config in errors.
    """
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    if spec in STAGE1_MLLMS:
        corpus, make_config, make_processor = STAGE1_MLLMS[spec]
        if (Path(tokenizer_dir) / "tokenizer.json").is_file():  # a resumed run keeps its ids
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        else:
            tokenizer = offline_tokenizer(corpus, vocab_size, tokenizer_dir)
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = Qwen2_5_VLForConditionalGeneration(make_config(len(tokenizer)))
        return model, tokenizer, make_processor()
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"{where}: mllm={spec!r} is not {' or '.join(map(repr, STAGE1_MLLMS))} or a local "
                                "model directory (a config that continues an earlier phase needs that phase's run "
                                "first: docs/training.md, 'ShapeWorld runs')")
    if meta:  # _from_config takes the checkpoint's dtype, as from_pretrained does
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    add_bov(tokenizer, model)  # on meta: the same resize (the <BOV> rows come with rank 0's weights)
    return model, tokenizer, ImageProcessor.from_pretrained(path)


def load_mllm(mllm_dir: str | os.PathLike):
    """(model, tokenizer, image_processor) of a stage-1 output directory, frozen in eval mode (stage 2)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    mllm_dir = Path(mllm_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(mllm_dir, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(mllm_dir, local_files_only=True)
    check_compatible(model.config, tokenizer)
    model.requires_grad_(False).eval()
    return model, tokenizer, ImageProcessor.from_pretrained(mllm_dir)


def around_mllm(preset_name: str, mllm, tokenizer, processor, settings: DuetGenConfig, recency_tokens: int = 0,
                dit_device: str | torch.device | None = None) -> DuetGen:
    """A `DuetGen` around a trained MLLM (stage 2): a random DiT and a fresh connector of the preset (its
    cross-attention input widened to this MLLM's n_layers x width), the preset's autoencoder, ``settings``;
    the MLLM frozen. ``dit_device="meta"``: DiT and connector without storage (distributed runs load
    rank 0's weights)."""
    from diffusers import CosmosTransformer3DModel

    preset = presets.get_preset(preset_name)
    in_channels = mllm_condition_channels(mllm.config)  # n_layers x width of the stage-1 MLLM
    with torch.device(dit_device) if dit_device is not None else contextlib.nullcontext():
        transformer = CosmosTransformer3DModel(**{**preset.dit, "crossattn_proj_in_channels": in_channels})
        connector = Connector.from_dit_projection(transformer, in_channels, recency_tokens=recency_tokens)
    init_learnable_positions(transformer)  # diffusers makes them zeros
    model = DuetGen(mllm, tokenizer, processor, connector, transformer, build_vae(preset.vae), settings)
    return model.freeze_mllm()


def text_only(mllm, tokenizer, processor) -> DuetGen:
    """A `DuetGen` around a stage-1 MLLM for its samples through the engine: the DiT is built on the `meta`
    device (no storage, never called: the samples supply the truth's images through the engine's
    `image_source`); the tiny preset's DiT and autoencoder do, whatever the MLLM."""
    from diffusers import CosmosTransformer3DModel

    preset = presets.get_preset("tiny")
    channels = mllm_condition_channels(mllm.config)
    with torch.device("meta"):
        dit = CosmosTransformer3DModel(**{**preset.dit, "crossattn_proj_in_channels": channels})
        connector = Connector(channels, dit.config.text_embed_dim)
        vae = build_vae(preset.vae)
    settings = replace(preset.settings, mllm_max_side=processor.max_side, image_size=(64, 64), max_images=16)
    return DuetGen(mllm, tokenizer, processor, connector, dit, vae, settings)
