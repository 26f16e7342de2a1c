"""Stage 2: frozen MLLM, connector + DiT with rectified flow (tiny random models, real ShapeWorld records)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from duetgen.data.dataset import Dataset
from duetgen.data.record import ImagePart, Message, TextPart
from duetgen.diffusion.flow_matching import FlowMatchingConfig
from duetgen.infer.teacher_forcing import draw_teacher_forced
from duetgen.models.builder import load, load_mllm
from duetgen.models.mllm import all_layer_states, negative_prefix_length
from duetgen.shapeworld.evaluate import evaluate_toy
from duetgen.shapeworld.world import generate
from duetgen.train import stage1, stage2
from duetgen.train.common import load_records, render
from duetgen.train.configs import tiny_stage1, tiny_stage2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2")
    generate(root / "train", 40, seed=0, split="train", progress=False)
    generate(root / "test", 5, seed=1, split="test", kinds=["how-to", "editing", "understanding"], progress=False)
    cfg1 = dataclasses.replace(tiny_stage1(), data=[str(root / "train")], steps=2, warmup_steps=1, sample_every=100)
    mllm_dir = stage1.train(cfg1, root / "stage1", progress=False)
    return root, mllm_dir


def _models(mllm_dir, cfg):
    torch.manual_seed(0)
    mllm, tokenizer, processor = load_mllm(mllm_dir)
    model = stage2.build_duetgen(cfg, mllm, tokenizer, processor)
    return mllm, tokenizer, processor, model.vae, model, model.connector, model.dit


def test_mllm_frozen_only_connector_and_dit_get_gradients(setup):
    root, mllm_dir = setup
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")])
    mllm, tokenizer, processor, vae, _, connector, dit = _models(mllm_dir, cfg)
    items = [it for it in load_records(cfg.data) if stage2.image_slots(it[1])[1]][:3]
    targets = stage2.draw_targets(items, seed=0, epoch=0)
    batch = stage2.make_batch(range(3), items, targets, tokenizer, processor, drop_prob=0.5)
    loss = stage2.pack_loss(batch, stage2.ConditionStates(mllm), connector, dit, vae, cfg, FlowMatchingConfig(parameterisation="x0"), "cpu")
    loss.backward()
    assert torch.isfinite(loss)
    assert not mllm.training and all(p.grad is None and not p.requires_grad for p in mllm.parameters())
    assert all(p.grad is not None for p in connector.parameters())
    assert sum(p.grad is not None for p in dit.parameters()) > 0.9 * len(list(dit.parameters()))


def test_condition_states_are_the_prefix_states_computed_once_per_record(setup):
    """ConditionStates: any prefix of a record equals the states of that prefix alone (causal MLLM, fp16
    rounding), the record's MLLM runs once, and a fresh store (a resumed run) gives the same bits."""
    root, mllm_dir = setup
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")])
    mllm, tokenizer, processor, *_ = _models(mllm_dir, cfg)
    item = [it for it in load_records(cfg.data, include_kinds=["how-to"])][0]
    rendered = render(item, tokenizer, processor)
    first, last = rendered.bov_positions[0], rendered.bov_positions[-1]
    calls = []
    original = mllm.model.forward
    mllm.model.forward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    condition = stage2.ConditionStates(mllm)
    key = (str(item[0].root), item[1].id)
    a_last, a_first = condition.prefix(key, rendered, last), condition.prefix(key, rendered, first)
    assert len(calls) == 1 and a_last.shape[0] == last and a_first.shape[0] == first
    mllm.model.forward = original
    with torch.no_grad():
        alone = all_layer_states(mllm, rendered.prefix(first))
    torch.testing.assert_close(a_first, alone, atol=2e-3, rtol=2e-3)  # fp16 storage
    fresh = stage2.ConditionStates(mllm, keep=False)
    assert torch.equal(fresh.prefix(key, rendered, first), a_first) and fresh.nbytes == 0


