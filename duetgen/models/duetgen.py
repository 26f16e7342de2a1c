"""DuetGen: the MLLM, the connector, the packed video DiT and the image autoencoder, composed; save/load.

One object holds the parts the paper composes (section 4, DESIGN section 5): a pretrained
Qwen2.5-VL that writes text and emits `<BOV>`, a connector from its all-layer hidden states to the
DiT's cross-attention width, a Cosmos-Predict2.5 DiT run over packed frames, and an autoencoder.
Training loops and the decode loop live elsewhere (train/, infer/); this file gives them the few
single-device operations they share.

Design choices:
- `DuetGen` is an `nn.Module` without a `forward`: `.to()`, `.train()`, `.requires_grad_()` and
  `state_dict()` then cover every part at once, while each stage calls the parts it trains
  (stage 1 `model.mllm`, stage 2 `model.connect` + `model.dit`). The tokenizer and the image
  processor are plain attributes. Parallelism is applied from outside, per part (torchtitan).
- Directory layout (`save_pretrained` / `from_pretrained`), every part readable by its own library:
      duetgen.json            format_version + DuetGenConfig (written last: the directory is complete)
      mllm/                   Qwen2_5_VLForConditionalGeneration.from_pretrained + AutoTokenizer.from_pretrained,
                              preprocessor_config.json (duetgen.models.image_processor)
      dit/                    diffusers CosmosTransformer3DModel.from_pretrained; its crossattn_proj IS the connector
      connector.safetensors   proj.weight (D_cross, n_layers * D), proj.bias (D_cross,), optional
                              recency.weight (K + 1, D_cross): the step marker (connector.py)
      vae/config.json         `_class_name` AutoencoderKLWan (+ its safetensors: plain diffusers) or PixelShuffleAE
  Safetensors and JSON only: no pickle, no trust_remote_code, local files only.
- The connector and the DiT's own `crossattn_proj` are ONE module: at construction the stock DiT's
  `crossattn_proj` is replaced by the connector's Linear + GELU (connector.py: the connector replaces
  the projection, `export_to_dit` semantics, config fields updated). So there is never a stale second
  copy in memory (100M parameters for the real model), `dit/` always saves the current connector, and
  the saved DiT's stock forward accepts raw all-layer MLLM features. `connector.safetensors` is the
  copy DuetGen reads back; `dit/` carries the same weights for plain diffusers users.
- Loading checks the directory from its JSON and safetensors headers before any weight is read:
  missing parts, a format version, parts that do not fit each other (connector vs the MLLM's
  n_layers x width and the DiT's cross-attention width, tokenizer vs embedding rows, `<BOV>`, VAE
  latent channels vs the DiT), and, with `expect=`, the architecture of a preset. Every error
  names the directory and the problem (`ModelDirectoryError`).
- The MLLM is frozen in stage 2 (paper section 4.2, `freeze_mllm`): stage 2 reads its states without
  autograd (train/stage2.py, `ConditionStates`) and gradients start at `connect`. The VAE is always
  frozen: its latents are data.
- Writes are atomic: the directory is written under a temporary name next to the target and renamed
  into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from duetgen.data.images import to_rgb
from duetgen.diffusion.flow_matching import PARAMETERISATIONS, Parameterisation
from duetgen.diffusion.schedules import SamplerConfig
from duetgen.models.connector import Connector
from duetgen.models.image_processor import ImageProcessor, smart_resize
from duetgen.models.mllm import check_compatible
from duetgen.models.tokenizer import BOV
from duetgen.models.vae import (
    ImageAutoencoder,
    PixelShuffleAE,
    PixelShuffleConfig,
    WanImageVAE,
    uint8_to_unit,
    unit_to_uint8,
)
from duetgen.models.video_dit import ATTENTION_MODES, PackedCosmosDiT

FORMAT_VERSION = 1  # of duetgen.json and the directory layout
SETTINGS_FILE = "duetgen.json"
CONNECTOR_FILE = "connector.safetensors"
CONNECTOR_KEYS = ("proj.weight", "proj.bias")
RECENCY_KEY = "recency.weight"  # optional: the connector's step marker (connector.py)
VAE_CLASSES = ("AutoencoderKLWan", "PixelShuffleAE")  # vae/config.json `_class_name`
FRAMINGS = ("duetgen", "cosmos")  # DuetGenConfig.framing
# DuetGenConfig fields added after format 1 (issue 19): written only when they differ from these defaults
LATER_FIELD_DEFAULTS = {"condition_frame_time": 0.0, "framing": "duetgen"}
MAX_LISTED_DIFFERENCES = 6  # in a preset-mismatch error


class ModelDirectoryError(ValueError):
    """A DuetGen directory is missing a part, or its parts do not fit each other or the expected preset."""


# ----------------------------------------------------------------------------- settings


MAX_IMAGE_SIDE = 8192  # pixels: a generated image's side (the paper draws 768; 8192^2 latents already fill a GPU)


def sampler_problems(s: SamplerConfig) -> list[str]:
    """What makes a default sampler unusable (each names its setting), as the sampler itself would refuse it."""
    problems = []
    if s.solver not in ("euler", "unipc"):
        problems.append(f"sampler.solver={s.solver!r} is not 'euler' or 'unipc'")
    if s.schedule not in ("flow", "karras"):
        problems.append(f"sampler.schedule={s.schedule!r} is not 'flow' or 'karras'")
    if type(s.num_steps) is not int or s.num_steps < 1:
        problems.append(f"sampler.num_steps={s.num_steps!r} must be an int >= 1")
    if type(s.shift) not in (int, float) or not 0 < s.shift < float("inf"):
        problems.append(f"sampler.shift={s.shift!r} must be a finite number > 0")
    if type(s.unipc_order) is not int or not 1 <= s.unipc_order <= 3:
        problems.append(f"sampler.unipc_order={s.unipc_order!r} must be 1, 2 or 3")
    return problems


@dataclass
class DuetGenConfig:
    """Settings saved in duetgen.json. The architecture itself lives in each part's own config file.

    Two kinds: how the network was trained (parameterisation, the x0 rule, conditioning frames and their
    flow time, framing), which every drawing must apply (duetgen.diffusion.draw), and the checkpoint's
    drawing defaults (sampler, guidance, image size), which `duetgen.infer.engine.GenerationConfig.resolve`
    fills in where a request leaves them open. The model itself reads neither: it only runs forwards.
    """

    preset: str = "custom"  # the preset the architecture came from (presets.py); "custom" when assembled freely
    parameterisation: Parameterisation = "cosmos"  # what the DiT's raw output means (duetgen.diffusion.flow_matching)
    # "x0" only: x0_hat = raw + the latest conditioning latent (a white canvas's when none); train/stage2.py
    x0_relative_to_previous: bool = False
    use_condition_frames: bool = True  # False: the text-only ablation, the DiT never sees earlier images
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # default solver / steps / schedule (a default)
    guidance_scale: float = 1.0  # w in v_neg + w (v_pos - v_neg); 1 = no guidance; Cosmos' g = w - 1
    # w for an image with no earlier image in the conversation (text-to-image, a how-to's first step): its
    # negative is the system turn alone, a true unconditional; None = guidance_scale (docs/training.md)
    guidance_scale_without_frames: float | None = None
    image_size: tuple[int, int] = (768, 768)  # (height, width) in pixels of a generated image (paper section 5: 768x768)
    max_images: int = 8  # images in one conversation (inputs + generated): every one is a DiT frame of the next image
    mllm_max_side: int | None = 480  # longer-side cap of images fed to the MLLM (paper section 4.1); None = no cap
    dit_attention: str = "split"  # PackedCosmosDiT attention: "split" (per-sample SDPA) or "mask" (one dense-mask call)
    # Flow time of clean conditioning frames: 0 for our trained checkpoints (train/stage2.py), 1e-4 for a
    # pretrained Cosmos-Predict2.5 DiT (its training and diffusers' `conditional_frame_timestep`)
    condition_frame_time: float = 0.0
    # How the DiT's text condition is framed (docs/model.md, "Real weights"): "duetgen" = the MLLM's states
    # before <BOV> in the conversation; "cosmos" = Cosmos-Predict2.5's own framing of one caption
    # (duetgen.models.cosmos_predict), the zero-shot sanity check of freshly assembled real weights
    framing: str = "duetgen"

    def __post_init__(self):
        if isinstance(self.sampler, dict):
            self.sampler = _strict_dataclass(SamplerConfig, self.sampler, "sampler")
        self.image_size = tuple(self.image_size)
        problems = []
        if self.parameterisation not in PARAMETERISATIONS:
            problems.append(f"parameterisation={self.parameterisation!r} is not one of {PARAMETERISATIONS}")
        if self.x0_relative_to_previous and self.parameterisation != "x0":
            problems.append(f"x0_relative_to_previous needs parameterisation='x0'; got {self.parameterisation!r}")
        if len(self.image_size) != 2 or not all(isinstance(s, int) and 0 < s <= MAX_IMAGE_SIDE
                                                for s in self.image_size):
            problems.append(f"image_size={self.image_size!r} must be (height, width), two ints in 1..{MAX_IMAGE_SIDE}")
        if not isinstance(self.max_images, int) or self.max_images < 1:
            problems.append(f"max_images={self.max_images!r} must be a positive int")
        if self.mllm_max_side is not None and (not isinstance(self.mllm_max_side, int) or self.mllm_max_side < 1):
            problems.append(f"mllm_max_side={self.mllm_max_side!r} must be a positive int or None")
        if not self.guidance_scale > 0:
            problems.append(f"guidance_scale={self.guidance_scale!r} must be > 0")
        if self.guidance_scale_without_frames is not None and not self.guidance_scale_without_frames > 0:
            problems.append(f"guidance_scale_without_frames={self.guidance_scale_without_frames!r} must be > 0 or None")
        if self.dit_attention not in ATTENTION_MODES:
            problems.append(f"dit_attention={self.dit_attention!r} is not one of {ATTENTION_MODES}")
        problems += sampler_problems(self.sampler)  # (model check passed what generate then refused)
        if not (isinstance(self.condition_frame_time, (int, float)) and 0 <= self.condition_frame_time < 1):
            problems.append(f"condition_frame_time={self.condition_frame_time!r} must be a flow time in [0, 1)")
        if self.framing not in FRAMINGS:
            problems.append(f"framing={self.framing!r} is not one of {FRAMINGS}")
        if problems:
            raise ValueError("DuetGenConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        """The duetgen.json form. Fields added after format 1 was first written are left out at their
        defaults, so a directory with default settings stays readable by the DuetGen that preceded them."""
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        for name, default in LATER_FIELD_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DuetGenConfig":
        """Strict: an unknown key is an error (a typo must not silently fall back to a default)."""
        return _strict_dataclass(cls, d, "settings")


def _strict_dataclass(cls, d: Any, what: str):
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a JSON object; got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


# ----------------------------------------------------------------------------- consistency checks


def mllm_condition_channels(mllm_config) -> int:
    """n_layers x width of the all-layer text condition (28 x 3584 = 100,352 for Qwen2.5-VL-7B)."""
    text = mllm_config.text_config
    return text.num_hidden_layers * text.hidden_size


def part_problems(
    mllm_config,
    tokenizer,
    image_processor: ImageProcessor,
    connector_shape: tuple[int, int],  # (out = D_cross, in = n_layers * D), as proj.weight
    dit_config,
    latent_channels: int,
    spatial_factor: int,
    settings: DuetGenConfig,
) -> list[str]:
    """Every way in which these parts do not fit together, as sentences (empty = they fit).

    Works on configs only, so `from_pretrained` runs it before reading any weight.
    """
    problems = []
    if tokenizer is not None:
        if BOV not in tokenizer.get_vocab():
            problems.append(f"the tokenizer has no {BOV} token (add it with duetgen.models.mllm.add_bov)")
        try:
            check_compatible(mllm_config, tokenizer, need_bov=False)
        except ValueError as e:
            problems.append(str(e))
    vision = mllm_config.vision_config
    for ours, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                         ("temporal_patch_size", "temporal_patch_size")):
        if getattr(image_processor, ours) != getattr(vision, theirs):
            problems.append(f"image processor {ours}={getattr(image_processor, ours)} but the MLLM's vision "
                            f"{theirs}={getattr(vision, theirs)}")
    if image_processor.max_side != settings.mllm_max_side:
        problems.append(f"image processor max_side={image_processor.max_side} but settings "
                        f"mllm_max_side={settings.mllm_max_side}")
    out_channels, in_channels = connector_shape
    text = mllm_config.text_config
    if in_channels != mllm_condition_channels(mllm_config):
        problems.append(f"connector input width {in_channels} does not match the MLLM's n_layers x width = "
                        f"{text.num_hidden_layers} x {text.hidden_size} = {mllm_condition_channels(mllm_config)}")
    if out_channels != dit_config["text_embed_dim"]:
        problems.append(f"connector output width {out_channels} does not match the DiT's cross-attention width "
                        f"text_embed_dim={dit_config['text_embed_dim']}")
    if latent_channels != dit_config["out_channels"]:
        problems.append(f"the VAE has {latent_channels} latent channels but the DiT's out_channels is "
                        f"{dit_config['out_channels']}")
    multiple = spatial_factor * dit_config["patch_size"][1]
    if any(side % multiple for side in settings.image_size):
        problems.append(f"settings image_size={list(settings.image_size)} is not a multiple of {multiple} "
                        f"(VAE factor {spatial_factor} x DiT patch {dit_config['patch_size'][1]})")
    return problems


def tie_projection(dit, connector: Connector) -> None:
    """Make the stock DiT's `crossattn_proj` the connector's own modules (module docstring)."""
    if dit.config.text_embed_dim != connector.out_channels:
        raise ValueError(f"connector output width {connector.out_channels} != the DiT's cross-attention width "
                         f"text_embed_dim={dit.config.text_embed_dim}")
    dit.crossattn_proj = nn.Sequential(connector.proj, connector.activation)
    dit.register_to_config(
        use_crossattn_projection=True,
        crossattn_proj_in_channels=connector.in_channels,
        encoder_hidden_states_channels=connector.out_channels,
    )


# ----------------------------------------------------------------------------- autoencoder specs


def build_vae(spec: dict) -> ImageAutoencoder:
    """An autoencoder from its vae/config.json content (random weights for Wan; on the default device)."""
    spec = dict(spec)
    kind = spec.pop("_class_name", None)
    if kind == "PixelShuffleAE":
        return PixelShuffleAE(_strict_dataclass(PixelShuffleConfig, spec, "vae config"))
    if kind == "AutoencoderKLWan":
        from diffusers import AutoencoderKLWan

        spec = {k: v for k, v in spec.items() if not k.startswith("_")}
        return WanImageVAE(AutoencoderKLWan(**spec).eval())
    raise ValueError(f"vae config: _class_name must be one of {VAE_CLASSES}; got {kind!r}")


def vae_spec(vae: ImageAutoencoder) -> dict:
    """The vae/config.json content describing `vae` (the inverse of build_vae, without weights)."""
    if isinstance(vae, PixelShuffleAE):
        return {"_class_name": "PixelShuffleAE", **asdict(vae.config)}
    if isinstance(vae, WanImageVAE):
        return {"_class_name": "AutoencoderKLWan", **{k: v for k, v in vae.vae.config.items() if not k.startswith("_")}}
    raise TypeError(f"unknown autoencoder {type(vae).__name__}")


def _vae_latent_shape(spec: dict) -> tuple[int, int]:
    """(latent_channels, spatial_factor) from a vae config, without building it."""
    if spec.get("_class_name") == "PixelShuffleAE":
        factor = spec.get("factor", PixelShuffleConfig.factor)
        return 3 * factor**2, factor
    return spec["z_dim"], 2 ** len(spec["temperal_downsample"]) * (spec.get("patch_size") or 1)


# ----------------------------------------------------------------------------- the model


class DuetGen(nn.Module):
    """The composed model. Build with `duetgen.models.builder` (`build`, `load`, `assemble`) or load with
    `DuetGen.from_pretrained`.

    Parts: `mllm` (transformers Qwen2_5_VLForConditionalGeneration), `tokenizer`, `image_processor`,
    `connector`, `dit` (PackedCosmosDiT; the stock diffusers model is `dit.transformer`), `vae`
    (WanImageVAE or PixelShuffleAE), `config` (DuetGenConfig).
    """

    def __init__(
        self,
        mllm: nn.Module,
        tokenizer,  # None only for random-weight builds of presets whose tokenizer comes with real weights
        image_processor: ImageProcessor,
        connector: Connector,
        dit,  # diffusers CosmosTransformer3DModel (wrapped here in a PackedCosmosDiT)
        vae: ImageAutoencoder,
        config: DuetGenConfig,
    ):
        super().__init__()
        problems = part_problems(
            mllm.config, tokenizer, image_processor, (connector.out_channels, connector.in_channels),
            dit.config, vae.latent_channels, vae.spatial_factor, config,
        )
        if problems:
            raise ValueError("DuetGen parts do not fit: " + "; ".join(problems))
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.mllm = mllm
        self.connector = connector
        tie_projection(dit, connector)
        self.dit = PackedCosmosDiT(dit, attention=config.dit_attention)
        self.vae = vae.requires_grad_(False)  # never trained: latents are data
        # Where the weights came from (saved in duetgen.json when not empty): `builder.assemble` records the source
        # directories and which MLLM the connector's pretrained projection was trained against
        self.provenance: dict = {}

    # ------------------------------------------------------------------ facts

    @property
    def transformer(self):
        """The stock diffusers CosmosTransformer3DModel (same modules as `dit`; saved as dit/)."""
        return self.dit.transformer

    @property
    def device(self) -> torch.device:
        return self.dit.proj_out.weight.device

    @property
    def pixel_multiple(self) -> int:
        """Image sides the DiT can draw are multiples of this: VAE factor x DiT patch (16 for Wan2.1 + Cosmos)."""
        return self.vae.spatial_factor * self.dit.patch_size[1]

    @property
    def max_image_side(self) -> tuple[int, int]:
        """The largest height and width the DiT can draw (its rotary positions end at ``max_size`` patches)."""
        _, max_h, max_w = self.dit.rope.max_size
        return (max_h * self.vae.spatial_factor * self.dit.patch_size[1],
                max_w * self.vae.spatial_factor * self.dit.patch_size[2])

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts per part (works on the meta device: nothing is allocated)."""
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        return {"mllm": count(self.mllm), "connector": count(self.connector), "dit": count(self.dit),
                "vae": count(self.vae)}

    # ------------------------------------------------------------------ parameter groups

    def generator_parameters(self) -> list[nn.Parameter]:
        """What stage 2 trains: connector + DiT (the stock crossattn_proj IS the connector: counted once)."""
        return list(self.connector.parameters()) + list(self.dit.parameters())

    def freeze_mllm(self) -> "DuetGen":
        """Stage 2: the MLLM gets no gradient (paper section 4.2)."""
        self.mllm.requires_grad_(False)
        self.mllm.eval()
        return self

    # ------------------------------------------------------------------ text condition

    def connect(self, states: Tensor) -> Tensor:
        """All-layer MLLM states (..., n_layers * D) -> the DiT's text condition (..., D_cross)."""
        return self.connector(states.to(self.connector.proj.weight.dtype))

    # ------------------------------------------------------------------ images <-> latents

    def generation_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) for drawing or training on an image of this size: aspect kept, sides multiples of
        `pixel_multiple`, at most `config.image_size` pixels in area (Qwen's smart_resize rule)."""
        m = self.pixel_multiple
        max_pixels = self.config.image_size[0] * self.config.image_size[1]
        return smart_resize(height, width, factor=m, min_pixels=m * m, max_pixels=max_pixels)

    def fit_image(self, image: Image.Image) -> Image.Image:
        """``image`` at its `generation_size` (bicubic; unchanged when it already fits): how the engine takes
        an earlier image as a conditioning frame and how stage 2 takes a dataset's images."""
        height, width = self.generation_size(image.height, image.width)
        return image if (width, height) == image.size else image.resize((width, height), Image.BICUBIC)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> list[Tensor]:
        """PIL images -> normalised latents, each (C, H / f, W / f) float32 on the model's device.

        Sides must be multiples of `pixel_multiple` (resize with `generation_size` first): an image the
        DiT cannot patchify is an error, not silently cropped.
        """
        pixels = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"image {i}: expected a PIL image; got {type(image).__name__}")
            width, height = image.size
            if height % self.pixel_multiple or width % self.pixel_multiple:
                raise ValueError(f"image {i}: size {width}x{height} is not a multiple of {self.pixel_multiple} "
                                 f"(VAE factor x DiT patch); resize it to DuetGen.generation_size first")
            array = np.asarray(to_rgb(image), dtype=np.uint8)  # (H, W, 3)
            pixels.append(uint8_to_unit(torch.from_numpy(array.copy()).permute(2, 0, 1)[None])[0].to(self.device))
        return self.vae.encode_list(pixels)  # per image (C, h, w)

    @torch.no_grad()
    def decode_latents(self, latents: Sequence[Tensor]) -> list[Image.Image]:
        """Latents (C, h, w) -> RGB PIL images of (h f, w f) pixels."""
        images = self.vae.decode_list([z.to(self.device) for z in latents])  # per image (3, H, W) in [-1, 1]
        return [Image.fromarray(unit_to_uint8(x[None])[0].permute(1, 2, 0).cpu().numpy()) for x in images]

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the directory layout of the module docstring, atomically (tmp dir + rename)."""
        from safetensors.torch import save_file

        target = Path(path)
        if self.tokenizer is None:
            raise ValueError(f"{target}: this model has no tokenizer (a random build of a preset whose tokenizer "
                             f"comes with real weights); assemble it with duetgen.models.builder.assemble to save it")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite (overwrite=True) to replace it")
        if target.exists() and not (target.is_dir() and ((target / SETTINGS_FILE).is_file() or not any(target.iterdir()))):
            raise FileExistsError(f"{target} is not a DuetGen model directory (no {SETTINGS_FILE}) nor empty; "
                                  "overwrite replaces only a model: write the model elsewhere")
        if target.exists() and Path.cwd().resolve().is_relative_to(target.resolve()):
            raise ValueError(f"{str(target)!r} is the folder you are in (or holds it): replacing it would leave the "
                             "shell in a deleted folder; write the model elsewhere")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self.mllm.save_pretrained(tmp / "mllm")  # safetensors
            self.tokenizer.save_pretrained(tmp / "mllm")
            self.image_processor.save_pretrained(tmp / "mllm")
            self.transformer.save_pretrained(tmp / "dit", safe_serialization=True)  # crossattn_proj = connector
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.connector.state_dict().items()}
            save_file(state, tmp / CONNECTOR_FILE, metadata={"format": "duetgen-connector",
                                                             "format_version": str(FORMAT_VERSION)})
            if isinstance(self.vae, WanImageVAE):
                self.vae.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            else:
                (tmp / "vae").mkdir()
                (tmp / "vae" / "config.json").write_text(json.dumps(vae_spec(self.vae), indent=2))
            settings = {"format_version": FORMAT_VERSION, "settings": self.config.to_dict()}
            if self.provenance:
                settings["provenance"] = self.provenance
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))  # last: marks the directory complete
            if target.exists():  # overwrite: move the old one aside, put the new one in place, drop the old one
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "model")
                os.replace(tmp, target)
                shutil.rmtree(old)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return target

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        expect=None,  # a presets.ModelPreset the directory must match (by name: duetgen.models.builder.load)
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,  # MLLM, connector and DiT; None = the MLLM's saved dtype for all three
        vae_dtype: torch.dtype = torch.float32,
    ) -> "DuetGen":
        """Load a directory written by `save_pretrained`; every check runs before any weight is read."""
        from diffusers import CosmosTransformer3DModel
        from safetensors.torch import load_file
        from transformers import Qwen2_5_VLForConditionalGeneration

        root = Path(path)
        parts = read_directory(root)
        if expect is not None:
            differences = preset_differences(parts, expect)
            if differences:
                name = expect.name
                listed = "; ".join(differences[:MAX_LISTED_DIFFERENCES])
                extra = len(differences) - MAX_LISTED_DIFFERENCES
                more = f" (and {extra} more)" if extra > 0 else ""
                raise ModelDirectoryError(f"{root}: the saved model (preset {parts.settings.preset!r}) does not match "
                                          f"preset {name!r}: {listed}{more}")

        mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            root / "mllm", dtype=dtype or "auto", local_files_only=True, use_safetensors=True
        )
        dit = CosmosTransformer3DModel.from_pretrained(  # same dtype as the MLLM (diffusers has no "auto")
            root / "dit", torch_dtype=dtype or mllm.dtype, local_files_only=True, use_safetensors=True
        )
        out_channels, in_channels = parts.connector_shape
        connector = Connector(in_channels, out_channels, recency_tokens=parts.connector_recency_tokens)
        connector.load_state_dict(load_file(root / CONNECTOR_FILE))  # keys and shapes checked in read_directory
        connector.to(dtype=dit.dtype)
        if parts.vae["_class_name"] == "AutoencoderKLWan":
            vae = WanImageVAE.from_pretrained(root / "vae", torch_dtype=vae_dtype)
        else:
            vae = build_vae(parts.vae)
        model = cls(mllm, parts.tokenizer, parts.image_processor, connector, dit, vae, parts.settings)
        model.provenance = parts.provenance
        return model.to(device)



# ----------------------------------------------------------------------------- reading a directory


@dataclass
class DirectoryParts:
    """What a DuetGen directory declares, read from JSON and safetensors headers only (no weights)."""

    settings: DuetGenConfig
    mllm_config: Any  # Qwen2_5_VLConfig
    tokenizer: Any
    image_processor: ImageProcessor
    dit_config: dict
    connector_shape: tuple[int, int]  # (out, in)
    vae: dict  # vae/config.json
    connector_recency_tokens: int = 0  # rows of connector recency.weight minus one (0: no marker)
    provenance: dict = field(default_factory=dict)  # duetgen.json "provenance" (DuetGen.provenance); {} if none


MAX_CONFIG_BYTES = 64 << 20  # a model directory's JSON files (Qwen2.5-VL's tokenizer.json: ~7 MB)


def read_directory(root: Path) -> DirectoryParts:
    """Read and cross-check a DuetGen directory's configs; ModelDirectoryError naming `root` on any problem."""
    from diffusers import CosmosTransformer3DModel
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError, safe_open
    from transformers import AutoTokenizer, Qwen2_5_VLConfig

    def fail(problem: str):
        raise ModelDirectoryError(f"{root}: {problem}")

    if not root.is_dir():
        fail("not a directory")
    required = [SETTINGS_FILE, "mllm/config.json", "mllm/preprocessor_config.json", "dit/config.json",
                CONNECTOR_FILE, "vae/config.json"]
    missing = [p for p in required if not (root / p).is_file()]
    if missing:
        fail(f"not a complete DuetGen directory: missing {', '.join(missing)}")
    for path in (p for sub in (".", "mllm", "dit", "vae") for p in sorted((root / sub).glob("*.json"))):
        if path.stat().st_size > MAX_CONFIG_BYTES:  # configs and tokenizers are read whole
            fail(f"{path.relative_to(root)} is {path.stat().st_size:,} bytes, over the cap of {MAX_CONFIG_BYTES:,}")
    if not ((root / "mllm" / "tokenizer.json").is_file()
            or all((root / "mllm" / n).is_file() for n in ("vocab.json", "merges.txt"))):
        fail("mllm/ has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): transformers would load a "
             "tokenizer of its special tokens only, and generation would write nothing")

    def read_object(name: str) -> dict:
        """A JSON file of the directory that must hold an object: read here first, so a malformed one is named
        rather than crashing the library that reads it next."""
        try:
            value = json.loads((root / name).read_text())
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep for the parser
            fail(f"{name} is not valid JSON ({e})")
        if not isinstance(value, dict):
            fail(f"{name} must hold a JSON object; got {type(value).__name__}")
        return value

    def check_weights(sub: str) -> None:
        """The part's *.safetensors: present, and each header readable and covering its file (no weight read)."""
        files = sorted((root / sub).glob("*.safetensors"))
        if not files:
            fail(f"{sub}/ holds no *.safetensors weights")
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError) as e:
                fail(f"{sub}/{path.name}: not a readable safetensors file ({e})")

    # duetgen.json
    saved = read_object(SETTINGS_FILE)
    if "format_version" not in saved or "settings" not in saved:
        fail(f"{SETTINGS_FILE} must hold format_version and settings")
    if saved["format_version"] != FORMAT_VERSION:
        fail(f"{SETTINGS_FILE} has format_version {saved['format_version']!r}; this DuetGen reads {FORMAT_VERSION}")
    try:
        settings = DuetGenConfig.from_dict(saved["settings"])
    except (ValueError, TypeError) as e:
        fail(f"{SETTINGS_FILE}: {e}")
    provenance = saved.get("provenance", {})
    if not isinstance(provenance, dict):
        fail(f"{SETTINGS_FILE}: provenance must be a JSON object; got {type(provenance).__name__}")

    # mllm/
    check_weights("mllm")
    check_weights("dit")
    for name in ("mllm/config.json", "mllm/preprocessor_config.json", "dit/config.json", "mllm/tokenizer.json",
                 "mllm/tokenizer_config.json", "mllm/vocab.json"):
        if (root / name).is_file():  # the tokenizer files are optional one by one
            read_object(name)
    try:
        mllm_config = Qwen2_5_VLConfig.from_pretrained(root / "mllm", local_files_only=True)
    except (ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as e:  # a field of the wrong type
        fail(f"mllm/config.json is not a readable Qwen2.5-VL config ({' '.join(str(e).split())})")  # one line
    if mllm_config.model_type != "qwen2_5_vl":
        fail(f"mllm/config.json has model_type {mllm_config.model_type!r}; expected 'qwen2_5_vl'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(root / "mllm", local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        fail(f"mllm/ has no loadable tokenizer ({e})")
    try:
        image_processor = ImageProcessor.from_pretrained(root / "mllm", max_side=None)
    except ValueError as e:  # names the file
        raise ModelDirectoryError(str(e)) from None

    # dit/
    try:
        dit_config = dict(CosmosTransformer3DModel.load_config(root / "dit"))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        fail(f"dit/config.json is not a readable diffusers config ({type(e).__name__}: {e})")
    if dit_config.get("_class_name") != "CosmosTransformer3DModel":
        fail(f"dit/config.json is a {dit_config.get('_class_name')!r}; expected 'CosmosTransformer3DModel'")
    dit_config = {**_cosmos_defaults(), **dit_config}

    # connector.safetensors: keys and shapes from the header
    try:
        connector_file = safe_open(root / CONNECTOR_FILE, framework="pt")
    except (SafetensorError, OSError) as e:
        fail(f"{CONNECTOR_FILE}: not a readable safetensors file ({e})")
    with connector_file as f:
        keys = sorted(f.keys())
        if keys not in (sorted(CONNECTOR_KEYS), sorted(CONNECTOR_KEYS + (RECENCY_KEY,))):
            fail(f"{CONNECTOR_FILE} holds {keys}; expected {list(CONNECTOR_KEYS)} (and optionally {RECENCY_KEY!r})")
        weight, bias = (tuple(f.get_slice(k).get_shape()) for k in CONNECTOR_KEYS)
        recency = tuple(f.get_slice(RECENCY_KEY).get_shape()) if RECENCY_KEY in keys else None
    if len(weight) != 2 or bias != weight[:1]:
        fail(f"{CONNECTOR_FILE}: proj.weight {weight} and proj.bias {bias} are not a Linear's shapes")
    if recency is not None and (len(recency) != 2 or recency[1] != weight[0] or recency[0] < 2):
        fail(f"{CONNECTOR_FILE}: {RECENCY_KEY} {recency} is not (K + 1, {weight[0]}) rows of the output width")

    # vae/
    vae = read_object("vae/config.json")
    if vae.get("_class_name") not in VAE_CLASSES:
        fail(f"vae/config.json _class_name is {vae.get('_class_name')!r}; expected one of {VAE_CLASSES}")
    if vae["_class_name"] == "AutoencoderKLWan":
        from diffusers import AutoencoderKLWan

        check_weights("vae")

        vae = {**dict(AutoencoderKLWan.load_config(root / "vae")), "_class_name": "AutoencoderKLWan"}
        vae = {**_wan_defaults(), **vae}
    latent_channels, spatial_factor = _vae_latent_shape(vae)

    problems = part_problems(mllm_config, tokenizer, image_processor, weight, dit_config, latent_channels,
                             spatial_factor, settings)
    if dit_config["use_crossattn_projection"] and dit_config["crossattn_proj_in_channels"] != weight[1]:
        problems.append(f"dit/ crossattn_proj takes {dit_config['crossattn_proj_in_channels']} channels but the "
                        f"connector {weight[1]} (dit/ and {CONNECTOR_FILE} come from different models)")
    if problems:
        fail("; ".join(problems))
    return DirectoryParts(settings, mllm_config, tokenizer, image_processor, dit_config, weight, vae,
                          connector_recency_tokens=0 if recency is None else recency[0] - 1, provenance=provenance)


def _cosmos_defaults() -> dict:
    """CosmosTransformer3DModel's constructor defaults (a saved config may omit fields added later)."""
    import inspect

    from diffusers import CosmosTransformer3DModel

    signature = inspect.signature(CosmosTransformer3DModel.__init__)
    return {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def _wan_defaults() -> dict:
    import inspect

    from diffusers import AutoencoderKLWan

    signature = inspect.signature(AutoencoderKLWan.__init__)
    return {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


# ----------------------------------------------------------------------------- matching a preset


MLLM_ARCHITECTURE_FIELDS = {
    "text_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size"),
    "vision_config": ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size",
                      "spatial_merge_size", "temporal_patch_size", "out_hidden_size"),
}


def preset_differences(parts: DirectoryParts, preset) -> list[str]:
    """How the declared architecture differs from a preset's (a presets.ModelPreset: MLLM shape, every DiT
    and VAE field)."""
    differences = []
    for sub, names in MLLM_ARCHITECTURE_FIELDS.items():
        saved, expected = getattr(parts.mllm_config, sub), getattr(preset.mllm, sub)
        for name in names:
            if _plain(getattr(saved, name)) != _plain(getattr(expected, name)):
                differences.append(f"mllm {sub}.{name} is {getattr(saved, name)}, expected {getattr(expected, name)}")
    for name, expected in preset.dit.items():
        if _plain(parts.dit_config.get(name)) != _plain(expected):
            differences.append(f"dit {name} is {parts.dit_config.get(name)}, expected {expected}")
    for name, expected in preset.vae.items():
        if _plain(parts.vae.get(name)) != _plain(expected):
            differences.append(f"vae {name} is {parts.vae.get(name)}, expected {expected}")
    return differences


def _plain(value):
    """JSON round trips turn tuples into lists: compare lists."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
