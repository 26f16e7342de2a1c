"""Interleaved decode loop: the KV-cached engine against the re-prefill baseline, positions, limits, sampling.

Tiny random models of the real classes (Qwen2.5-VL, Cosmos DiT, pixel-shuffle autoencoder). A random
model never emits <BOV> on its own, so the tests force it through the engine's documented
``logits_processor`` hook at chosen points; every other token is the model's own (greedy or sampled).
"""

import dataclasses
import time

import numpy as np
import pytest
import torch
from PIL import Image

from duetgen.data.record import ImagePart, Message, TextPart
from duetgen.infer.engine import (
    DenoisingStep,
    Finished,
    GenerationConfig,
    ImageDone,
    ImageStarted,
    InterleavedEngine,
    TextDelta,
    sample_token,
)
from duetgen.models import builder, presets
from duetgen.models.duetgen import DuetGen
from duetgen.models.mllm import TokenIds, rope_position_ids

torch.set_num_threads(1)


def tiny_model(**settings) -> DuetGen:
    """The ``tiny`` preset (random weights of the real classes: 32x32 images, 12 latent channels, patch 2)."""
    preset = presets.tiny()
    preset = dataclasses.replace(preset, settings=dataclasses.replace(preset.settings, **settings))
    return builder.build(preset).eval()


@pytest.fixture(scope="module")
def models():
    return tiny_model()


@pytest.fixture(scope="module")
def engine(models):
    return InterleavedEngine(models)


def canvas(seed, h=16, w=24):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def prompt_with_canvas():
    return [Message("user", [TextPart("Here is my canvas. How do I add a red circle?"), ImagePart(canvas(1))])]


def force_bov_every(k, ids, n_images, stop_after=3):
    """Force <BOV> after every k text tokens (n_images times), then <|im_end|> ``stop_after`` tokens later."""
    def processor(generated, logits):
        since = 0
        images = 0
        for t in generated:
            if t == ids.bov:
                images, since = images + 1, 0
            else:
                since += 1
        forced = None
        if images < n_images and since == k:
            forced = ids.bov
        elif images == n_images and since == stop_after:
            forced = ids.im_end
        if forced is not None:
            logits = torch.full_like(logits, float("-inf"))
            logits[forced] = 0.0
        return logits
    return processor


def run_collect(engine, messages, config, **kw):
    events = []
    finished = engine.run(messages, config, emit=events.append, **kw)
    return finished, events


# ----------------------------------------------------------------------------- cached == re-prefill


def test_cached_loop_equals_reprefill_loop_greedy(engine, models):
    ids = TokenIds.from_tokenizer(models.tokenizer)
    config = GenerationConfig(max_new_tokens=40, num_steps=3, guidance_scale=2.0, seed=7)
    proc = force_bov_every(3, ids, n_images=3)
    cached, cached_events = run_collect(engine, prompt_with_canvas(), config, logits_processor=proc)
    cached_ids = list(engine.last_context.input_ids)
    naive, _ = run_collect(engine, prompt_with_canvas(), config, context="recompute", logits_processor=proc)
    naive_ids = list(engine.last_context.input_ids)

    assert cached.reason == naive.reason == "end_of_turn"
    assert cached.stats["images"] == naive.stats["images"] == 3
    assert cached_ids == naive_ids  # every token, the engine-written vision blocks included
    assert [type(p) for p in cached.content] == [type(p) for p in naive.content]
    for a, b in zip(cached.content, naive.content):
        if isinstance(a, TextPart):
            assert a.text == b.text
        else:
            diff = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
            assert diff.max() <= 1  # same picture up to one uint8 level of float noise
    # the images really depend on the text condition and the noise: not a constant picture
    pictures = [np.asarray(p.image) for p in cached.content if isinstance(p, ImagePart)]
    assert not np.array_equal(pictures[0], pictures[1])
    # the cached run did strictly less MLLM work: one forward per token, never the whole history
    assert len(engine.last_context.input_ids) == len(cached_ids)


def test_cached_loop_equals_reprefill_loop_sampled(engine, models):
    ids = TokenIds.from_tokenizer(models.tokenizer)
    config = GenerationConfig(max_new_tokens=30, num_steps=2, temperature=1.0, top_p=0.9, seed=3)
    proc = force_bov_every(4, ids, n_images=2)
    cached, _ = run_collect(engine, prompt_with_canvas(), config, logits_processor=proc)
    cached_ids = list(engine.last_context.input_ids)
    naive, _ = run_collect(engine, prompt_with_canvas(), config, context="recompute", logits_processor=proc)
    assert cached_ids == list(engine.last_context.input_ids)
    assert cached.stats["new_tokens"] == naive.stats["new_tokens"]


