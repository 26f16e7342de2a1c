"""LoRA on the MLLM's language model (stage 1 option, issue 4), through peft.

    lora = add_lora(model, rank=16, alpha=32, dropout=0.0, train_embeddings=True)  # wraps `model` in place
    ...train `model` as usual...
    plain = merge_lora(lora)  # the same Qwen2.5-VL class, LoRA folded into the weights, no peft keys

Design choices:
- Targets are chosen by a regex on module names, not by the names `q_proj`/`gate_proj`/...: the
  Qwen2.5-VL vision tower has `mlp.gate_proj/up_proj/down_proj` too, and stage 1 adapts the language
  model only (the vision tower is frozen under LoRA).
- `get_peft_model` replaces the target Linears inside the given model object, so callers keep using
  that object (its forward, `.device`, `get_rope_index`) and the PeftModel is only needed to merge.
- `<BOV>` is a new token whose input row and output row start random (`duetgen.models.mllm.add_bov`),
  so they must learn. `train_embeddings=True` keeps the whole `embed_tokens` and `lm_head` trainable
  (plain `requires_grad`, no peft `modules_to_save` copy): the state dict keeps its names, the merge
  needs nothing special, and on toy models the whole vocabulary is new anyway. On a 7B model this adds
  2 x 152k x 3584 = 1.1B trained parameters (plus AdamW state); `False` freezes them (then `<BOV>`
  keeps its initial rows; peft's `trainable_token_indices` would train those rows only).
- Checkpoints hold the full state (base + LoRA tensors, peft's names inside the wrapped model), so
  the existing resume path loads them into a model wrapped the same way before `resume`.
"""

from __future__ import annotations

from torch import nn

# q/k/v/o and the SwiGLU MLP of every language-model layer; never the vision tower's MLP.
LANGUAGE_MODEL_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, train_embeddings: bool = True):
    """Wrap the language model's Linears with LoRA (in place); returns the PeftModel (for `merge_lora`).

    Afterwards only the LoRA matrices (and, with ``train_embeddings``, `embed_tokens` and `lm_head`)
    require grad.
    """
    import peft

    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LANGUAGE_MODEL_TARGETS)
    lora = peft.get_peft_model(model, config)  # freezes everything but the LoRA matrices
    if train_embeddings:
        model.get_input_embeddings().requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    return lora


def merge_lora(lora) -> nn.Module:
    """The wrapped model with LoRA folded into its weights and the peft layers removed (plain transformers)."""
    return lora.merge_and_unload()


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name