def test_condition_cache_on_disk_is_shared_and_bound_to_its_mllm(setup, tmp_path):
    """A second run on the same MLLM reads the states the first wrote (no MLLM forward, the same values);
    a cache folder made for other MLLM weights is refused."""
    import shutil

    root, mllm_dir = setup
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")])
    mllm, tokenizer, processor, *_ = _models(mllm_dir, cfg)
    item = [it for it in load_records(cfg.data, include_kinds=["how-to"])][0]
    rendered = render(item, tokenizer, processor)
    key, last = (str(item[0].root), item[1].id), rendered.bov_positions[-1]
    cache = tmp_path / "states"
    first = stage2.ConditionStates(mllm, cache_dir=cache, mllm_dir=mllm_dir).prefix(key, rendered, last)
    calls = []
    original = mllm.model.forward
    mllm.model.forward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    second = stage2.ConditionStates(mllm, cache_dir=cache, mllm_dir=mllm_dir).prefix(key, rendered, last)
    mllm.model.forward = original
    assert calls == [] and torch.equal(first, second)
    other = tmp_path / "other-mllm"
    shutil.copytree(mllm_dir, other)
    weights = next(p for p in other.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    with pytest.raises(ValueError, match="another MLLM"):
        stage2.ConditionStates(mllm, cache_dir=cache, mllm_dir=other)


def test_text_condition_is_the_states_before_bov_or_the_negative_prefix(setup):
    """The packed MLLM pass gives, per sample, exactly the all-layer states of the whole record cut at its <BOV>."""
    root, mllm_dir = setup
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")])
    mllm, tokenizer, processor, *_ = _models(mllm_dir, cfg)
    items = [it for it in load_records(cfg.data, include_kinds=["continuation"])][:2]
    rendered = [render(it, tokenizer, processor) for it in items]
    bovs = [r.bov_positions[-1] for r in rendered]
    prefixes = [rendered[0].prefix(bovs[0]), rendered[1].prefix(negative_prefix_length(rendered[1], bovs[1]))]
    packed = stage2.mllm_states(mllm, prefixes)
    with torch.no_grad():
        full0, full1 = all_layer_states(mllm, rendered[0]), all_layer_states(mllm, rendered[1])
    torch.testing.assert_close(packed[0], full0[: bovs[0]], atol=1e-4, rtol=1e-4)
    neg = negative_prefix_length(rendered[1], bovs[1])
    assert neg < bovs[1]  # the final text chunk ("Step k: ...") is gone ...
    assert rendered[1].input_ids[neg - 1] == mllm.config.vision_end_token_id  # ... up to the last image
    torch.testing.assert_close(packed[1], full1[:neg], atol=1e-4, rtol=1e-4)


def test_targets_are_assistant_images_drawn_per_epoch_and_deterministic(setup):
    root, _ = setup
    items = [it for it in load_records([str(root / "train")]) if stage2.image_slots(it[1])[1]]
    a, b = stage2.draw_targets(items, 0, 0), stage2.draw_targets(items, 0, 0)
    assert a == b
    assert a != stage2.draw_targets(items, 0, 1)  # a new draw each epoch
    for (_, rec), k in zip(items, a):
        n, generated = stage2.image_slots(rec)
        assert k in generated and k < n
        if rec.meta["kind"] in ("continuation", "editing", "transition"):
            assert k >= 1  # the user's canvas comes before every answer image: at least one conditioning frame


def test_x0_relative_to_previous_makes_a_zero_output_copy_the_previous_canvas(setup):
    """The parameterisation lives in the sampler: a DiT that outputs zeros reproduces the latest frame exactly
    (a white canvas when there is none)."""
    root, mllm_dir = setup
    cfg = tiny_stage2()
    mllm, tokenizer, processor, vae, model, connector, dit = _models(mllm_dir, cfg)
    with torch.no_grad():
        dit.proj_out.weight.zero_()
        dit.proj_out.bias.zero_() if dit.proj_out.bias is not None else None
    items = [it for it in load_records([str(root / "train")], include_kinds=["editing"])][:1]
    (ds, rec), = items
    canvas = ds.open_image(rec.messages[0].content[0].path, rec.id)
    from duetgen.infer.engine import GenerationConfig
    from duetgen.infer.pipeline import DuetGenPipeline

    pipe = DuetGenPipeline(model)
    user = [Message("user", [ImagePart(canvas), TextPart(rec.messages[0].content[1].text)])]
    config = GenerationConfig(num_steps=3, guidance_scale=1.0)
    drawn = draw_teacher_forced(pipe, user, config)  # the canvas as the engine conditions on it (the model's size)
    expected = canvas.convert("RGB").resize(drawn.size, Image.BICUBIC)
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))
    text_only = [Message("user", [TextPart("Draw a red circle at the top.")])]
    drawn = draw_teacher_forced(pipe, text_only, config)
    assert np.asarray(drawn).min() == 255  # white
    model.config.x0_relative_to_previous = False
    plain = draw_teacher_forced(pipe, text_only, config)
    assert np.asarray(plain).max() < 200  # plain x0: zero output is mid-grey, not white


