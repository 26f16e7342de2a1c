"""What both APIs of `duetgen serve` share (`/api` in server.py, `/v1` in openai_api.py): the limits, the
admission and model lock around one pipeline, input images over HTTP, and the worker-thread pump of a stream.

Design choices:
- ``max_batch`` generations per model at a time (1: the engine keeps one KV cache and is not
  thread-safe; N with ``duetgen serve --batch N``: a ``BatchedEngine`` batches their steps); a
  bounded queue admits at most ``queue_size`` more requests, the next ones get 429 with
  Retry-After at once instead of piling up. Waiting and generating together are bounded by
  ``request_timeout_s``: a waiting request gives up with 503, a running one is cancelled (the engine
  stops at its next event) and answers 504 (JSON) or an error event (stream).
- Generation runs in a worker thread; events reach the async side through ``call_soon_threadsafe``,
  already turned into the strings a stream sends (so PNG encoding stays off the event loop). A
  client that disconnects from a stream cancels its generation.
- Both APIs take the same ``ServeLimits`` and the same ``GenerationService``, so a request on ``/v1``
  waits in the same queue as one on ``/api``; each API answers errors in its own shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import io
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from duetgen.data.images import inspect_image, to_rgb
from duetgen.data.record import RecordError
from duetgen.infer.engine import Cancelled, Finished


# ============================================================================ limits
@dataclass
class ServeLimits:
    """What one request may ask for. Defaults suit the ShapeWorld model on a CPU."""

    max_body_bytes: int = 16 << 20  # a request body (JSON with base64 images) larger than this gets 413
    max_image_bytes: int = 4 << 20  # one encoded image
    max_image_pixels: int = 4096 * 4096  # one decoded image (checked from the header, before decoding)
    max_images: int = 8  # images in one request (inputs and earlier answers together)
    max_prompt_chars: int = 4000  # all text of the conversation together
    max_messages: int = 32
    max_new_tokens: int = 1024
    max_steps: int = 100  # sampler steps per image
    max_output_pixels: int = 1024 * 1024  # height x width of a generated image
    max_output_side: int = 2048  # either side of a generated image ([16, 65536] passed the pixel cap and failed in the model)
    queue_size: int = 4  # requests that may wait while max_batch run; more get 429
    max_batch: int = 1  # answers generated together, batched through one model (duetgen.infer.batched); 1 = one at a time
    batch_image_wait: int = 8  # max_batch > 1: steps an image's start may wait for other answers (BatchedEngine.max_image_wait)
    batch_text_wait: int = 20  # max_batch > 1: steps a token may wait for drawings that end soon (BatchedEngine.max_text_wait)
    request_timeout_s: float = 300.0  # waiting + generating; then 503 (still waiting) or 504 (cancelled)
    image_store_bytes: int = 256 << 20  # /v1: generated images served by URL, oldest dropped first over this
    image_ttl_s: float = 3600.0  # /v1: how long a generated image's URL stays valid


# ============================================================================ bad input
class BadRequest(ValueError):
    """Invalid input: answered with a 4xx whose detail is this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def unicode_problem(text: str, where: str) -> str | None:
    """Why ``text`` is no valid Unicode (JSON's "\\ud800" escape decodes to a lone surrogate, which no tokenizer
    or UTF-8 takes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{where}: not valid Unicode (lone surrogate at character {e.start})"
    return None


def image_size_problem(size: tuple[int, int], limits: ServeLimits, model) -> str | None:
    """Why a requested [height, width] cannot be drawn (the server's caps, the model's grid), or None."""
    multiple = model.pixel_multiple
    if min(size) < 1 or size[0] % multiple or size[1] % multiple:
        return f"image_size={list(size)}: sides must be positive multiples of {multiple}"
    if size[0] * size[1] > limits.max_output_pixels:
        return f"image_size={list(size)} is over the cap of {limits.max_output_pixels:,} pixels"
    if max(size) > limits.max_output_side:
        return f"image_size={list(size)}: each side must be at most {limits.max_output_side}"
    max_h, max_w = model.max_image_side
    if size[0] > max_h or size[1] > max_w:
        return f"image_size={list(size)}: this model draws at most {max_h}x{max_w} (its DiT's positions end there)"
    return None


# ============================================================================ images over HTTP
def decode_image(data: str, where: str, limits: ServeLimits):
    """base64 (or a data: URL) -> RGB PIL image, checked for size, format and pixels before decoding."""
    if not isinstance(data, str) or not data:
        raise BadRequest(f"{where}: expected a base64 image string")
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise BadRequest(f"{where}: only base64 data: URLs are accepted")
    if len(data) > limits.max_image_bytes * 4 // 3 + 4:
        raise BadRequest(f"{where}: image is larger than {limits.max_image_bytes:,} bytes", status=413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: not valid base64") from None
    try:
        image = inspect_image(io.BytesIO(raw), where, max_pixels=limits.max_image_pixels)
    except RecordError as e:
        status = 413 if getattr(e, "reason", None) == "too_many_pixels" else 400  # a bomb PIL refuses, too
        raise BadRequest(str(e), status=status) from None
    return to_rgb(image)


WAIT_POLL_S = 0.25  # how often a waiting or running request checks that its client is still there


# ============================================================================ one model, max_batch generations at a time
class QueueFull(Exception):
    pass


class WaitedTooLong(TimeoutError):
    """The deadline passed while the request waited for the model (503; a generation that ran out of time: 504)."""


class FairSlots:
    """``n`` generation slots handed out in arrival order. A waiter whose client left (``cancel``) or whose
    ``deadline`` passed leaves the line (checked every WAIT_POLL_S); the next in line moves up."""

    def __init__(self, n: int):
        self.free = n
        self._line: collections.deque = collections.deque()
        self._cond = threading.Condition()

    def acquire(self, cancel: threading.Event, deadline: float) -> None:
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            try:
                while not (self.free > 0 and self._line[0] is ticket):
                    if cancel.is_set():  # the client left while waiting: its place in the queue is freed now
                        raise Cancelled("the client went away")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise WaitedTooLong("waited too long for the model (other requests were running)")
                    self._cond.wait(min(WAIT_POLL_S, left))
                self.free -= 1
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self.free += 1
            self._cond.notify_all()


class GenerationService:
    """Admission (bounded queue), the model lock, timeouts and cancellation around one pipeline.

    A handler calls ``admit`` (QueueFull: 429), then ``answer`` (one JSON answer) or ``stream`` (server-sent
    events); both release the admission when the generation ends.
    """

    def __init__(self, pipeline, limits: ServeLimits):
        self.pipeline = pipeline
        self.limits = limits
        self.slots = FairSlots(limits.max_batch)  # generations at once per model (1 unless batched), first come first served
        self._admitted = 0  # running + waiting
        self._running = 0
        self._count_lock = threading.Lock()

    def status(self) -> dict:
        with self._count_lock:
            return {"running": self._running, "waiting": self._admitted - self._running}

    def admit(self) -> None:
        with self._count_lock:
            if self._admitted >= self.limits.max_batch + self.limits.queue_size:
                raise QueueFull(f"the server is busy: {self.limits.max_batch} generation(s) running and "
                                f"{self.limits.queue_size} waiting; retry later")
            self._admitted += 1

    def release(self) -> None:
        with self._count_lock:
            self._admitted -= 1

    async def admit_and_prepare(self, prepare: Callable, *args):
        """Admission first (QueueFull: a full server refuses before decoding anything), then ``prepare(*args)`` (the
        request's images decoded) in a worker thread; its result, or its error with the place in the queue freed."""
        self.admit()
        try:
            return await run_in_threadpool(prepare, *args)
        except BaseException:
            self.release()
            raise

    def run(self, messages, config, on_event, cancel: threading.Event, deadline: float) -> Finished:
        """Blocking: wait for the model (until ``deadline``), generate, pass each event to ``on_event``."""
        self.slots.acquire(cancel, deadline)
        started = time.monotonic()
        try:
            with self._count_lock:
                self._running += 1
            finished = None
            events = self.pipeline.stream(messages, config)
            try:
                for event in events:
                    if cancel.is_set():
                        raise Cancelled("the client went away")
                    if time.monotonic() > deadline:  # (--timeout counts the wait for the model too: say both)
                        raise TimeoutError(
                            f"the request took longer than {self.limits.request_timeout_s:g} s and was stopped "
                            f"(waited {started - (deadline - self.limits.request_timeout_s):.1f} s for the model, "
                            f"generated {time.monotonic() - started:.1f} s)")
                    on_event(event)
                    if isinstance(event, Finished):
                        finished = event
            finally:
                events.close()  # cancels the engine at its next event if we stopped early
            return finished
        finally:
            with self._count_lock:
                self._running -= 1
            self.slots.release()

    async def answer(self, messages, config, on_event: Callable[[object], None] = lambda event: None,
                     disconnected: Callable[[], Awaitable[bool]] | None = None) -> Finished:
        """One admitted request to its end, in a worker thread; its errors are raised here. ``disconnected``
        (``Request.is_disconnected``) is polled while it waits and runs: a client that left cancels it."""
        cancel = threading.Event()
        deadline = time.monotonic() + self.limits.request_timeout_s
        work = asyncio.ensure_future(run_in_threadpool(self.run, messages, config, on_event, cancel, deadline))
        try:
            while disconnected is not None and not cancel.is_set():
                done, _ = await asyncio.wait({work}, timeout=WAIT_POLL_S)
                if done:
                    break
                if await disconnected():
                    cancel.set()  # the worker stops at its next event (or leaves the queue)
            return await asyncio.shield(work)  # this handler cancelled: the worker still runs until it stops
        finally:
            cancel.set()
            if not work.done():  # this handler was cancelled: the release waits for the worker to stop
                work.add_done_callback(lambda _: self.release())
            else:
                self.release()

    def stream(self, messages, config, to_sse: Callable[[object], Iterable[str]],
               error_sse: Callable[[Exception], str], first: Iterable[str] = (),
               last: Iterable[str] = ()) -> StreamingResponse:
        """One admitted request as server-sent events: ``first``, ``to_sse`` of each engine event, ``last``.

        ``to_sse`` runs in the worker thread (PNG encoding stays off the event loop); a failure is
        ``error_sse(e)`` and ends the stream (then ``last``). The client leaving cancels the generation.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        deadline = time.monotonic() + self.limits.request_timeout_s
        done = object()

        def put(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def on_event(event) -> None:
            for item in to_sse(event):
                put(item)

        def work():
            try:
                self.run(messages, config, on_event, cancel, deadline)
            except Cancelled:
                pass
            except Exception as e:  # reported in the stream; the server keeps serving
                put(error_sse(e))
            finally:
                self.release()
                put(done)

        threading.Thread(target=work, name="duetgen-request", daemon=True).start()

        async def events():
            try:
                for item in first:
                    yield item
                while (item := await queue.get()) is not done:
                    yield item
                for item in last:
                    yield item
            finally:
                cancel.set()  # the client went away (or we finished): stop the generation

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