def test_kept_positions_equal_full_sequence_rope(engine, models):
    ids = TokenIds.from_tokenizer(models.tokenizer)
    config = GenerationConfig(max_new_tokens=30, num_steps=1)
    run_collect(engine, prompt_with_canvas(), config, logits_processor=force_bov_every(2, ids, n_images=2))
    ctx = engine.last_context
    full_ids = torch.tensor(ctx.input_ids)
    # image grids in order: the user canvas and the two generated images, as the processor sees them
    grids = []
    proc = models.image_processor
    grids.append(proc.grid_thw(16, 24))
    grids += [proc.grid_thw(32, 32)] * 2
    expected = rope_position_ids(models.mllm, full_ids, torch.tensor(grids))
    kept = torch.cat(ctx.positions, dim=1)
    assert torch.equal(kept, expected)
    # and images really shift the text positions (3D rope, not 1D)
    assert not torch.equal(expected[0], torch.arange(len(full_ids)))


def test_kept_states_equal_a_fresh_forward(engine, models):
    """The condition of the last image is the states of a fresh full forward of its prefix."""
    from duetgen.models.mllm import layer_states

    ids = TokenIds.from_tokenizer(models.tokenizer)
    finished = engine.run(prompt_with_canvas(), GenerationConfig(max_new_tokens=20, num_steps=1),
                          logits_processor=force_bov_every(3, ids, n_images=2))
    ctx = engine.last_context
    full_ids = torch.tensor(ctx.input_ids)
    grids = torch.tensor([models.image_processor.grid_thw(16, 24)] + [models.image_processor.grid_thw(32, 32)] * 2)
    # pixels of all three images, re-processed from the record's pictures
    with torch.no_grad():
        out = models.mllm.model(input_ids=full_ids[None], position_ids=rope_position_ids(models.mllm, full_ids, grids)[:, None],
                                pixel_values=torch.cat(engine_pixels(finished, models)), image_grid_thw=grids,
                                output_hidden_states=True, use_cache=False)
    fresh = layer_states(out.hidden_states)[0]
    kept = ctx.states(len(full_ids))
    assert kept.shape == fresh.shape
    assert torch.allclose(kept, fresh, atol=1e-4)


def engine_pixels(finished, models):
    """Pixels of the prompt canvas and the generated pictures of a finished answer."""
    pixels = [torch.from_numpy(models.image_processor.process_one(canvas(1))[0])]
    for p in finished.content:
        if isinstance(p, ImagePart):
            pixels.append(torch.from_numpy(models.image_processor.process_one(p.image)[0]))
    return pixels


# ----------------------------------------------------------------------------- events, limits, sampling


def test_events_in_order_and_content_matches_stream(engine, models):
    ids = TokenIds.from_tokenizer(models.tokenizer)
    config = GenerationConfig(max_new_tokens=20, num_steps=3)
    events = list(engine.stream(prompt_with_canvas(), config, logits_processor=force_bov_every(2, ids, n_images=1)))
    kinds = [type(e).__name__ for e in events]
    assert kinds[-1] == "Finished" and kinds.count("Finished") == 1
    start = kinds.index("ImageStarted")
    assert kinds[start + 1:start + 4] == ["DenoisingStep"] * 3 and kinds[start + 4] == "ImageDone"
    assert [e.step for e in events if isinstance(e, DenoisingStep)] == [1, 2, 3]
    finished = events[-1]
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert streamed == "".join(p.text for p in finished.content if isinstance(p, TextPart))
    done = [e for e in events if isinstance(e, ImageDone)]
    assert done[0].image.size == (32, 32) and done[0].image is finished.content[1].image


def test_limits(engine, models):
    ids = TokenIds.from_tokenizer(models.tokenizer)
    proc = force_bov_every(2, ids, n_images=5)
    finished = engine.run(prompt_with_canvas(), GenerationConfig(max_new_tokens=50, num_steps=1, max_images=2),
                          logits_processor=proc)
    assert finished.reason == "max_images" and finished.stats["images"] == 2
    finished = engine.run(prompt_with_canvas(), GenerationConfig(max_new_tokens=5, num_steps=1), logits_processor=proc)
    assert finished.reason == "max_tokens" and finished.stats["new_tokens"] == 5


def test_never_samples_vision_tokens(engine, models):
    ids = TokenIds.from_tokenizer(models.tokenizer)

    def favour_pad(generated, logits):  # a model that would love to write <|image_pad|> itself
        logits = logits.clone()
        logits[ids.image_pad] = logits[ids.vision_start] = 1e4 if torch.isfinite(logits[ids.image_pad]) else logits[ids.image_pad]
        return logits

    finished = engine.run(prompt_with_canvas(), GenerationConfig(max_new_tokens=8, num_steps=1),
                          logits_processor=favour_pad)
    answer = engine.last_context.input_ids
    assert ids.image_pad not in answer[-finished.stats["new_tokens"]:]


