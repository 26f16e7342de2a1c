"""Run an ASGI app with uvicorn on 127.0.0.1 and a free port, in a background thread (for HTTP and browser tests)."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn


@contextlib.contextmanager
def live_server(app, config: uvicorn.Config | None = None):
    """Yield the base URL ("http://127.0.0.1:PORT") of a real server running ``app``; stop it afterwards.

    ``config``: a ready ``uvicorn.Config`` (on 127.0.0.1, port 0) instead of uvicorn's defaults.
    """
    config = config or uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
