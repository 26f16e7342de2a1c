"""duetgen.infer.batched: concurrent answers batched through one model equal the same answers run alone.

Four answers (different prompts, seeds, a sampled one) run at once through ``BatchedEngine`` give
the tokens of ``InterleavedEngine`` run alone and images within float tolerance; they really shared
batched steps; a cancelled answer and one that fails leave the others running.
"""

import threading

import numpy as np
import pytest
import torch

from generation_model import trained_tiny_model, training_prompt
from duetgen.data.record import ImagePart, Message, TextPart
from duetgen.infer.batched import BatchedEngine
from duetgen.infer.engine import Cancelled, GenerationConfig, InterleavedEngine, TextDelta

torch.set_num_threads(1)


def prompt(index: int) -> list[Message]:
    text, canvas = training_prompt(index)
    return [Message("user", [ImagePart(canvas), TextPart(text)])]


REQUESTS = [  # (prompt index, config)
    (0, GenerationConfig(seed=0, num_steps=3, max_new_tokens=120)),
    (1, GenerationConfig(seed=5, num_steps=2, max_new_tokens=120, guidance_scale=2.0)),
    (2, GenerationConfig(seed=7, num_steps=3, max_new_tokens=60, temperature=0.8, top_p=0.9)),
    (0, GenerationConfig(seed=1, num_steps=4, max_new_tokens=30)),
]


def answer(finished):
    text = "".join(p.text for p in finished.content if isinstance(p, TextPart))
    images = [np.asarray(p.image, dtype=np.float32) for p in finished.content if isinstance(p, ImagePart)]
    return finished.reason, text, images


def run_concurrently(engine, requests, per_request=None):
    """Each request in its own thread (as the server runs them); (Finished or None, error or None) per request."""
    per_request = per_request or {}
    results, errors = [None] * len(requests), [None] * len(requests)

    def work(i, messages, config):
        try:
            results[i] = engine.run(messages, config, **per_request.get(i, {}))
        except BaseException as e:
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i, m, c)) for i, (m, c) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results, errors


@pytest.fixture(scope="module")
def model():
    return trained_tiny_model()


def test_batched_answers_equal_answers_alone(model):
    requests = [(prompt(i), config) for i, config in REQUESTS]
    alone = [answer(InterleavedEngine(model).run(m, c)) for m, c in requests]
    engine = BatchedEngine(model, max_batch=4)
    results, errors = run_concurrently(engine, requests)
    assert errors == [None] * 4
    assert any(images for _, _, images in alone)  # the comparison covers drawn images
    for (reason, text, images), finished in zip(alone, results):
        b_reason, b_text, b_images = answer(finished)
        assert (b_reason, b_text) == (reason, text)  # the same tokens
        assert len(b_images) == len(images)
        for a, b in zip(images, b_images):
            assert np.abs(a - b).max() <= 2  # uint8 pixels: float reduction order only
    assert engine.scheduler.max_rows == 4  # four answers did share MLLM steps
    assert engine.scheduler.reused > 0  # decodes extended the last padded cache (and the tokens above did not change)
    assert engine.scheduler._members == {}  # every answer left


