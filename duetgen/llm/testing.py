"""A local OpenAI-compatible chat server for tests and benchmarks (a double for paid APIs).

It is a real HTTP server on 127.0.0.1 (stdlib ``ThreadingHTTPServer`` in a daemon thread), so the
client under test goes through real sockets, real JSON and real status codes.

Design choices:
- Answers come from a ``responder(body) -> str | dict`` function the test supplies (default: echo
  the last user text), so answers are deterministic and can depend on the prompt. A dict may set
  ``content``, ``finish_reason`` and ``refusal`` (then ``content`` defaults to null, as OpenAI's
  structured-output refusals send it).
- Faults are a FIFO the test fills with ``inject("429", "500", "timeout", "malformed_body",
  "drop", "drip", "huge", "huge_declared")``; each request takes the next one, so "fail twice then
  succeed" is two entries. ``drip`` sends a valid reply one byte every 50 ms (6 s at most);
  ``huge`` streams ``huge_bytes`` of filler (``huge_declared`` with a Content-Length).
- It measures what the tests assert on: request count, the bodies received, and the maximum
  number of requests in flight at once (the client's concurrency bound).
- The plumbing every local test server needs is here too, for the other doubles (web site, judge,
  image APIs): ``LocalHandler`` (keep-alive, TCP_NODELAY, quiet, ``send_json`` / ``send_bytes``) and
  ``serve_in_thread`` / ``stop_server`` (127.0.0.1, a free port, a daemon thread).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


class LocalHandler(BaseHTTPRequestHandler):
    """Base request handler of the local test servers: HTTP/1.1 keep-alive, no Nagle delay, no log."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Headers and body go out as two writes; with Nagle on, the second waits for the
        # client's delayed ACK (~40 ms per request, measured). Real servers set this too.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):  # quiet
        pass

    def send_bytes(self, code: int, content_type: str, data: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def send_json(self, code: int, obj: Any, headers: dict | None = None) -> None:
        self.send_bytes(code, "application/json", json.dumps(obj).encode(), headers)

    def send_dripping(self, data: bytes, interval_s: float = 0.05, max_s: float = 6.0) -> None:
        """200 with ``data`` sent one byte every ``interval_s`` (for at most ``max_s``): every read
        of the client succeeds, so only a total deadline stops it."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.close_connection = True
        t0 = time.monotonic()
        try:
            for b in data:
                if time.monotonic() - t0 > max_s:
                    return
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(interval_s)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send_huge(self, total_bytes: int, declare: bool = False) -> None:
        """200 with ``total_bytes`` of JSON-looking filler, with or without a Content-Length."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if declare:
            self.send_header("Content-Length", str(total_bytes))
        self.end_headers()
        self.close_connection = True
        chunk = b" " * (1 << 20)
        try:
            for _ in range(total_bytes // len(chunk)):
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading at its cap
            pass


class _LocalHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a handler a test left stalled
    request_queue_size = 128  # bursts of concurrent clients in the concurrency tests


def serve_in_thread(handler: type[BaseHTTPRequestHandler], name: str = "local-http") -> ThreadingHTTPServer:
    """A threading HTTP server on 127.0.0.1 at a free port, serving from a daemon thread."""
    httpd = _LocalHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name=name).start()
    return httpd


def stop_server(httpd: ThreadingHTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()


def echo_responder(body: dict) -> str:
    """Reply with the last user message's text parts."""
    last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    if isinstance(last, str):
        return f"echo: {last}"
    return "echo: " + " ".join(p["text"] for p in last if p.get("type") == "text")


class FakeOpenAIServer:
    def __init__(self, responder: Callable[[dict], Any] = echo_responder, latency_s: float = 0.0,
                 timeout_sleep_s: float = 3.0, retry_after: str = "0"):
        self.responder = responder
        self.latency_s = latency_s  # added to every request (the benchmark's 200 ms)
        self.timeout_sleep_s = timeout_sleep_s  # how long a "timeout" fault stalls before answering
        self.retry_after = retry_after  # the Retry-After header a "429" fault sends
        self.huge_bytes = 64 << 20  # the size of a "huge" fault's reply
        self.faults: deque[str] = deque()
        self.bodies: list[dict] = []
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # ----------------------------------------------------------------------------- control
    def inject(self, *faults: str) -> None:
        for f in faults:
            if f not in ("429", "500", "503", "timeout", "malformed_body", "drop", "400", "drip", "huge", "huge_declared"):
                raise ValueError(f"unknown fault {f!r}")
            self.faults.append(f)

    def reset_stats(self) -> None:
        with self._lock:
            self.bodies.clear()
            self.requests = self.max_in_flight = 0

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(LocalHandler):
            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(n)
                with server._lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    fault = server.faults.popleft() if server.faults else None
                try:
                    self._answer(raw, fault)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, raw: bytes, fault: str | None):
                if server.latency_s:
                    time.sleep(server.latency_s)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self.send_json(404, {"error": f"no route {self.path}"})
                if fault == "timeout":
                    time.sleep(server.timeout_sleep_s)
                    return self.send_json(500, {"error": "stalled"})
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "429":
                    return self.send_json(429, {"error": "rate limited"}, {"Retry-After": server.retry_after})
                if fault in ("500", "503", "400"):
                    return self.send_json(int(fault), {"error": f"injected {fault}"})
                if fault == "drip":
                    return self.send_dripping(b'{"choices": [{"message": {"role": "assistant", "content": "slow"}}]}')
                if fault in ("huge", "huge_declared"):
                    return self.send_huge(server.huge_bytes, declare=fault == "huge_declared")
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    return self.send_json(400, {"error": "body is not JSON"})
                with server._lock:
                    server.bodies.append(body)
                if fault == "malformed_body":
                    return self.send_bytes(200, "application/json", b'{"choices": [ {"mess')
                reply = server.responder(body)
                if isinstance(reply, str):
                    reply = {"content": reply}
                message = {"role": "assistant", "content": reply.get("content")}
                if "refusal" in reply:
                    message["refusal"] = reply["refusal"]
                said = str(reply.get("refusal") or message["content"])
                prompt_words = len(json.dumps(body["messages"]).split())
                self.send_json(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": message, "finish_reason": reply.get("finish_reason", "stop")}],
                    "usage": reply.get("usage", {"prompt_tokens": prompt_words, "completion_tokens": len(said.split()),
                                                 "total_tokens": prompt_words + len(said.split())}),
                })

        self._httpd = serve_in_thread(Handler, "fake-openai")
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            stop_server(self._httpd)
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