def test_seed_controls_sampling_and_noise(engine, models):
    ids = TokenIds.from_tokenizer(models.tokenizer)
    proc = force_bov_every(3, ids, n_images=1)

    def pic(seed):
        f = engine.run(prompt_with_canvas(), GenerationConfig(max_new_tokens=12, num_steps=2, seed=seed), logits_processor=proc)
        return np.asarray([p for p in f.content if isinstance(p, ImagePart)][0].image)

    assert np.array_equal(pic(1), pic(1))
    assert not np.array_equal(pic(1), pic(2))


def test_sample_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample_token(logits, 0.0, 1.0, g) == 1
    draws = {sample_token(logits, 1.0, 0.5, g) for _ in range(50)}
    assert draws == {1}  # top_p 0.5 keeps only the most likely token (p ~0.52)
    draws = {sample_token(logits, 1.0, 0.99, g) for _ in range(200)}
    assert draws == {1, 2}
    # temperatures and top_p so small that float32 gives up (inf / inf, top_p rounding to 0) still sample
    for temperature in (1e-38, 1e-45, 1e-300, 5e-324):
        assert {sample_token(logits, temperature, 1.0, g) for _ in range(20)} == {1}
    assert {sample_token(torch.tensor([1.0, 1.0]), 1e-300, 1.0, g) for _ in range(50)} == {0, 1}  # a tie stays a tie
    assert {sample_token(logits, 1.0, 1e-300, g) for _ in range(20)} == {1}


def test_bad_config_and_model_image_limit(engine):
    with pytest.raises(ValueError, match="multiples of 4"):
        engine.run(prompt_with_canvas(), GenerationConfig(image_size=(18, 16)))
    with pytest.raises(ValueError, match="top_p"):
        engine.run(prompt_with_canvas(), GenerationConfig(top_p=0))
    # the model takes at most max_images frames: 1 input canvas leaves room for 1 generated image
    small = InterleavedEngine(tiny_model(max_images=2))
    ids = TokenIds.from_tokenizer(small.model.tokenizer)
    f = small.run(prompt_with_canvas(), GenerationConfig(max_new_tokens=30, num_steps=1),
                  logits_processor=force_bov_every(2, ids, n_images=3))
    assert f.reason == "max_images" and f.stats["images"] == 1


def test_input_images_resized_for_the_dit(engine):
    latent = engine.condition_latent(canvas(0, 30, 50))
    assert latent.shape[0] == 12 and latent.shape[1] * 2 % 4 == 0 and latent.shape[2] * 2 % 4 == 0
    assert latent.shape[1:] == (12, 20)  # 30x50 -> 24x40 pixels (<= 32x32 in area, multiples of 4) -> f = 2


def test_closing_the_stream_cancels_the_answer(engine):
    calls = []

    def count(generated, logits):  # runs once per decode step, in the engine's worker thread
        calls.append(len(generated))
        return logits

    stream = engine.stream(prompt_with_canvas(), GenerationConfig(max_new_tokens=2000), logits_processor=count)
    assert isinstance(next(stream), TextDelta)
    stream.close()  # joins the worker: it stops at its next event
    # The worker decodes ahead of the reader (an unbounded event queue), so how far it got depends on the
    # machine's load (under 10 steps when idle, more on 2 busy cores); what must hold is that it stopped
    # short of the 2000 tokens a full answer of this random model takes, and decodes nothing after close.
    assert len(calls) < 2000
    n = len(calls)
    time.sleep(0.2)
    assert len(calls) == n


def test_default_guidance_without_frames_applies_only_to_images_with_no_earlier_image():
    """`guidance_scale_without_frames`: the first image of a text-only prompt is guided (its negative is a
    true unconditional, two branches per DiT call); an image with earlier images uses `guidance_scale`."""
    model = tiny_model(guidance_scale=1.0, guidance_scale_without_frames=3.0)
    engine = InterleavedEngine(model)
    ids = TokenIds.from_tokenizer(model.tokenizer)
    branches = []
    original = model.dit.forward

    def spy(frames, **kw):
        branches.append(len(frames))  # samples in the packed DiT call: 2 with guidance, 1 without
        return original(frames, **kw)

    model.dit.forward = spy
    config = GenerationConfig(max_new_tokens=20, num_steps=2, seed=0)
    engine.run([Message("user", [TextPart("Draw a red circle at the top.")])], config,
               logits_processor=force_bov_every(2, ids, n_images=2))
    assert branches == [2, 2, 1, 1]  # image 1: no earlier image -> guided; image 2: the first is a frame
    branches.clear()
    engine.run(prompt_with_canvas(), config, logits_processor=force_bov_every(2, ids, n_images=1))
    assert branches == [1, 1]  # a user canvas is an earlier image
    branches.clear()
    engine.run(prompt_with_canvas(), dataclasses.replace(config, guidance_scale=2.0),
               logits_processor=force_bov_every(2, ids, n_images=1))
    assert branches == [2, 2]  # an explicit scale applies to every image