def test_text_only_ablation_packs_one_frame_per_sample(setup):
    root, mllm_dir = setup
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")], use_condition_frames=False)
    mllm, tokenizer, processor, vae, _, connector, dit = _models(mllm_dir, cfg)
    calls = []
    original = dit.forward

    def spy(frames, **kw):
        calls.append([len(f) for f in frames])
        return original(frames, **kw)

    dit.forward = spy
    items = [it for it in load_records(cfg.data, include_kinds=["continuation"])][:2]
    batch = stage2.make_batch(range(2), items, stage2.draw_targets(items, 0, 0), tokenizer, processor, 0.0)
    stage2.pack_loss(batch, stage2.ConditionStates(mllm), connector, dit, vae, cfg, FlowMatchingConfig(parameterisation="x0"), "cpu")
    assert calls == [[1, 1]]
    cfg = dataclasses.replace(cfg, use_condition_frames=True)
    calls.clear()
    stage2.pack_loss(batch, stage2.ConditionStates(mllm), connector, dit, vae, cfg, FlowMatchingConfig(parameterisation="x0"), "cpu")
    assert calls == [[b["target"] + 1 for b in batch]]


def test_tiny_run_exports_a_model_that_loads_and_evaluates(setup, tmp_path):
    root, mllm_dir = setup
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")], steps=4, warmup_steps=1, sample_every=4)
    out = stage2.train(cfg, mllm_dir, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("val/sample_exact" in r for r in rows)
    assert (tmp_path / "run" / "samples" / "step-0000004.html").is_file()
    from diffusers import CosmosTransformer3DModel

    from duetgen.models.duetgen import DuetGen

    model = load(out, expect="tiny")
    assert (model.config.parameterisation, model.config.x0_relative_to_previous, model.config.use_condition_frames) \
        == ("x0", True, True)
    stock = CosmosTransformer3DModel.from_pretrained(out / "dit")  # plain diffusers, connector inside crossattn_proj
    assert stock.config.crossattn_proj_in_channels == model.connector.in_channels
    exported = DuetGen.from_pretrained(stage2.export_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000004", cfg,
                                                                mllm_dir, tmp_path / "exported"))
    for (name, a), b in zip(model.dit.state_dict().items(), exported.dit.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # the checkpoint's EMA weights are what the run exported
    report = evaluate_toy(out, root / "test", tmp_path / "eval", limit=3, num_steps=2, max_new_tokens=30, progress=False)
    assert report["summary"]["all"]["n"] == 3 and report["summary"]["all"]["missing"] == 0
    assert (tmp_path / "eval" / "pred.html").is_file()


def test_image_size_trains_and_draws_at_that_size_resizing_the_dataset_as_the_engine_does(setup, tmp_path):
    """`Stage2Config.image_size` below the dataset's (64 px ShapeWorld canvases): every image is resized with
    `DuetGen.fit_image` (the engine's rule for input canvases), packs count the smaller frames' tokens, and the
    exported model draws at that size by default."""
    from PIL import Image

    from duetgen.models.duetgen import DuetGen

    root, mllm_dir = setup
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")], image_size=[24, 24], steps=2,
                              warmup_steps=1, sample_every=2, eval_every=2, save_every=2)
    out = stage2.train(cfg, mllm_dir, tmp_path / "run", progress=False)
    model = load(out, expect="tiny")
    assert tuple(model.config.image_size) == (24, 24)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens_per_frame = (24 // model.pixel_multiple) ** 2  # 9, against 16 at the tiny default of 32 px
    assert all(r["pack_tokens"] % tokens_per_frame == 0 for r in rows if "pack_tokens" in r)
    drawn = sorted((tmp_path / "run" / "samples").rglob("*-01-03.png"))  # the EMA samples (truth is part 01)
    assert drawn and {Image.open(p).size for p in drawn} == {(24, 24)}
    canvas = Image.new("RGB", (64, 64), "white")
    assert model.fit_image(canvas).size == (24, 24) and model.fit_image(model.fit_image(canvas)).size == (24, 24)


def test_changed_loss_weight_weighs_the_changed_latents_and_zero_output_copies_are_cheap_only_without_it(setup):
    """`changed_loss_weight`: a weighted mean where the target differs from the reference canvas. A DiT
    whose output is zero copies the previous canvas (x0 relative); its loss must rise with the weight,
    because everything it gets wrong is exactly what the step changes."""
    root, mllm_dir = setup
    base = dataclasses.replace(tiny_stage2(), data=[str(root / "train")], parameterisation="x0",
                               x0_relative_to_previous=True)
    mllm, tokenizer, processor, vae, _, connector, dit = _models(mllm_dir, base)
    with torch.no_grad():
        dit.transformer.proj_out.weight.zero_()  # output 0 = "change nothing"
        if dit.transformer.proj_out.bias is not None:
            dit.transformer.proj_out.bias.zero_()
    items = [it for it in load_records(base.data, include_kinds=["editing"]) if stage2.image_slots(it[1])[1]][:3]
    batch = stage2.make_batch(range(len(items)), items, [1] * len(items), tokenizer, processor, drop_prob=0.0)
    losses = []
    for w in (0.0, 4.0, 16.0):
        cfg = dataclasses.replace(base, changed_loss_weight=w)
        fm = FlowMatchingConfig(parameterisation="x0")
        with torch.no_grad():
            losses.append(stage2.pack_loss(batch, stage2.ConditionStates(mllm), connector, dit, vae, cfg, fm, "cpu",
                                           generator=torch.Generator().manual_seed(0)).item())
    assert losses[0] > 0 and losses[0] < losses[1] < losses[2], losses


def test_init_from_starts_connector_and_dit_from_a_trained_model(setup, tmp_path):
    """`init_from`: step 0 of a new run is the given model's connector + DiT (not a random init)."""
    root, mllm_dir = setup
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")], steps=2, warmup_steps=1, sample_every=100,
                              eval_every=100, save_every=100)
    first = stage2.train(cfg, mllm_dir, tmp_path / "a", progress=False)
    from duetgen.models.duetgen import DuetGen

    source = DuetGen.from_pretrained(first)
    second = dataclasses.replace(cfg, init_from=str(first), lr=1e-12, seed=1)  # the weights stay at step 0's
    out = DuetGen.from_pretrained(stage2.train(second, mllm_dir, tmp_path / "b", progress=False))
    fresh = _models(mllm_dir, second)[-1]
    for (name, a), b, c in zip(source.dit.state_dict().items(), out.dit.state_dict().values(),
                               fresh.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)
    assert any(not torch.equal(a, c) for a, c in zip(source.dit.state_dict().values(), fresh.state_dict().values()))
    torch.testing.assert_close(out.connector.proj.weight, source.connector.proj.weight)


