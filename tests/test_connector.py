"""Connector: crossattn_proj semantics, init from the DiT's pretrained projection, export back into the DiT."""

from __future__ import annotations

import pytest
import torch
from diffusers import CosmosTransformer3DModel

from duetgen.models.connector import Connector
from duetgen.models.video_dit import PackedCosmosDiT, install_padding_mask_resize_shim, tiny_cosmos_config

install_padding_mask_resize_shim()


def make_dit(**overrides) -> CosmosTransformer3DModel:
    torch.manual_seed(0)
    return CosmosTransformer3DModel(**tiny_cosmos_config(**overrides)).eval()


def test_copies_the_pretrained_projection_when_widths_match():
    dit = make_dit()  # crossattn_proj: 48 -> 32
    connector = Connector.from_dit_projection(dit, in_channels=48)
    assert torch.equal(connector.proj.weight, dit.crossattn_proj[0].weight)
    assert torch.equal(connector.proj.bias, dit.crossattn_proj[0].bias)
    assert connector.proj.weight.data_ptr() != dit.crossattn_proj[0].weight.data_ptr()  # a copy, not shared
    x = torch.randn(2, 5, 48)
    assert torch.equal(connector(x), dit.crossattn_proj(x))  # same Linear + GELU semantics


def test_fresh_init_when_widths_differ():
    dit = make_dit()
    connector = Connector.from_dit_projection(dit, in_channels=40)  # another MLLM: 40 channels
    assert connector.proj.weight.shape == (32, 40)  # into the DiT's cross-attention width
    bound = 1 / 40**0.5  # nn.Linear default init
    assert connector.proj.bias.abs().max() <= bound and connector.proj.weight.abs().max() <= bound
    assert connector(torch.randn(3, 40)).shape == (3, 32)


def test_load_refuses_a_shape_mismatch_and_copies_nothing():
    dit = make_dit()
    connector = Connector(40, 32)
    before = connector.proj.weight.clone()
    with pytest.raises(ValueError, match=r"crossattn_proj\.0\.weight has shape \(32, 48\) but connector proj\.weight has \(32, 40\)"):
        connector.load_dit_projection(dit)
    assert torch.equal(connector.proj.weight, before)


def test_load_refuses_a_dit_without_projection():
    dit = make_dit(use_crossattn_projection=False)
    with pytest.raises(ValueError, match="DiT has no crossattn_proj.0.weight"):
        Connector(48, 32).load_dit_projection(dit)
    assert Connector.from_dit_projection(dit, 48).proj.weight.shape == (32, 48)  # fresh init instead


def test_rejects_features_of_the_wrong_width():
    with pytest.raises(ValueError, match="width 48"):
        Connector(48, 32)(torch.randn(2, 47))


def test_export_saves_a_dit_that_plain_diffusers_loads(tmp_path):
    """Train-time: connector (40 -> 32) replaces crossattn_proj (48 -> 32). After export the saved DiT loads in
    plain diffusers, and its STOCK forward on raw MLLM features equals the packed forward through the connector."""
    dit = make_dit()
    connector = Connector.from_dit_projection(dit, in_channels=40)
    with torch.no_grad():
        connector.proj.weight.normal_()  # stands for training

    connector.export_to_dit(dit)
    dit.save_pretrained(tmp_path)
    loaded = CosmosTransformer3DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.crossattn_proj_in_channels == 40
    assert torch.equal(loaded.crossattn_proj[0].weight, connector.proj.weight)

    raw = torch.randn(1, 6, 40)
    latents = torch.randn(1, 16, 2, 4, 6)
    cond = torch.tensor([True, False])
    timesteps = torch.tensor([0.0, 0.7])
    with torch.no_grad():
        stock = loaded(
            hidden_states=latents, timestep=timesteps.view(1, 1, 2, 1, 1), encoder_hidden_states=raw,
            condition_mask=cond.float().view(1, 1, 2, 1, 1).expand(1, 1, 2, 4, 6),
            padding_mask=torch.zeros(1, 1, 32, 48), return_dict=False,
        )[0]
        packed = PackedCosmosDiT(dit)([list(latents[0].unbind(1))], [timesteps], [cond], [connector(raw[0])])
    assert max((p - s).abs().max().item() for p, s in zip(packed[0], stock[0].unbind(1))) < 1e-5


def test_export_refuses_a_connector_of_another_output_width():
    with pytest.raises(ValueError, match="text_embed_dim=32"):
        Connector(48, 24).export_to_dit(make_dit())


def test_recency_marker_adds_a_row_per_distance_to_the_bov_and_starts_as_a_no_op():
    torch.manual_seed(0)
    plain, marked = Connector(12, 8), Connector(12, 8, recency_tokens=3)
    marked.proj.load_state_dict(plain.proj.state_dict())
    h = torch.randn(6, 12)
    torch.testing.assert_close(marked(h), plain(h))  # zero rows: no change at init
    with torch.no_grad():
        marked.recency.weight.copy_(torch.arange(4, dtype=torch.float32)[:, None].expand(4, 8))
    diff = marked(h) - plain(h)  # row min(d, 3) for the token d places before the <BOV>
    torch.testing.assert_close(diff[:, 0], torch.tensor([3.0, 3.0, 3.0, 2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="recency_tokens"):
        Connector(12, 8, recency_tokens=-1)


def test_recency_marker_is_saved_with_the_connector_and_loaded_back(tmp_path):
    from dataclasses import replace

    from duetgen.models.duetgen import DuetGen
    from duetgen.models.builder import build

    model = build("tiny")
    marked = Connector(model.connector.in_channels, model.connector.out_channels, recency_tokens=4)
    with torch.no_grad():
        marked.recency.weight.normal_()
    model = DuetGen(model.mllm, model.tokenizer, model.image_processor, marked, model.transformer, model.vae,
                    replace(model.config))
    loaded = DuetGen.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.connector.recency_tokens == 4
    torch.testing.assert_close(loaded.connector.recency.weight, marked.recency.weight)
    h = torch.randn(7, model.connector.in_channels)
    torch.testing.assert_close(loaded.connect(h), model.connect(h))
