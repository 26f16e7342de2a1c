"""`duetgen serve`: a real HTTP client against a real uvicorn server on 127.0.0.1 (random port).

JSON and server-sent-event generation with images, OpenAPI, bad input answered with 4xx and a
message while the server keeps serving, the bounded queue (429), cancellation and timeouts.
"""

import base64
import io
import json
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from generation_model import trained_tiny_model, training_prompt
from live_server import live_server
from duetgen.infer.pipeline import DuetGenPipeline
from duetgen.models import builder
from duetgen.serve.common import ServeLimits
from duetgen.serve.server import create_app

torch.set_num_threads(1)


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def data_url_image(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def read_events(response) -> list[tuple[str, dict]]:
    events, name, data = [], None, ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and name:
            events.append((name, json.loads(data)))
            name, data = None, ""
    return events


@pytest.fixture(scope="module")
def pipe():
    return DuetGenPipeline(trained_tiny_model(), model_id="tiny-fit")


@pytest.fixture(scope="module")
def server(pipe):
    with live_server(create_app(pipe, ServeLimits(max_body_bytes=1 << 20, max_image_pixels=128 * 128,
                                                  max_prompt_chars=500, max_images=3, max_steps=20))) as url:
        yield url


@pytest.fixture(scope="module")
def request_body():
    text, canvas = training_prompt(0)
    return {"prompt": text, "images": [png_b64(canvas)], "num_steps": 2, "max_new_tokens": 150}


def test_health_model_and_openapi(server):
    health = httpx.get(f"{server}/api/health").json()
    assert health == {"status": "ok", "model": "tiny-fit", "running": 0, "waiting": 0}
    info = httpx.get(f"{server}/api/model").json()
    assert info["preset"] == "tiny" and info["image_size"] == [32, 32] and info["limits"]["max_images"] == 3
    spec = httpx.get(f"{server}/openapi.json").json()
    assert {"/api/generate", "/api/generate/stream", "/api/health", "/api/model"} <= set(spec["paths"])
    props = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"prompt", "images", "messages", "seed", "num_steps", "guidance_scale", "temperature", "top_p"} <= set(props)
    assert "429" in spec["paths"]["/api/generate"]["post"]["responses"]
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and "/static/chat.js" in page.text
    assert httpx.get(f"{server}/static/chat.js").status_code == 200


