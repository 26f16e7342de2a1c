"""`duetgen serve` under hostile clients (issue 15 items 5, 6): real uvicorn with the config of
`duetgen serve` on 127.0.0.1, real sockets; every load is bounded in count and time.

An untrained tiny model is enough: nothing here needs a meaningful answer.
"""

import socket
import time

import httpx
import pytest
import torch

from live_server import live_server
from duetgen.infer.pipeline import DuetGenPipeline
from duetgen.models import builder
from duetgen.serve.guards import uvicorn_config
from duetgen.serve.common import ServeLimits
from duetgen.serve.server import create_app

torch.set_num_threads(1)
MODEL_DIR = "/srv/secret/checkpoints/shapeworld-toy"  # what `duetgen serve --model /abs/path` records


@pytest.fixture(scope="module")
def pipe():
    return DuetGenPipeline(builder.build("tiny", seed=0), model_id=MODEL_DIR)


@pytest.fixture(scope="module")
def server(pipe):
    app = create_app(pipe, ServeLimits(max_body_bytes=1 << 20))
    with live_server(app, uvicorn_config(app, "127.0.0.1", 0, head_timeout_s=1, log_level="warning")) as url:
        yield url


def test_connections_that_send_nothing_are_closed_and_do_not_starve_the_server(server):
    """Item 5: 65 sockets that connect and send nothing made every request a 503 for as long as they stayed open."""
    port = int(server.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(65)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    for s in slow:  # a request head that never ends: a byte now and then
        s.sendall(b"GET /api/health HTTP/1.1\r\nHo")
    try:
        time.sleep(0.5)
        for s in slow:
            s.sendall(b"s")
        t0 = time.monotonic()
        while True:  # the 65 idle sockets are over limit_concurrency=64 until the 1 s head deadline closes them
            r = httpx.get(f"{server}/api/health", timeout=5)
            if r.status_code == 200 or time.monotonic() - t0 > 5:
                break
            time.sleep(0.1)
        assert r.status_code == 200 and time.monotonic() - t0 < 2.5
        for s in idle + slow:  # closed by the server: recv sees EOF (or a reset), not a timeout
            s.settimeout(2)
            try:
                assert s.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in idle + slow:
            s.close()
    # a kept-alive client still works across requests
    with httpx.Client(base_url=server) as c:
        assert [c.get("/api/health").status_code for _ in range(3)] == [200, 200, 200]


@pytest.mark.parametrize("raw,field", [
    ('{"prompt": "hi", "temperature": NaN}', "temperature"),
    ('{"prompt": "hi", "temperature": Infinity}', "temperature"),
    ('{"prompt": "hi", "top_p": NaN}', "top_p"),
    ('{"prompt": "hi", "guidance_scale": NaN}', "guidance_scale"),
    ('{"prompt": "hi", "seed": 1000000000000000000000000000000}', "seed"),
    ('{"prompt": "\\ud800 hi"}', "prompt"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfffb"}]}]}', "messages[0].content[0]"),
    ('{"prompt": "hi", "image_size": [16, 65536]}', "image_size"),
])
def test_bad_values_are_4xx_naming_the_field(server, raw, field):
    """Item 6: each of these was a 500 (a 422 that could not render NaN, a seed overflow, a tokenizer TypeError)."""
    for path in ("/api/generate", "/api/generate/stream"):
        r = httpx.post(f"{server}{path}", content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
        assert field in r.text, r.text[:300]
    assert httpx.get(f"{server}/api/health").status_code == 200


def test_host_header_must_name_this_server(server, pipe):
    """Item 6: any Host was answered, so a page could reach a loopback server through DNS rebinding."""
    port = server.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        r = httpx.get(f"{server}/api/health", headers={"Host": host})
        assert r.status_code == 400 and "host" in r.text.lower(), (host, r.status_code)
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):  # /v1: OpenAI's error shape
            r = httpx.request(method, f"{server}{path}", headers={"Host": host}, json={})
            assert r.status_code == 400 and r.headers["content-type"] == "application/json", (host, path, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and "host" in error["message"].lower(), (host, path, error)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert httpx.get(f"{server}/api/health", headers={"Host": host}).status_code == 200
    app = create_app(pipe, allowed_hosts=["demo.example"])
    with live_server(app) as url:
        assert httpx.get(f"{url}/api/health", headers={"Host": "demo.example"}).status_code == 200
        assert httpx.get(f"{url}/api/health").status_code == 400  # only the names given


def test_the_model_is_shown_by_name_never_by_its_absolute_path(server):
    """Item 6: /api/health and the page header showed the server's absolute model path."""
    assert httpx.get(f"{server}/api/health").json()["model"] == "shapeworld-toy"
    assert httpx.get(f"{server}/api/model").json()["model"] == "shapeworld-toy"
    r = httpx.post(f"{server}/api/generate", json={"prompt": "hi", "max_new_tokens": 2, "max_images": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["meta"]["model"] == "shapeworld-toy"
    assert "/srv/secret" not in r.text