def test_eval_toy_answers_equal_duetgen_generate(setup, tmp_path):
    """One decode path: the record `eval-toy` writes for a truth prompt equals what `duetgen generate PROMPT
    --image CANVAS --seed 0` writes (a real CLI subprocess), text and pixels; on the shipped checkpoint,
    which answers an edit with a sentence and a picture."""
    import subprocess
    import sys
    from pathlib import Path

    root, _ = setup
    model_dir = Path(__file__).resolve().parents[1] / "checkpoints" / "shapeworld-toy"
    truth = Dataset(root / "test")
    rec = next(r for r in truth if r.meta["kind"] == "editing")
    evaluate_toy(model_dir, root / "test", tmp_path / "eval", kinds=["editing"], limit=1, progress=False)
    pred = Dataset(tmp_path / "eval" / "pred")
    ours = next(iter(pred))
    canvas_part, text_part = rec.messages[0].content
    canvas = tmp_path / "canvas.png"
    truth.open_image(canvas_part.path, rec.id).save(canvas)
    subprocess.run([sys.executable, "-m", "duetgen.cli", "generate", text_part.text, "--image", str(canvas),
                    "--model", str(model_dir), "--seed", "0", "--out", str(tmp_path / "gen"), "--quiet"],
                   check=True, capture_output=True)
    generated = Dataset(tmp_path / "gen")
    theirs = next(iter(generated))
    a = [m for m in ours.messages if m.role == "assistant"][0].content
    b = [m for m in theirs.messages if m.role == "assistant"][0].content
    assert [type(p) for p in a] == [type(p) for p in b] and any(isinstance(p, ImagePart) for p in a)
    for pa, pb in zip(a, b):
        if isinstance(pa, TextPart):
            assert pa.text == pb.text
        else:
            assert np.array_equal(np.asarray(pred.open_image(pa.path, ours.id)),
                                  np.asarray(generated.open_image(pb.path, theirs.id)))


