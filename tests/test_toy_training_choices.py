"""The ShapeWorld-specific training choices of docs/training.md ("what made it train"), each checked.

- the toy MLLM sees a canvas at 48x48 with white as the normalisation mean: 9 tokens, one per grid
  cell, and an empty cell is exactly zero;
- the vision tower trains at a scaled learning rate (`make_adamw(lr_scales=...)`);
- the toy DiT has learnable absolute positions, initialised at random (diffusers makes them zeros);
- the optional change-weighted flow-matching loss is a weighted mean.
"""

from __future__ import annotations

import pytest
import torch

from duetgen.diffusion.flow_matching import dit_sample_inputs, flow_matching_loss
from duetgen.models.mllm import TOY_MLLM_SIDE, toy_image_processor, tiny_qwen2_5_vl_config
from duetgen.shapeworld.world import POSITIONS, Piece, Scene, render
from duetgen.train.optim import make_adamw, make_scheduler


def _tokens(pixel_values: torch.Tensor) -> torch.Tensor:
    """(9, 4 * C*T*P*P): the processor emits the 4 patches of each merged 2x2 window together."""
    return pixel_values.reshape(9, -1)


def test_toy_processor_gives_one_token_per_cell_and_zero_for_empty_cells():
    processor = toy_image_processor()
    pixels, grid = processor([render(Scene())])
    assert TOY_MLLM_SIDE == 48
    assert grid.tolist() == [[1, 6, 6]]  # 6x6 patches of 8 px -> 3x3 merged tokens
    assert torch.count_nonzero(pixels) == 0  # white is the mean: an empty canvas is all zero
    for j, position in enumerate(POSITIONS):
        pixels, _ = processor([render(Scene((Piece("red", "circle", position),)))])
        nonzero = [k for k, row in enumerate(_tokens(pixels)) if torch.count_nonzero(row) > 0]
        assert nonzero == [j], f"{position}: the piece should light token {j} only, got {nonzero}"


def test_lr_scales_put_matching_parameters_in_their_own_groups_and_the_schedule_keeps_the_ratio():
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(vocab_size=300))
    opt = make_adamw(model, lr=1e-3, weight_decay=0.01, lr_scales={"visual.": 0.1})
    visual = {id(p) for p in model.model.visual.parameters()}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= visual or not (ids & visual), "a group mixes vision and language parameters"
        assert group["lr"] == pytest.approx(1e-4 if ids <= visual else 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    sched = make_scheduler(opt, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    for _ in range(5):
        opt.step(), sched.step()
    lrs = {round(g["lr"] / g["initial_lr"], 9) for g in opt.param_groups}
    assert len(lrs) == 1  # every group is on the same multiplier
    with pytest.raises(ValueError, match="lr_scales"):
        make_adamw(model, lr=1e-3, lr_scales={"visual.": 0.0})


def _token_spread(extra_pos_embed_type) -> float:
    """Mean distance of each patch token's output from the mean token, for a constant (blank) frame."""
    from diffusers import CosmosTransformer3DModel

    from duetgen.models.video_dit import PackedCosmosDiT, tiny_cosmos_config
    from duetgen.models.video_dit import init_learnable_positions

    torch.manual_seed(0)
    dit = CosmosTransformer3DModel(**tiny_cosmos_config(extra_pos_embed_type=extra_pos_embed_type))
    init_learnable_positions(dit)
    frames, times, mask = dit_sample_inputs([], torch.ones(16, 8, 8), 0.5)
    text = torch.randn(5, tiny_cosmos_config()["encoder_hidden_states_channels"])  # after the connector
    with torch.no_grad():
        out = PackedCosmosDiT(dit).eval()(frames=[frames], timesteps=[times], condition_mask=[mask], text=[text],
                                           targets_only=True)[0][0]  # (16, 8, 8)
    tokens = out.reshape(16, 4, 2, 4, 2).permute(1, 3, 0, 2, 4).reshape(16, -1)  # one row per 2x2 patch token
    return float((tokens - tokens.mean(0)).norm(dim=1).mean())


def test_learnable_positions_are_random_and_let_the_dit_tell_where_a_token_is_on_a_blank_canvas():
    from diffusers import CosmosTransformer3DModel

    from duetgen.models.video_dit import tiny_cosmos_config
    from duetgen.models.video_dit import init_learnable_positions

    dit = CosmosTransformer3DModel(**tiny_cosmos_config(extra_pos_embed_type="learnable"))
    pe = dit.learnable_pos_embed
    assert torch.count_nonzero(pe.pos_emb_h) == 0  # diffusers' zeros
    init_learnable_positions(dit)
    assert all(torch.count_nonzero(t) == t.numel() for t in (pe.pos_emb_t, pe.pos_emb_h, pe.pos_emb_w))
    # Rope alone is relative: on a constant frame every token computes the same thing, so "draw it at
    # the top left" has nowhere to go. Absolute positions break that symmetry.
    assert _token_spread(None) < 1e-4
    assert _token_spread("learnable") > 0.1


def test_change_weighted_loss_is_a_weighted_mean():
    torch.manual_seed(0)
    x0, noise, raw = torch.randn(3, 4, 4), torch.randn(3, 4, 4), torch.randn(3, 4, 4)
    t = torch.tensor(0.5)
    plain = flow_matching_loss(raw, x0, noise, t, "x0")
    assert torch.allclose(flow_matching_loss(raw, x0, noise, t, "x0", weight=torch.ones(3, 4, 4)), plain)
    weight = torch.ones(3, 4, 4)
    weight[:, :2] = 5.0
    err = ((x0 - raw) / 0.5) ** 2  # x0 parameterisation: (x0 - x0_hat) / t
    expected = (weight * err).sum() / weight.sum()
    assert torch.allclose(flow_matching_loss(raw, x0, noise, t, "x0", weight=weight), expected, atol=1e-6)


def test_fresh_vision_tower_keeps_the_language_model_and_replaces_the_vision_tower(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from duetgen.models.image_processor import ImageProcessor
    from duetgen.models.mllm import toy_qwen2_5_vl_config
    from duetgen.models.tokenizer import build_tokenizer, shapeworld_corpus
    from duetgen.train.stage1 import fresh_vision_tower, save_mllm

    tok = build_tokenizer(tmp_path / "tok", shapeworld_corpus(), vocab_size=512)
    torch.manual_seed(123)
    old = Qwen2_5_VLForConditionalGeneration(toy_qwen2_5_vl_config(len(tok)))
    old_processor = ImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=256,
                                   max_pixels=128 * 128, max_side=128)  # the first run's CLIP-normalised 64 px view
    save_mllm(old, tok, old_processor, tmp_path / "old")
    out = fresh_vision_tower(tmp_path / "old", tmp_path / "new", seed=0)
    new = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    language = [k for k in old_sd if ".visual." not in k and not k.startswith("model.visual")]
    vision = [k for k in old_sd if k.startswith("model.visual")]
    assert language and vision
    assert all(torch.equal(old_sd[k], new_sd[k]) for k in language)
    assert not any(torch.equal(old_sd[k], new_sd[k]) for k in vision if old_sd[k].ndim >= 2)
    processor = ImageProcessor.from_pretrained(out)
    assert (processor.max_side, processor.image_mean) == (TOY_MLLM_SIDE, (1.0, 1.0, 1.0))