def test_generate_json(server, request_body):
    r = httpx.post(f"{server}/api/generate", json=request_body, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    images = [p for p in body["answer"] if p["type"] == "image"]
    assert images and all(data_url_image(p["image"]).size == (32, 32) for p in images)
    assert body["messages"][0]["role"] == "user" and body["messages"][0]["content"][0]["type"] == "image"
    assert body["meta"]["finish_reason"] in ("end_of_turn", "max_tokens", "max_images")
    assert body["meta"]["stats"]["images"] == len(images)


def test_generate_stream_matches_json(server, request_body):
    with httpx.stream("POST", f"{server}/api/generate/stream", json=request_body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)
    names = [n for n, _ in events]
    assert names[-1] == "finished" and "text" in names and "image_started" in names
    first = names.index("image_started")
    assert names[first + 1:first + 4] == ["step", "step", "image_done"]
    done = [d for n, d in events if n == "image_done"]
    assert all(data_url_image(d["image"]).size == (32, 32) for d in done)
    streamed = "".join(d["text"] for n, d in events if n == "text")
    json_answer = httpx.post(f"{server}/api/generate", json=request_body, timeout=120).json()["answer"]
    assert streamed == "".join(p["text"] for p in json_answer if p["type"] == "text")  # same seed, same answer
    assert len(done) == sum(p["type"] == "image" for p in json_answer)
    assert events[-1][1]["answer"] == [{k: v for k, v in p.items() if k != "image"} for p in json_answer]


def test_conversation_continues_with_messages(server, request_body):
    first = httpx.post(f"{server}/api/generate", json=request_body, timeout=120).json()
    # send the whole conversation back (the images as the data URLs the server returned) and ask again
    messages = first["messages"] + [{"role": "user", "content": [{"type": "text", "text": "Again please."}]}]
    n_images = sum(p["type"] == "image" for m in messages for p in m["content"])
    body = {"messages": messages, "num_steps": 1, "max_new_tokens": 20}
    r = httpx.post(f"{server}/api/generate", json=body, timeout=120)
    if n_images > 3:
        assert r.status_code == 413 and "over the cap of 3" in r.json()["detail"]
    else:
        assert r.status_code == 200, r.text
        assert len(r.json()["messages"]) == len(messages) + 1


@pytest.mark.parametrize("patch, status, message", [
    ({"prompt": "   "}, 400, "prompt is empty"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400, "exactly one of"),
    ({"prompt": "x" * 501}, 413, "over the cap of 500"),
    ({"images": ["!!not base64!!"]}, 400, "images[0]: not valid base64"),
    ({"images": [base64.b64encode(b"plain text, not an image").decode()]}, 400, "images[0]"),
    ({"images": [png_b64(Image.new("RGB", (200, 200)))]}, 413, "over the cap of 16,384"),
    ({"images": [png_b64(Image.new("RGB", (8, 8)))] * 4}, 413, "4 images, over the cap of 3"),
    ({"num_steps": 500}, 400, "num_steps=500 is over the cap of 20"),
    ({"images": [png_b64(Image.new("RGB", (250, 1)))]}, 400, "aspect ratio 250 exceeds 200"),
    ({"image_size": [30, 32]}, 400, "multiples of 4"),
    ({"top_p": 0}, 422, "top_p"),
    ({"seed": "abc"}, 422, "seed"),
])
def test_bad_input_gets_4xx_and_server_keeps_serving(server, request_body, patch, status, message):
    r = httpx.post(f"{server}/api/generate", json={**request_body, **patch}, timeout=60)
    assert r.status_code == status, r.text
    assert message in json.dumps(r.json()["detail"])
    assert httpx.get(f"{server}/api/health").json()["status"] == "ok"


def test_body_cap_and_broken_json(server):
    r = httpx.post(f"{server}/api/generate", content=b"{" + b" " * (2 << 20) + b"}",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "over the cap" in r.json()["detail"]

    def chunks():  # no Content-Length: the cap applies while the body streams in
        for _ in range(40):
            yield b" " * (64 << 10)

    r = httpx.post(f"{server}/api/generate", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    r = httpx.post(f"{server}/api/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert httpx.get(f"{server}/api/health").status_code == 200


def test_queue_full_429_and_cancel_on_disconnect(request_body):
    # this random tiny MLLM (seed 1) writes text until max_new_tokens without <BOV> or end of turn: 3000
    # tokens take seconds, long enough to see the queue full and a client that leaves freeing the model
    slow_pipe = DuetGenPipeline(builder.build("tiny", seed=1), model_id="tiny-random")
    slow = {"prompt": "Draw a red circle.", "max_new_tokens": 3000}
    with live_server(create_app(slow_pipe, ServeLimits(queue_size=0, max_new_tokens=3000))) as url:
        started = time.monotonic()
        with httpx.stream("POST", f"{url}/api/generate/stream", json=slow, timeout=120) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: text"  # the first generation is running
            busy = httpx.post(f"{url}/api/generate", json=request_body, timeout=60)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "5"
            assert "busy" in busy.json()["detail"]
            assert httpx.get(f"{url}/api/health").json()["running"] == 1
        left = time.monotonic()
        while httpx.get(f"{url}/api/health").json()["running"] and time.monotonic() - left < 30:
            time.sleep(0.02)
        freed = time.monotonic()
        assert httpx.get(f"{url}/api/health").json() == {"status": "ok", "model": "tiny-random", "running": 0, "waiting": 0}
        # the full answer takes much longer than it took to free the model after the client left
        full = httpx.post(f"{url}/api/generate", json=slow, timeout=120)
        assert full.status_code == 200 and full.json()["meta"]["finish_reason"] == "max_tokens"
        assert freed - left < full.json()["meta"]["stats"]["total_s"] / 3, (freed - left, started)


def test_request_timeout(pipe, request_body):
    slow = {**request_body, "num_steps": 100, "max_new_tokens": 400}
    with live_server(create_app(pipe, ServeLimits(request_timeout_s=0.3, max_steps=100))) as url:
        r = httpx.post(f"{url}/api/generate", json=slow, timeout=120)
        assert r.status_code == 504 and "longer than 0.3 s" in r.json()["detail"]
        assert "s for the model, generated" in r.json()["detail"]  # --timeout counts both: the answer says each
        with httpx.stream("POST", f"{url}/api/generate/stream", json=slow, timeout=120) as s:
            events = read_events(s)
        assert events[-1][0] == "error" and "longer than 0.3 s" in events[-1][1]["detail"]
        assert httpx.get(f"{url}/api/health").json()["running"] == 0


def test_a_request_that_waited_past_its_timeout_is_503_on_api_and_v1(pipe, request_body):
    """The model busy for the whole --timeout: 503 (waited), not 504 (generated too long), on both routes."""
    never = threading.Event()
    app = create_app(pipe, ServeLimits(request_timeout_s=0.5))
    with live_server(app) as url:
        app.state.service.slots.acquire(never, time.monotonic() + 60)  # another generation holds the model
        try:
            r = httpx.post(f"{url}/api/generate", json=request_body, timeout=60)
            assert r.status_code == 503 and "waited too long" in r.json()["detail"]
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "Draw a red circle."}]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout", r.text
        finally:
            app.state.service.slots.release()


def test_generation_slots_go_in_arrival_order():
    """Waiting requests get the model first come, first served (polling a semaphore let a later one jump ahead),
    and a waiter whose client left or whose time ran out leaves the line."""
    import threading
    import time

    from duetgen.infer.engine import Cancelled
    from duetgen.serve.common import FairSlots, WaitedTooLong

    slots, order, never = FairSlots(1), [], threading.Event()
    slots.acquire(never, time.monotonic() + 60)  # the running request

    def wait(name: str):
        slots.acquire(never, time.monotonic() + 60)
        order.append(name)
        time.sleep(0.05)
        slots.release()

    threads = []
    for name in "abcde":
        threads.append(threading.Thread(target=wait, args=(name,)))
        threads[-1].start()
        time.sleep(0.05)  # arrival order a, b, c, d, e
    gone = threading.Event()
    gone.set()
    with pytest.raises(Cancelled):
        slots.acquire(gone, time.monotonic() + 60)
    with pytest.raises(WaitedTooLong):  # (503, not a generation's 504: told by the type, not the message)
        slots.acquire(never, time.monotonic() + 0.1)
    slots.release()
    for t in threads:
        t.join(10)
    assert order == list("abcde") and slots.free == 1
