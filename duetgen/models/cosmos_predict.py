"""Cosmos-Predict2.5 as its makers ran it: the text framing its DiT was trained on, and its pipeline directory.

DuetGen feeds the DiT the MLLM's states of a whole conversation up to `<BOV>` (DESIGN section 4). The
pretrained Cosmos-Predict2.5 DiT was trained on something else, and its `crossattn_proj` (our
connector) only means what it was trained to mean under that framing:

- text encoder: Cosmos-Reason1-7B, a Qwen2.5-VL-7B fine-tune (`text_encoder_class="reason1p1_7B"` in
  nvidia-cosmos/cosmos-predict2.5's checkpoint table; diffusers' convert script defaults
  `--text_encoder_path nvidia/Cosmos-Reason1-7B`, with Qwen2.5-VL-7B-Instruct's tokenizer);
- framing: one system turn ("You are a helpful assistant who will provide prompts to an image
  generator.") and one user turn holding the caption, text only, no generation prompt;
- 512 tokens: truncated to 512, right-padded with the pad token to 512, and NO attention mask, so the
  pad tokens' states are part of the condition and the DiT attends to them;
- all-layer states `hidden_states[1:]`, each normalised per token, concatenated (the same recipe as
  ours: `duetgen.models.mllm.layer_states`);
- unconditional branch: an all-zero embedding (Cosmos drops the text to zeros in training); diffusers'
  pipeline encodes a negative prompt instead unless given `negative_prompt_embeds`;
- conditioning latent frames carry flow time 1e-4 (`COSMOS_CONDITION_FRAME_TIME`), not 0.

`DuetGenConfig.framing = "cosmos"` (or `duetgen generate --framing cosmos`) draws one image from one
caption (and at most one earlier image as a conditioning frame) exactly this way: with the weights of a
Cosmos-Predict2.5 pipeline directory assembled by `duetgen.models.builder.assemble_from_pipeline`, our model then reproduces
the stock diffusers pipeline (tests/test_cosmos_equivalence.py: final latents within 1e-4), which tells
a user that the assembly is right before any GPU-day is spent.

Design choices:
- The prompt ids are built from pieces, split where a tokenizer splits around special tokens: `<|im_start|>`
  + "system\\n" + prompt + `<|im_end|>` + "\\n" + `<|im_start|>` + "user\\n" + caption + `<|im_end|>` + "\\n".
  For any caption without special-token text this is, id for id, what Qwen's chat template gives (the
  pipeline calls `apply_chat_template`); a caption that spells `<|im_end|>` stays text here
  (`split_special_tokens`, as for every record text), where Cosmos would read the special token.
- Padding is always on the right, whatever the tokenizer's `padding_side` (the diffusers pipeline uses
  the tokenizer's side; Qwen's tokenizer and ours pad right).
- A pipeline directory is checked from its JSON configs before any weight is read: missing parts, the
  pipeline class, the DiT and VAE configs against a preset, the text encoder's n_layers x width against
  the DiT's `crossattn_proj`, and the scheduler against our Karras schedule. Every problem names the file
  and the field (`PipelineDirectoryError`). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from duetgen.models.duetgen import ModelDirectoryError, _plain

COSMOS_SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
COSMOS_MAX_TOKENS = 512  # prompts are truncated / right-padded to this length, without an attention mask
COSMOS_TEXT_ENCODER = "Cosmos-Reason1-7B"  # what Cosmos-Predict2.5's crossattn_proj was trained against
PIPELINE_CLASS = "Cosmos2_5_PredictBasePipeline"  # diffusers' class in model_index.json
PIPELINE_PARTS = {  # folder -> the file that must be in it
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "transformer": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
}
PROCESSOR_FOLDERS = ("processor", "tokenizer", "text_encoder")  # where a snapshot may keep preprocessor_config.json
# scheduler_config.json fields that must hold for our "karras" schedule + UniPC (duetgen.diffusion.sampling)
COSMOS_SCHEDULER = {"use_karras_sigmas": True, "use_flow_sigmas": True, "prediction_type": "flow_prediction",
                    "sigma_max": 200.0, "sigma_min": 0.01}


class PipelineDirectoryError(ModelDirectoryError):
    """A diffusers Cosmos-Predict2.5 pipeline directory is missing a part or has a part that does not fit."""


# ----------------------------------------------------------------------------- the text framing


def cosmos_prompt_ids(tokenizer, caption: str, max_tokens: int = COSMOS_MAX_TOKENS) -> Tensor:
    """(max_tokens,) int64: the Cosmos framing of `caption`, truncated and right-padded with the pad token."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; Cosmos pads its prompts to "
                         f"{max_tokens} tokens with it (Qwen's is <|endoftext|>)")

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False, split_special_tokens=True)

    im_start, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    ids = ([im_start] + text("system\n" + COSMOS_SYSTEM_PROMPT) + [im_end] + text("\n")
           + [im_start] + text("user\n" + caption) + [im_end] + text("\n"))
    ids = ids[:max_tokens] + [tokenizer.pad_token_id] * max(max_tokens - len(ids), 0)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def cosmos_text_states(mllm, input_ids: Tensor) -> Tensor:
    """(L, n_layers * D): the normalised all-layer states of the padded prompt, no attention mask."""
    from duetgen.models.mllm import layer_states, rope_position_ids

    ids = input_ids.to(mllm.device)
    outputs = mllm.model(input_ids=ids[None], position_ids=rope_position_ids(mllm, ids, None)[:, None],
                         output_hidden_states=True, use_cache=False)  # text only: t = h = w = 0..L-1
    return layer_states(outputs.hidden_states)[0]  # (L, n_layers * D)


