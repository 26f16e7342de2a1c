"""HTTP plumbing shared by the API clients: per-loop connection pool, retries with backoff, errors.

Used by ``duetgen.llm.client.LLMClient`` (chat completions) and the image-generation clients of
``duetgen.data.synthetic.image_api``; each client keeps its own wire format and result type.

Design choices:
- ``LoopPool``: one ``httpx.AsyncClient`` and one semaphore per event loop (neither may cross
  loops); the semaphore bounds requests in flight. ``trust_env=False``: proxies and netrc from the
  environment never redirect a request silently.
- ``with_retries``: 429 (honouring Retry-After, capped at ``backoff_max_s``), 5xx, timeouts and
  connection errors are ``RetryableError``; they are retried with exponential backoff and jitter
  (delay * U[0.5, 1]) so a burst of workers does not retry in lock-step. Anything else is a
  ``RequestFailed``, returned to the caller at once (other 4xx are the caller's bug).
- ``post_json`` is the one way a client sends a request: a TOTAL deadline (``asyncio.timeout``
  around connect, headers and body) and a byte cap on the reply, read as a stream. httpx timeouts
  are per operation: a judge dripping one byte at a time held a request for 31 s under
  ``--timeout 3``, and 100 MB replies, two at a time, took a judge run to 2.15 GB (issue 15). A
  missed deadline is a ``RetryableError`` (like any timeout); a reply over the cap is a
  ``RequestFailed`` (asking again would bring the same reply), so the item becomes an API error.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import re
import time
from typing import Awaitable, Callable, TypeVar

import httpx

T = TypeVar("T")


class RetryableError(Exception):
    """A failure that may pass: rate limit, server error, timeout, dropped connection."""

    def __init__(self, msg: str, retry_after: float | None = None):
        super().__init__(msg)
        self.retry_after = retry_after  # seconds the server asked us to wait (Retry-After)


class RequestFailed(Exception):
    """A request that will not succeed by retrying (or whose retries are spent: ``transient``, it may later)."""

    def __init__(self, msg: str, transient: bool = False):
        super().__init__(msg)
        self.transient = transient


class LoopPool:
    """An ``httpx.AsyncClient`` and a semaphore for the running event loop, rebuilt on a new loop."""

    def __init__(self, *, timeout_s: float, max_concurrency: int, headers: dict):
        self.timeout_s, self.max_concurrency, self.headers = timeout_s, max_concurrency, headers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None

    def get(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use on this loop: a client and a semaphore bound to it
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), headers=self.headers,
                                           limits=limits, trust_env=False)
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        return self._http, self._sem

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        self._http, self._loop, self._sem = None, None, None


async def with_retries(attempt: Callable[[], Awaitable[T]], sem: asyncio.Semaphore, *, max_retries: int,
                       backoff_base_s: float, backoff_max_s: float,
                       count: Callable[..., None] = lambda **_: None) -> T:
    """``await attempt()`` under ``sem`` until it does not raise ``RetryableError``.

    ``count(http_requests=1)`` is called per attempt and ``count(retries=1)`` per retry (the
    clients' usage totals). Raises ``RequestFailed`` when the retries are spent; a
    ``RequestFailed`` from ``attempt`` passes through at once.
    """
    last = ""
    for i in range(max_retries + 1):
        try:
            async with sem:  # the wait below is outside: a sleeping retry does not hold a slot
                count(http_requests=1)
                return await attempt()
        except RetryableError as e:
            last = str(e)
            if i == max_retries:
                break
            delay = min(backoff_max_s, backoff_base_s * 2**i) * random.uniform(0.5, 1.0)
            if e.retry_after is not None:
                delay = max(delay, min(e.retry_after, backoff_max_s))
            count(retries=1)
            await asyncio.sleep(delay)
    raise RequestFailed(f"{last} (gave up after {max_retries + 1} attempts)", transient=True)


@contextlib.contextmanager
def transport_errors(timeout_s: float):
    """httpx timeouts and connection failures (refused, reset, protocol errors) as ``RetryableError``."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise RetryableError(f"timeout after {timeout_s}s ({type(e).__name__})") from None
    except httpx.TransportError as e:
        raise RetryableError(f"connection error: {type(e).__name__}: {e}") from None


DEFAULT_MAX_REPLY_BYTES = 8 << 20  # a chat reply is text: 8 MB is ~2M tokens, far above any max_tokens


async def post_json(http: httpx.AsyncClient, url: str, body: dict, *, timeout_s: float,
                    max_bytes: int) -> tuple[httpx.Response, bytes]:
    """POST ``body`` as JSON; (response, raw reply body) read within ``timeout_s`` in all and at most ``max_bytes``.

    Raises ``RetryableError`` for a missed deadline or a transport failure, ``RequestFailed`` for a
    reply over the cap (by Content-Length, before reading, or while streaming). The status is not
    checked here: call ``check_status``.
    """
    try:
        async with asyncio.timeout(timeout_s):
            with transport_errors(timeout_s):
                async with http.stream("POST", url, json=body) as resp:
                    declared = resp.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise RequestFailed(f"reply of {int(declared):,} bytes (Content-Length) is over the cap "
                                            f"of {max_bytes:,} bytes")
                    chunks, size = [], 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise RequestFailed(f"reply larger than the cap of {max_bytes:,} bytes")
                        chunks.append(chunk)
    except TimeoutError:  # asyncio.timeout: the whole exchange, not one read, took too long
        raise RetryableError(f"no complete reply within the {timeout_s:g} s deadline") from None
    return resp, b"".join(chunks)


def check_status(resp: httpx.Response, body_text: str) -> None:
    """Raise for anything but HTTP 200: 429 and 5xx are retryable, other codes are not.

    ``body_text`` is the start of the reply body, quoted in the error.
    """
    if resp.status_code == 429:
        raise RetryableError("HTTP 429 rate limited", parse_retry_after(resp.headers.get("retry-after")))
    if resp.status_code >= 500:
        raise RetryableError(f"HTTP {resp.status_code}: {body_text[:200]}")
    if resp.status_code in (408, 409, 425):  # request timeout, conflict, too early: may pass at once
        raise RetryableError(f"HTTP {resp.status_code}: {body_text[:200]}")
    if resp.status_code != 200:  # not retried now; 401 / 402 / 403 / 404 (a key, credits, a model name) and an
        # account-side 400 (Gemini answers a bad key and an unsupported region with 400) may pass once fixed
        raise RequestFailed(f"HTTP {resp.status_code} (not retried): {body_text[:300]}",
                            transient=resp.status_code in (401, 402, 403, 404)
                            or resp.status_code == 400 and bool(_ACCOUNT_SIDE.search(body_text)))


# words of a 400 that is about the caller's account, not the request (Gemini: API_KEY_INVALID, "API key not
# valid", FAILED_PRECONDITION "User location is not supported"; billing and credits elsewhere)
_ACCOUNT_SIDE = re.compile(r"API_KEY|API key|FAILED_PRECONDITION|location is not supported|billing|credits",
                           re.IGNORECASE)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # HTTP-date form
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