def test_images_start_together_and_equal_alone(model):
    """Image alignment: an image's first sampler step waits while other answers still write, so the three
    answers' first images are drawn in the same packed DiT calls and their image blocks enter the MLLM in
    one batched forward; the answers are still the ones alone."""
    requests = [(prompt(i), GenerationConfig(seed=seed, num_steps=3, max_new_tokens=120))
                for i, seed in ((0, 0), (1, 1), (0, 2))]  # prompt 2 draws nothing greedily
    alone = [answer(InterleavedEngine(model).run(m, c)) for m, c in requests]
    engine = BatchedEngine(model, max_batch=3, max_image_wait=100)
    results, errors = run_concurrently(engine, requests)
    assert errors == [None] * 3 and all(images for _, _, images in alone)
    for (reason, text, images), finished in zip(alone, results):
        b_reason, b_text, b_images = answer(finished)
        assert (b_reason, b_text, len(b_images)) == (reason, text, len(images))
        for a, b in zip(images, b_images):
            assert np.abs(a - b).max() <= 2
    assert engine.scheduler.held > 0 and engine.scheduler.max_images == 3
    assert engine.scheduler.image_blocks >= 3  # the aligned images' blocks went through the MLLM in one forward
    with pytest.raises(ValueError, match="max_image_wait and max_text_wait must be >= 0"):
        BatchedEngine(model, max_batch=2, max_image_wait=-1)
    with pytest.raises(ValueError, match="max_image_wait and max_text_wait must be >= 0"):
        BatchedEngine(model, max_batch=2, max_text_wait=-1)


def test_writers_wait_for_drawings_and_equal_alone(model):
    """Text alignment: an answer still writing while the others draw waits for their drawings to end
    (no image alignment here, so the drawing starts while it writes); the answers are the ones alone."""
    requests = [(prompt(i), GenerationConfig(seed=seed, num_steps=8, max_new_tokens=120))
                for i, seed in ((0, 0), (1, 1), (2, 0))]  # prompt 2 draws nothing greedily: it only writes
    alone = [answer(InterleavedEngine(model).run(m, c)) for m, c in requests]
    engine = BatchedEngine(model, max_batch=3, max_image_wait=0, max_text_wait=8)
    results, errors = run_concurrently(engine, requests)
    assert errors == [None] * 3
    for (reason, text, images), finished in zip(alone, results):
        b_reason, b_text, b_images = answer(finished)
        assert (b_reason, b_text, len(b_images)) == (reason, text, len(images))
        for a, b in zip(images, b_images):
            assert np.abs(a - b).max() <= 2
    assert engine.scheduler.text_held > 0


def test_a_step_failing_outside_the_model_fails_its_answers_and_the_scheduler_goes_on(model, monkeypatch):
    """A failure in the scheduler's own code (not a model call) reaches the answers of that step as their error;
    it used to end the scheduler's thread, and every answer then waited forever."""
    import duetgen.infer.batched as batched

    requests = [(prompt(i), GenerationConfig(seed=i, num_steps=2, max_new_tokens=40)) for i in (0, 1)]
    engine = BatchedEngine(model, max_batch=2)
    real, calls = batched.reusable_batch, []

    def broken_once(contexts):  # called for every batched decode, outside the model call
        calls.append(len(contexts))
        if len(calls) == 1:
            raise RuntimeError("a bug in the scheduler")
        return real(contexts)

    monkeypatch.setattr(batched, "reusable_batch", broken_once)
    results, errors = run_concurrently(engine, requests)
    assert calls and all(isinstance(e, RuntimeError) for e in errors) and results == [None, None]
    results, errors = run_concurrently(engine, requests)  # the same engine serves the next answers
    assert errors == [None, None] and all(r is not None for r in results)
    assert engine.scheduler._members == {}


def test_cancelled_and_failing_answers_leave_the_others_running(model):
    requests = [(prompt(i), config) for i, config in REQUESTS[:3]]
    engine = BatchedEngine(model, max_batch=3)
    cancel = threading.Event()
    seen = []

    def cancel_after_three(event):
        if isinstance(event, TextDelta):
            seen.append(event)
            if len(seen) == 3:
                cancel.set()

    def fail(generated, logits):
        if len(generated) == 5:
            raise RuntimeError("boom")
        return logits

    results, errors = run_concurrently(engine, requests, {0: {"emit": cancel_after_three, "cancel": cancel},
                                                         1: {"logits_processor": fail}})
    assert isinstance(errors[0], Cancelled) and isinstance(errors[1], RuntimeError)
    assert errors[2] is None
    assert answer(results[2])[1] == answer(InterleavedEngine(model).run(*requests[2]))[1]
    assert engine.scheduler._members == {}