@torch.no_grad()
def cosmos_condition(model, caption: str) -> tuple[Tensor, Tensor]:
    """(positive, negative), each (512, D_cross): the caption's condition and the all-zero embedding's,
    both through the connector (as the stock DiT runs its crossattn_proj on zeros)."""
    states = cosmos_text_states(model.mllm, cosmos_prompt_ids(model.tokenizer, caption))  # (512, n_layers * D)
    return model.connect(states), model.connect(torch.zeros_like(states))


# ----------------------------------------------------------------------------- the pipeline directory


@dataclass
class PipelineDirectory:
    """The parts of a diffusers Cosmos-Predict2.5 pipeline directory, checked from their configs."""

    root: Path
    text_encoder: Path
    tokenizer: Path
    processor: Path  # the folder holding preprocessor_config.json
    transformer: Path
    vae: Path
    scheduler_config: dict
    model_index: dict


def read_pipeline_directory(root: str | os.PathLike, processor_dir: str | os.PathLike | None = None,
                            expect=None) -> PipelineDirectory:
    """Check a pipeline directory from its JSON files; PipelineDirectoryError naming the file and field.

    expect: a preset name or `presets.ModelPreset` whose MLLM, DiT and VAE architecture the parts must
    have (None: only the checks that do not need one).
    """
    from huggingface_hub.errors import StrictDataclassError  # transformers 5 config validation errors
    from transformers import Qwen2_5_VLConfig

    from duetgen.models import presets
    from duetgen.models.duetgen import MLLM_ARCHITECTURE_FIELDS

    root = Path(root)

    def fail(problems: list[str]):
        raise PipelineDirectoryError(f"{root}: " + "; ".join(problems))

    if not root.is_dir():
        fail(["not a directory"])
    index_file = root / "model_index.json"
    if not index_file.is_file():
        fail([f"no model_index.json: not a diffusers pipeline directory (expected a {PIPELINE_CLASS} snapshot)"])
    model_index = _read_json(index_file, root)
    if model_index.get("_class_name") != PIPELINE_CLASS:
        fail([f"model_index.json _class_name is {model_index.get('_class_name')!r}; expected {PIPELINE_CLASS!r}"])
    missing = [f"{folder}/{file}" for folder, file in PIPELINE_PARTS.items() if not (root / folder / file).is_file()]
    if missing:
        fail([f"missing {', '.join(missing)} (a {PIPELINE_CLASS} directory has text_encoder/, tokenizer/, "
              f"transformer/, vae/ and scheduler/)"])
    if processor_dir is not None:
        processor = Path(processor_dir)
        if not (processor / "preprocessor_config.json").is_file():
            raise PipelineDirectoryError(f"{processor}: no preprocessor_config.json (given as the processor directory)")
    else:
        found = [root / f for f in PROCESSOR_FOLDERS if (root / f / "preprocessor_config.json").is_file()]
        if not found:
            fail([f"no preprocessor_config.json in {', '.join(f + '/' for f in PROCESSOR_FOLDERS)}: the text "
                  "encoder's image processor is not in this snapshot; pass a directory holding one (e.g. "
                  "Qwen2.5-VL-7B-Instruct's or Cosmos-Reason1-7B's) as the processor directory (--processor)"])
        processor = found[0]

    problems = []
    preset = presets.get_preset(expect) if isinstance(expect, str) else expect
    dit = _read_json(root / "transformer" / "config.json", root)
    if dit.get("_class_name") != "CosmosTransformer3DModel":
        problems.append(f"transformer/config.json _class_name is {dit.get('_class_name')!r}; expected "
                        "'CosmosTransformer3DModel'")
    if not dit.get("use_crossattn_projection"):
        problems.append("transformer/config.json use_crossattn_projection is not true: the DiT has no "
                        "crossattn_proj to initialise the connector from")
    vae = _read_json(root / "vae" / "config.json", root)
    if vae.get("_class_name") != "AutoencoderKLWan":
        problems.append(f"vae/config.json _class_name is {vae.get('_class_name')!r}; expected 'AutoencoderKLWan'")
    try:
        text = Qwen2_5_VLConfig.from_pretrained(root / "text_encoder", local_files_only=True)
    except (ValueError, TypeError, OSError, StrictDataclassError) as e:
        fail([f"text_encoder/config.json is not a Qwen2.5-VL config transformers accepts ({e})"])
    if text.model_type != "qwen2_5_vl":
        problems.append(f"text_encoder/config.json model_type is {text.model_type!r}; expected 'qwen2_5_vl'")
    else:
        layers, width = text.text_config.num_hidden_layers, text.text_config.hidden_size
        if dit.get("use_crossattn_projection") and layers * width != dit.get("crossattn_proj_in_channels"):
            problems.append(f"text_encoder/config.json text_config num_hidden_layers x hidden_size = {layers} x "
                            f"{width} = {layers * width} does not fit the connector (transformer/config.json "
                            f"crossattn_proj_in_channels = {dit.get('crossattn_proj_in_channels')})")
    if preset is not None:
        for name, expected in preset.dit.items():
            if name in dit and _plain(dit[name]) != _plain(expected):
                problems.append(f"transformer/config.json {name} is {dit[name]}, expected {expected} "
                                f"(preset {preset.name!r})")
            elif name not in dit:
                problems.append(f"transformer/config.json has no {name} (preset {preset.name!r}: {expected})")
        for name, expected in preset.vae.items():
            if name != "_class_name" and _plain(vae.get(name)) != _plain(expected):
                problems.append(f"vae/config.json {name} is {vae.get(name)}, expected {expected} (preset {preset.name!r})")
        for sub, names in MLLM_ARCHITECTURE_FIELDS.items():
            for name in names:
                saved, wanted = getattr(getattr(text, sub), name), getattr(getattr(preset.mllm, sub), name)
                if _plain(saved) != _plain(wanted):
                    problems.append(f"text_encoder/config.json {sub}.{name} is {saved}, expected {wanted} "
                                    f"(preset {preset.name!r})")
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json", root)
    if scheduler.get("_class_name") != "UniPCMultistepScheduler":
        problems.append(f"scheduler/scheduler_config.json _class_name is {scheduler.get('_class_name')!r}; "
                        "expected 'UniPCMultistepScheduler'")
    for name, expected in COSMOS_SCHEDULER.items():
        if scheduler.get(name) != expected:
            problems.append(f"scheduler/scheduler_config.json {name} is {scheduler.get(name)!r}, expected "
                            f"{expected!r} (the schedule duetgen.diffusion.sampling's 'karras' reproduces)")
    if problems:
        fail(problems)
    return PipelineDirectory(root, root / "text_encoder", root / "tokenizer", processor, root / "transformer",
                             root / "vae", scheduler, model_index)




def _read_json(path: Path, root: Path, cap: int = 64 << 20) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(cap + 1)  # bounded: a pipeline folder may come from anywhere
    except OSError as e:
        raise PipelineDirectoryError(f"{root}: {path.relative_to(root)} cannot be read ({e.strerror})") from None
    if len(raw) > cap:
        raise PipelineDirectoryError(f"{root}: {path.relative_to(root)} is over the cap of {cap:,} bytes")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:  # (UTF-8, JSON, a 4,300-digit integer, deep nesting)
        raise PipelineDirectoryError(f"{root}: {path.relative_to(root)} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise PipelineDirectoryError(f"{root}: {path.relative_to(root)} must hold a JSON object")
    return value
