"""Connector: MLLM hidden states -> the DiT's cross-attention width.

The text condition of an image is the MLLM's per-layer hidden states before its `<BOV>`, each layer
normalised per token and all layers concatenated on the channel axis (DESIGN section 4; paper
section 4.1, "Condition input", following Wang et al.). The connector IS Cosmos-Predict2.5's
`crossattn_proj`, lifted out of the DiT: same recipe and same width (28 x 3584 = 100,352 channels for
a Qwen2.5-VL-7B-architecture MLLM), so the pretrained projection can initialise it. It is not the
condition that projection was trained on: Cosmos trained it on Cosmos-Reason1-7B (a Qwen2.5-VL-7B
fine-tune) states of one caption in its own system-prompt framing, right-padded to 512 tokens without
an attention mask, text only, with an all-zero unconditional embedding; we feed Qwen2.5-VL states of
a multi-turn conversation cut before `<BOV>`, unpadded, with vision tokens. Stage 2 re-trains the
connector for that. `duetgen.models.cosmos_predict` reproduces Cosmos' framing, to check an assembly
of real weights (docs/model.md, "Real weights").

Design choices:
- Exactly `crossattn_proj` semantics: `Linear(in_channels, out_channels, bias=True)` then exact
  (erf) `GELU`, as `CosmosTransformer3DModel` builds it; out_channels is the DiT's cross-attention
  width (`text_embed_dim`). The per-layer normalisation and concatenation happen where the hidden
  states are read (the MLLM side), not here.
- Initialisation (`Connector.from_dit_projection`): when the MLLM's n_layers x width equals the
  DiT's pretrained `crossattn_proj_in_channels` (same width, not the same features: above), the
  pretrained weights are copied through an
  explicit key map with shape checks (`load_dit_projection`, which raises on any mismatch). Otherwise
  the connector starts fresh with PyTorch's default `nn.Linear` init (Kaiming-uniform weight, bias
  uniform in +-1/sqrt(in_channels)): a pretrained projection from different features is no better a
  start, and the choice is logged.
- The connector REPLACES the DiT's `crossattn_proj` while training: the packed DiT forward takes text
  already in the cross-attention width and never calls the DiT's own projection (which gets no
  gradient). `export_to_dit` writes the connector back into the DiT (weights, and the config fields
  `use_crossattn_projection`, `crossattn_proj_in_channels`, `encoder_hidden_states_channels`), so the
  saved DiT directory loads in plain `CosmosTransformer3DModel.from_pretrained` and its stock forward
  accepts the same MLLM features the connector was trained on.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# connector parameter <- CosmosTransformer3DModel parameter (its `crossattn_proj` is Sequential(Linear, GELU))
DIT_PROJECTION_KEY_MAP = {
    "proj.weight": "crossattn_proj.0.weight",
    "proj.bias": "crossattn_proj.0.bias",
}


class Connector(nn.Module):
    """Linear + GELU from concatenated MLLM hidden states to the DiT's cross-attention width, plus an
    optional learned marker of each token's distance to the image it conditions.

    ``recency_tokens`` = K > 0 adds ``recency.weight[min(d, K)]`` to the output of the token d places
    before the `<BOV>` (d = 0 for the last token; every token K or more places back shares the last row).
    Why: in a how-to answer the current step's words are ~4% of the condition and nothing told the DiT
    which step is the current one (shared/notes/shapeworld-image-diagnosis.md); the step sentence is
    always the last few tokens before the `<BOV>`. Rows start at zero, so the marker begins as a no-op.
    The input must therefore end right before the `<BOV>`; the guidance negative is a prefix slice of
    the OUTPUT (the engine and stage 2 both slice after the connector), so its rows carry the distances
    of the full condition. The stock DiT's `crossattn_proj` (`export_to_dit`) has no such rows: a plain
    diffusers user of `dit/` gets the condition without the marker (docs/model.md).
    """

    def __init__(self, in_channels: int, out_channels: int, recency_tokens: int = 0):
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"Connector widths must be positive; got in={in_channels}, out={out_channels}")
        if recency_tokens < 0:
            raise ValueError(f"recency_tokens must be >= 0; got {recency_tokens}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.recency_tokens = recency_tokens
        self.proj = nn.Linear(in_channels, out_channels, bias=True)
        self.activation = nn.GELU()  # exact (erf) GELU, as crossattn_proj
        if recency_tokens:
            self.recency = nn.Embedding(recency_tokens + 1, out_channels)
            nn.init.zeros_(self.recency.weight)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(..., L, in_channels) -> (..., L, out_channels); the last of the L tokens is the one before the `<BOV>`."""
        if hidden_states.shape[-1] != self.in_channels:
            raise ValueError(
                f"Connector expects features of width {self.in_channels} (MLLM n_layers x width); "
                f"got shape {tuple(hidden_states.shape)}"
            )
        out = self.activation(self.proj(hidden_states))  # (..., L, D_cross)
        if self.recency_tokens:
            length = hidden_states.shape[-2]
            distance = torch.arange(length - 1, -1, -1, device=out.device).clamp(max=self.recency_tokens)  # (L,)
            out = out + self.recency(distance).to(out.dtype)  # (L, D_cross), broadcast over leading dims
        return out

    @classmethod
    def from_dit_projection(cls, dit: nn.Module, in_channels: int, recency_tokens: int = 0) -> "Connector":
        """A connector for `dit` fed `in_channels` MLLM features: the DiT's pretrained `crossattn_proj`
        when its input width matches, else a fresh one (module docstring); a fresh step marker if asked."""
        out_channels = dit.config.text_embed_dim
        connector = cls(in_channels, out_channels, recency_tokens).to(device=dit.device, dtype=dit.dtype)
        if dit.config.use_crossattn_projection and dit.config.crossattn_proj_in_channels == in_channels:
            connector.load_dit_projection(dit)
            logger.info("connector: copied the DiT's pretrained crossattn_proj (%d -> %d)", in_channels, out_channels)
        else:
            pretrained = dit.config.crossattn_proj_in_channels if dit.config.use_crossattn_projection else None
            logger.info(
                "connector: fresh init (%d -> %d); the DiT's crossattn_proj input width is %s",
                in_channels, out_channels, pretrained,
            )
        return connector

    @torch.no_grad()
    def load_dit_projection(self, dit: nn.Module) -> None:
        """Copy the DiT's `crossattn_proj` into this connector through `DIT_PROJECTION_KEY_MAP`.

        Raises a ValueError naming the key and both shapes if anything is missing or mis-shaped; nothing
        is copied unless every key fits.
        """
        source = dit.state_dict()
        target = self.state_dict()
        problems = []
        for ours, theirs in DIT_PROJECTION_KEY_MAP.items():
            if theirs not in source:
                problems.append(f"DiT has no {theirs} (config use_crossattn_projection={dit.config.use_crossattn_projection})")
            elif source[theirs].shape != target[ours].shape:
                problems.append(
                    f"DiT {theirs} has shape {tuple(source[theirs].shape)} but connector {ours} has "
                    f"{tuple(target[ours].shape)}"
                )
        if problems:
            raise ValueError(
                f"cannot initialise the connector ({self.in_channels} -> {self.out_channels}) from the DiT's "
                f"crossattn_proj: " + "; ".join(problems)
            )
        for ours, theirs in DIT_PROJECTION_KEY_MAP.items():
            target[ours].copy_(source[theirs])

    @torch.no_grad()
    def export_to_dit(self, dit: nn.Module) -> None:
        """Make the DiT's `crossattn_proj` this connector (weights and config), ready for `save_pretrained`."""
        if dit.config.text_embed_dim != self.out_channels:
            raise ValueError(
                f"connector output width {self.out_channels} != the DiT's cross-attention width "
                f"text_embed_dim={dit.config.text_embed_dim}"
            )
        linear = nn.Linear(self.in_channels, self.out_channels, bias=True, device=dit.device, dtype=dit.dtype)
        linear.weight.copy_(self.proj.weight)
        linear.bias.copy_(self.proj.bias)
        dit.crossattn_proj = nn.Sequential(linear, nn.GELU())
        dit.register_to_config(
            use_crossattn_projection=True,
            crossattn_proj_in_channels=self.in_channels,
            encoder_hidden_states_channels=self.out_channels,
        )
