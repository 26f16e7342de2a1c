"""HTTP-level guards of `duetgen serve`, below the API: Host check, request-head deadline, 422s that render.

Each one closes a hole found by issue 15's hostile tests:

- ``hosts_to_answer`` + starlette's ``TrustedHostMiddleware``: the server accepted any ``Host``
  header, so a web page could reach a loopback server through DNS rebinding (a name that resolves
  to 127.0.0.1 after the page loaded). The Host must name the bound host (plus the loopback names
  when bound to loopback) unless the operator lists more (``--allowed-host``).
- ``RequestHeadDeadline``: uvicorn starts its keep-alive timer only after a response, so a
  connection that never sends a request is held forever; 65 of them put every request over
  ``limit_concurrency`` (503 "Exceeded concurrency limit") for as long as they stayed open. Here a
  connection must deliver a whole request line and headers within ``timeout_keep_alive`` seconds of
  connecting (or of its previous response), else it is closed.
- ``validation_error``: FastAPI's 422 echoes the offending input, and JSON cannot carry NaN or
  Infinity, so ``{"temperature": NaN}`` became a 500 while rendering its own 422. The 422 here
  names the field (``loc``) and the problem and leaves the input out.
"""

from __future__ import annotations

import h11
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # as a Host header spells them (IPv6 in brackets)


def hosts_to_answer(bound_host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Host header values the server answers: the bound host, the loopback names when bound to loopback, ``extra``."""
    host = f"[{bound_host}]" if ":" in bound_host else bound_host
    hosts = [host, *extra]
    if host in LOOPBACK_HOSTS:
        hosts += LOOPBACK_HOSTS
    return list(dict.fromkeys(hosts))


async def validation_error(request, e: RequestValidationError) -> JSONResponse:
    """422 naming each bad field and why, without echoing the input (NaN / Infinity are not JSON)."""
    detail = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
              for err in e.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


class RequestHeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (see the module docstring).

    The deadline runs from the connect (and from each response on a kept-alive connection) until
    h11 has parsed a complete request line and headers, so a client that sends nothing and one that
    sends a byte now and then are both closed after ``timeout_keep_alive`` seconds. Bodies are not
    covered: ``BodyLimit`` caps their size and ``request_timeout_s`` the generation.
    """

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_deadline = self.loop.time() + self.timeout_keep_alive
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def on_response_complete(self) -> None:
        self._head_deadline = self.loop.time() + self.timeout_keep_alive
        super().on_response_complete()  # arms uvicorn's own keep-alive timer with the same length

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # cancels the timer (uvicorn: any data ends the keep-alive wait)
        waiting_for_head = self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE
        if waiting_for_head and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            remaining = max(0.0, self._head_deadline - self.loop.time())
            self.timeout_keep_alive_task = self.loop.call_later(remaining, self.timeout_keep_alive_handler)


def uvicorn_config(app, host: str, port: int, *, head_timeout_s: int = 5, limit_concurrency: int = 64,
                   log_level: str = "info"):
    """The ``uvicorn.Config`` of ``duetgen serve`` (tests run the same one on port 0)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=RequestHeadDeadline,
                          timeout_keep_alive=head_timeout_s, limit_concurrency=limit_concurrency)
