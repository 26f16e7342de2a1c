"""The Ray Serve ingress's admission (`ray_serve.Forward`), without a Ray cluster: a stand-in for the replicas'
deployment handle, driven through ASGI. The cluster test is tests/test_serve_ray.py (slow)."""

import asyncio
import json

import pytest

pytest.importorskip("ray.serve")

from duetgen.serve.common import ServeLimits  # noqa: E402
from duetgen.serve.ray_serve import Forward  # noqa: E402


class Replicas:
    """A deployment handle whose calls answer 200 once ``release`` is set (or at once)."""

    def __init__(self):
        self.release = asyncio.Event()
        self.http = self

    def options(self, stream: bool):
        return self

    def remote(self, scope, body):
        release = self.release

        class Answer:
            def __init__(self):
                self.sent = iter([{"type": "http.response.start", "status": 200, "headers": []},
                                  {"type": "http.response.body", "body": body}])

            def __aiter__(self):
                return self

            async def __anext__(self):
                await release.wait()
                try:
                    return next(self.sent)
                except StopIteration:
                    raise StopAsyncIteration from None

            def cancel(self):
                pass

        return Answer()


def request(app, path="/v1/chat/completions", body=b"{}", stall=False):
    """Run one request through the ASGI app; its (status, body)."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "root_path": ""}
    sent = []

    async def receive():
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    async def go():
        await app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    return go()


def test_admission_counts_requests_with_their_body_and_frees_them():
    async def main():
        replicas = Replicas()
        app = Forward(replicas, ServeLimits(request_timeout_s=1.0, queue_size=0), capacity=2)
        # two uploads that stall hold nothing (a review: they held the capacity until the proxy's backstop)
        stalled = [asyncio.ensure_future(request(app, stall=True)) for _ in range(2)]
        running = [asyncio.ensure_future(request(app, body=b"%d" % i)) for i in range(2)]
        await asyncio.sleep(0.1)
        assert app.in_flight == 2  # the two whose bodies arrived
        status, body = await request(app)  # a third: every slot taken
        assert status == 429 and json.loads(body)["error"]["type"] == "rate_limit_error"
        replicas.release.set()
        assert [await r for r in running] == [(200, b"0"), (200, b"1")] and app.in_flight == 0
        assert [(await r)[0] for r in stalled] == [408, 408]  # the body never came within --timeout
        assert app.in_flight == 0
        assert await request(app) == (200, b"{}")

    asyncio.run(main())
