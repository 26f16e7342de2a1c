"""Packed sequences without a dense mask: causal SDPA per sample, for the MLLM's language model.

    use_packed_attention(mllm)           # the language model's attention becomes "duetgen_packed_sdpa"
    mllm(**packed_inputs(...))           # with cu_seq_lens_q / cu_seq_lens_k instead of a 4D mask

Stage 1 packs several conversations into one sequence. Handing SDPA a dense (T, T) block-diagonal
boolean mask makes it take its generic masked kernel over all T^2 pairs, most of them masked
(`benchmarks/train_throughput.py` measured packed only 1.07x padded this way). Here each sample's
slice of q, k, v goes through SDPA with ``is_causal=True`` and no mask, the fast path, and attention
work drops from T^2 to the sum of the samples' squares. The sample boundaries come as the
flash-attention keyword ``cu_seq_lens_q`` (cumulative lengths, [0, l1, l1 + l2, ...]), which
transformers passes from the model's forward down to every attention call.

Design choices:
- Registered through transformers' own `AttentionInterface` and selected per sub-config, so only the
  language model changes; the vision tower keeps its own attention (it already splits per image).
- No mask is built: an implementation name transformers has no mask function for gets ``None``.
- Without ``cu_seq_lens_q`` (generation, one sample) it is plain transformers SDPA, so a model left
  in this mode still decodes with a KV cache.
- Same numbers as the masked path up to float rounding (tests/test_mllm.py::test_packed_attention...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

PACKED_ATTENTION = "duetgen_packed_sdpa"


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (1, H, T, D), key / value (1, H_kv, T, D) of a packed sequence -> (1, T, H, D)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (1, H, T, D)
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q {bounds} does not cover the packed length {query.shape[2]}")
    p = dropout if module.training else 0.0
    out = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=p,
                                          is_causal=True, scale=scaling)  # (1, H, l_i, D)
           for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None  # (1, T, H, D)


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)


def use_packed_attention(mllm) -> None:
    """Switch the language model of a Qwen2.5-VL to per-sample causal SDPA (the vision tower is unchanged)."""
    mllm.config.text_config._attn_implementation = PACKED_ATTENTION
    mllm.model.language_model.config._attn_implementation = PACKED_ATTENTION


def uses_packed_attention(mllm) -> bool:
    return getattr(mllm.config.text_config, "_attn_implementation", None) == PACKED_ATTENTION
