"""`duetgen serve --ray`: the app as a Ray Serve deployment with 2 replicas on a local Ray instance (2 CPUs).

Real HTTP to Ray Serve's proxy: the same endpoints (page, /api, /v1), two streamed answers running at
the same time on different replicas, generated images served by whichever replica gets the URL, the
Host check in OpenAI's error shape on /v1, and a 429 with Retry-After only when every replica is full.
The model is the tiny fitted one of ``generation_model`` (saved to a directory: replicas load it by path).
"""

import asyncio
import base64
import hashlib
import io
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from generation_model import trained_tiny_dir, training_prompt

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from duetgen.serve.common import ServeLimits  # noqa: E402
from duetgen.serve.ray_serve import DuetGenIngress, deploy, http_options, remove  # noqa: E402

torch.set_num_threads(1)  # the tiny model's fit in this process (2 threads on the 2 shared cores took minutes)
pytestmark = pytest.mark.slow  # ~60 s on 2 shared cores: Ray, two replicas loading torch, answers of 100 sampler steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir():
    return trained_tiny_dir()


@pytest.fixture(scope="module")
def proxy(model_dir):
    """Ray (2 CPUs, no dashboard) with the app at http://127.0.0.1:PORT/: 2 replicas, 1 generation each, 1 waiting per proxy."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        limits = ServeLimits(max_batch=1, queue_size=1, max_steps=100)
        serve.start(http_options=http_options("127.0.0.1", port, limits))
        deploy(str(model_dir), replicas=2, limits=limits)
        yield f"http://127.0.0.1:{port}"
        remove()
    finally:
        serve.shutdown()
        ray.shutdown()


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(steps: int, **more) -> dict:
    """The fitted prompt (a canvas, then text): the tiny model answers with images."""
    text, canvas = training_prompt(0)
    return {"model": "model", "seed": 0, "max_tokens": 150, "steps": steps, **more,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(canvas)}},
                                                      {"type": "text", "text": text}]}]}


def test_same_endpoints_through_the_proxy(proxy):
    assert httpx.get(f"{proxy}/").status_code == 200 and "<html" in httpx.get(f"{proxy}/").text.lower()
    health = httpx.get(f"{proxy}/api/health")
    assert health.json()["status"] == "ok" and health.json()["model"] == "model"
    assert health.headers["x-duetgen-replica"]
    assert httpx.get(f"{proxy}/v1/models").json()["data"][0]["id"] == "model"
    r = httpx.post(f"{proxy}/api/generate", json={"prompt": "Draw a red circle.", "num_steps": 2, "max_new_tokens": 20})
    assert r.status_code == 200 and r.json()["meta"]["model"] == "model"
    # the Host check holds behind the proxy, and on /v1 answers in OpenAI's shape
    assert httpx.get(f"{proxy}/api/health", headers={"Host": "evil.example"}).status_code == 400
    r = httpx.get(f"{proxy}/v1/models", headers={"Host": "evil.example"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "host" in r.json()["error"]["message"].lower()
    # the body cap holds through the ingress, declared or not (chunked): 413 in OpenAI's shape
    big = b"x" * (ServeLimits().max_body_bytes + 1)
    r = httpx.post(f"{proxy}/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{proxy}/v1/chat/completions", content=iter([big[:1 << 20]] * 17),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the cap" in r.json()["error"]["message"]


def stream_answer(url: str, payload: dict, record: dict, started: threading.Event) -> None:
    """Stream one /v1 answer; record the replica, when its first text arrived and when it finished."""
    with httpx.Client(timeout=300) as http, http.stream("POST", f"{url}/v1/chat/completions",
                                                        json={**payload, "stream": True}) as r:
        record["status"], record["replica"] = r.status_code, r.headers.get("x-duetgen-replica")
        text = []
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if delta and "first" not in record:
                record["first"] = time.monotonic()
                started.set()
            text.append(delta or "")
        record["done"], record["text"] = time.monotonic(), "".join(text)
    started.set()


def test_two_replicas_answer_at_the_same_time(proxy):
    """B starts after A's first text, on the other replica, and its text arrives while A is still generating."""
    records = [{}, {}]
    events = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=stream_answer, args=(proxy, body(100), records[i], events[i])) for i in range(2)]
    threads[0].start()
    assert events[0].wait(120)
    threads[1].start()
    for t in threads:
        t.join(300)
    a, b = records
    assert a["status"] == b["status"] == 200
    assert a["replica"] != b["replica"]
    assert b["first"] < a["done"], "B's answer only started after A's was done: not concurrent"
    assert a["text"] == b["text"] and a["text"].count("![image") >= 1  # same request, same seed, same answer