def test_an_image_the_dit_cannot_draw_fails_only_its_answer_in_a_packed_call(model):
    """The answers' first images are drawn in one packed DiT call; one of them asks for a size past the DiT's grid.
    The packed call fails, each answer's step is run alone, and only that answer fails (all three did before)."""
    max_h, _ = model.max_image_side
    m = model.pixel_multiple
    requests = [(prompt(i), GenerationConfig(seed=seed, num_steps=2, max_new_tokens=120, image_size=size))
                for i, seed, size in ((0, 0, None), (1, 1, (max_h + m, m)), (0, 2, None))]
    engine = BatchedEngine(model, max_batch=3, max_image_wait=100)
    results, errors = run_concurrently(engine, requests)
    assert isinstance(errors[1], ValueError) and "exceeds the model's max_size" in str(errors[1])
    assert errors[0] is None and errors[2] is None
    for i in (0, 2):
        assert answer(results[i])[1] == answer(InterleavedEngine(model).run(*requests[i]))[1]
    assert engine.scheduler.max_images == 3  # they did share a packed call


def test_a_batched_mllm_call_that_fails_is_run_answer_by_answer(model, monkeypatch):
    """Every other MLLM forward of two answers or more fails in its last layer (as out of memory would on a big
    batch), after the layers before it grew the padded cache, which the step before may have built (a reused
    batch): each answer's decode or image block is run again alone, and the answers are the ones alone (every
    answer of the call failed before)."""
    requests = [(prompt(i), GenerationConfig(seed=i, num_steps=2, max_new_tokens=80)) for i in (0, 1, 2)]
    alone = [answer(InterleavedEngine(model).run(m, c)) for m, c in requests]
    last = model.mllm.model.language_model.layers[-1]
    real, batches, failed = type(last).forward, [], []

    def no_batches(self, hidden_states, *args, **kwargs):
        if self is last and hidden_states.shape[0] > 1:
            batches.append(tuple(hidden_states.shape[:2]))
            if len(batches) % 2 == 0:
                failed.append(batches[-1])
                raise torch.OutOfMemoryError("a batch of answers does not fit")
        return real(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(last), "forward", no_batches)
    engine = BatchedEngine(model, max_batch=3, max_image_wait=100)
    results, errors = run_concurrently(engine, requests)
    assert errors == [None] * 3
    assert any(n > 1 for _, n in failed) and any(n == 1 for _, n in failed)  # image blocks and decodes both failed
    assert engine.scheduler.split_calls == len(failed) and engine.scheduler.reused > 0  # (grown caches included)
    for (reason, text, images), finished in zip(alone, results):
        got = answer(finished)
        assert got[:2] == (reason, text) and len(got[2]) == len(images)
        for a, b in zip(images, got[2]):
            assert np.abs(a - b).max() <= 2


def test_finished_answers_let_their_caches_go_without_the_cycle_collector(model, monkeypatch):
    """A padded batch and its answers point at each other: finished answers' KV caches stayed in memory until
    Python's cycle collector ran (a batched server grew by ~60 MB per 40 answers on the toy model)."""
    import gc
    import weakref

    import duetgen.infer.batched as batched

    made = []
    init = batched.BatchedContext.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(batched.BatchedContext, "__init__", tracked)
    requests = [(prompt(i), config) for i, config in REQUESTS[:3]]
    gc.collect()
    gc.disable()
    try:
        engine = BatchedEngine(model, max_batch=3)
        results, errors = run_concurrently(engine, requests)
        assert errors == [None] * 3 and engine.scheduler.max_rows >= 2  # they did share padded batches
        assert len(made) == 3
        alive = [c for c in (ref() for ref in made) if c is not None and c is not engine.last_context]
        assert alive == [], f"{len(alive)} finished answers still in memory"
        assert engine.last_context.kv is None and engine.last_context.batch is None  # kept for its ids, not caches
    finally:
        gc.enable()