def test_init_from_without_a_step_marker_starts_the_marker_at_zero_and_refuses_other_gaps():
    from torch import nn

    from duetgen.models.connector import Connector

    plain = nn.ModuleDict({"connector": Connector(8, 4), "dit": nn.Linear(4, 4)})
    marked = nn.ModuleDict({"connector": Connector(8, 4, recency_tokens=3), "dit": nn.Linear(4, 4)})
    stage2.load_generator_state(marked, plain.state_dict(), "plain-model")
    assert torch.equal(marked["connector"].proj.weight, plain["connector"].proj.weight)
    assert not marked["connector"].recency.weight.any()  # zero rows: the marker starts as a no-op
    state = plain.state_dict()
    del state["dit.bias"]
    with pytest.raises(ValueError, match="dit.bias"):
        stage2.load_generator_state(marked, state, "broken-model")


def test_changed_region_with_dilation_covers_the_neighbourhood_in_every_channel():
    """`changed_loss_dilation`: the weighted region is every latent position within r of a changed one, all
    channels (paint outside a piece's outline costs as much as paint missing inside it); 0: changed values only."""
    reference = torch.zeros(3, 6, 6)
    target = reference.clone()
    target[1, 2, 3] = 1.0  # one latent value changes
    exact = stage2.changed_region(target, reference, 0)
    assert exact.sum() == 1 and exact[1, 2, 3] == 1
    grown = stage2.changed_region(target, reference, 1)
    assert grown.shape == target.shape and grown.sum() == 3 * 9
    assert torch.equal(grown[0], grown[2]) and grown[0, 1:4, 2:5].all() and grown[0, 0].sum() == 0