def test_images_are_served_by_every_replica(proxy):
    answer = httpx.post(f"{proxy}/v1/chat/completions", json=body(2), timeout=120).json()
    urls = answer["duetgen"]["images"]
    assert urls and all(u.startswith(f"{proxy}/v1/images/") for u in urls)
    replicas = set()
    for _ in range(8):
        for url in urls:
            r = httpx.get(url)
            assert r.status_code == 200, (url, r.status_code, r.headers.get("x-duetgen-replica"))
            assert hashlib.sha256(r.content).hexdigest() == url.rsplit("/", 1)[1].removesuffix(".png")
            replicas.add(r.headers["x-duetgen-replica"])
    assert len(replicas) == 2  # both replicas answered image URLs (one of them did not draw them)


def test_429_only_when_every_replica_is_full(proxy):
    """2 replicas x 2 slots (1 generating, 1 waiting) + 1 waiting at the proxy = 5 in flight; the 6th gets 429."""
    # a burst that fits is never refused (Ray's max_queued_requests, the bound before, counted requests as queued
    # while its router probed the replicas: an audit's 4 at once on an idle cluster got 429s in 6 of 6 rounds)
    for _ in range(2):
        with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=8)) as http:
            threads_status: list = []
            burst = [threading.Thread(target=lambda: threads_status.append(
                http.post(f"{proxy}/v1/chat/completions", json=body(2)).status_code)) for _ in range(5)]
            for t in burst:
                t.start()
            for t in burst:
                t.join(120)
        assert threads_status == [200] * 5, threads_status
    clients, streams = [], []
    try:
        for _ in range(4):  # the replicas' slots: each stream's headers come back once a replica took it
            http = httpx.Client(timeout=300)
            clients.append(http)
            s = http.stream("POST", f"{proxy}/v1/chat/completions", json={**body(100), "stream": True})
            r = s.__enter__()
            streams.append(s)
            assert r.status_code == 200
        queued: dict = {}

        def wait_at_proxy():
            with httpx.Client(timeout=300) as http:
                queued["status"] = http.post(f"{proxy}/v1/chat/completions", json=body(2)).status_code

        waiter = threading.Thread(target=wait_at_proxy)
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive()  # waiting at the proxy for a replica, not refused
        r = httpx.post(f"{proxy}/v1/chat/completions", json=body(2), timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["type"] == "rate_limit_error" and "busy" in r.json()["error"]["message"]
        r = httpx.post(f"{proxy}/api/generate", json={"prompt": "Draw a red circle.", "num_steps": 2}, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "5" and "busy" in r.json()["detail"]
    finally:
        for s in streams:
            s.__exit__(None, None, None)  # the clients leave: their generations are cancelled
        for http in clients:
            http.close()
    waiter.join(300)
    assert queued["status"] == 200  # the waiting request got a replica once the others left


@serve.deployment(ray_actor_options={"num_cpus": 0})  # the two model replicas hold the 2 CPUs
class NeverAnswers:
    """A replica that takes requests and never answers (a stuck generation): only the ingress's timeout ends them."""

    async def http(self, scope: dict, body: bytes):
        await asyncio.sleep(600)
        yield {"type": "http.response.start", "status": 200, "headers": []}


def test_the_ingress_times_requests_out_end_to_end_in_the_routes_error_shape(proxy):
    """--timeout (+ the grace that lets a replica's own 504 come first) ends a request, answered as the route's
    errors are (OpenAI's shape on /v1, detail on /api), not in Ray's plain text; Ray's proxy only backs it up."""
    limits = ServeLimits(request_timeout_s=1.0)
    serve.run(serve.deployment(serve.ingress()(DuetGenIngress), name="stuck", ray_actor_options={"num_cpus": 0}).bind(NeverAnswers.bind(), limits),
              name="stuck", route_prefix="/stuck")
    try:
        start = time.monotonic()
        r = httpx.post(f"{proxy}/stuck/v1/chat/completions", json=body(2), timeout=60)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        assert "timed out after 1 s" in r.json()["error"]["message"]
        assert 1.0 <= time.monotonic() - start < 30
        r = httpx.post(f"{proxy}/stuck/api/generate", json={"prompt": "Draw a red circle."}, timeout=60)
        assert r.status_code == 504 and "timed out" in r.json()["detail"]
    finally:
        serve.delete("stuck")
    options = http_options("0.0.0.0", 8123, ServeLimits(request_timeout_s=42.0))
    assert options["host"] == "0.0.0.0" and options["port"] == 8123 and options["request_timeout_s"] > 42.0