def test_server_with_max_batch_answers_concurrent_requests_as_alone(model):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from live_server import live_server
    from duetgen.infer.pipeline import DuetGenPipeline
    from duetgen.serve.common import ServeLimits
    from duetgen.serve.server import create_app

    bodies = [{"prompt": training_prompt(i)[0], "seed": i, "num_steps": 2, "max_new_tokens": 80} for i in range(3)]

    def answers(limits):
        pipeline = DuetGenPipeline(model, model_id="tiny-fit")
        with live_server(create_app(pipeline, limits)) as url:
            if limits.max_batch > 1:  # the server's batching settings reach its engine
                scheduler = pipeline.engine.scheduler
                assert (scheduler.max_image_wait, scheduler.max_text_wait) == (limits.batch_image_wait,
                                                                               limits.batch_text_wait)
            with ThreadPoolExecutor(3) as pool:
                replies = list(pool.map(lambda b: httpx.post(f"{url}/api/generate", json=b, timeout=120), bodies))
            busy = httpx.get(f"{url}/api/health").json()
        assert all(r.status_code == 200 for r in replies) and busy["running"] == 0
        return [[p.get("text") for p in r.json()["answer"]] for r in replies]

    assert answers(ServeLimits(max_batch=3, queue_size=0, batch_text_wait=5)) == answers(ServeLimits(max_batch=1, queue_size=2))


# ----------------------------------------------------------------------------- the model's settings (issue 19)


def test_condition_frame_time_is_honoured_as_alone(model, monkeypatch):
    """The DiT sees the conditioning frames at the model's condition_frame_time, batched as alone."""
    messages, config = prompt(0), GenerationConfig(seed=0, num_steps=2, max_new_tokens=40)
    monkeypatch.setattr(model.config, "condition_frame_time", 0.25)
    forward, seen = model.dit.forward, []

    def recording_forward(*args, **kwargs):  # the flow times of every sample's frames in every DiT call
        seen.extend(t.tolist() for t in kwargs["timesteps"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.dit, "forward", recording_forward)
    alone = answer(InterleavedEngine(model).run(messages, config))
    alone_times, seen[:] = list(seen), []
    (finished,), (error,) = run_concurrently(BatchedEngine(model, max_batch=2), [(messages, config)])
    assert error is None
    batched = answer(finished)
    assert alone[2] and batched[:2] == alone[:2] and len(batched[2]) == len(alone[2])
    for a, b in zip(alone[2], batched[2]):
        assert np.abs(a - b).max() <= 2  # the same draw (float reduction order only)
    assert seen == alone_times  # the same frames at the same times
    assert all(times[:-1] == [0.25] * (len(times) - 1) and len(times) > 1 for times in seen)  # frames, then target


def test_cosmos_framing_is_refused_by_model_and_by_request(model, monkeypatch):
    from duetgen.infer.pipeline import DuetGenPipeline
    from duetgen.serve.common import ServeLimits
    from duetgen.serve.server import create_app

    engine = BatchedEngine(model, max_batch=2)
    with pytest.raises(ValueError, match="batches the 'duetgen' framing only; got framing='cosmos'"):
        engine.run(prompt(0), GenerationConfig(framing="cosmos"))
    assert engine.scheduler._members == {}  # the refused answer never joined

    monkeypatch.setattr(model.config, "framing", "cosmos")
    with pytest.raises(ValueError, match="this model's framing is 'cosmos'.*--batch 1"):
        BatchedEngine(model, max_batch=2)
    with pytest.raises(ValueError, match="this model's framing is 'cosmos'"):  # `duetgen serve --batch 2` at startup
        create_app(DuetGenPipeline(model, model_id="tiny-cosmos"), ServeLimits(max_batch=2))
    create_app(DuetGenPipeline(model, model_id="tiny-cosmos"), ServeLimits(max_batch=1))  # one at a time: served
