"""`duetgen serve`: a chat page and an HTTP API (JSON and server-sent events) over one DuetGen model.

    GET  /                     the chat page (text streams in, images appear as they are drawn, image upload)
    GET  /api/health           {"status": "ok", "model": ..., "running": 0|1, "waiting": n}
    GET  /api/model            the model's defaults and this server's limits
    POST /api/generate         one answer as JSON: the record, images as PNG data URLs
    POST /api/generate/stream  the same as server-sent events: text, image_started, step, image_done, finished | error
    GET  /openapi.json         the API, documented (FastAPI)
    /v1/...                    the OpenAI-compatible API (duetgen.serve.openai_api)

Design choices:
- ``ServeLimits.max_batch`` generations per model at a time (1 unless ``duetgen serve --batch N``);
  a bounded queue admits at most ``queue_size`` more requests, the next ones get 429 with
  Retry-After at once instead of piling up. Waiting and generating together are bounded by
  ``request_timeout_s``: a waiting request gives up with 503, a running one is cancelled (the engine
  stops at its next event) and answers 504 (JSON) or an ``error`` event (stream). Admission, the
  model lock and the stream's worker thread are ``duetgen.serve.common``'s, shared with ``/v1``.
- Everything that arrives is untrusted: the body is capped while it is read (413, also for bodies
  without Content-Length), images are base64 PNG/JPEG/WEBP/GIF checked for format and pixel count
  before decoding (``duetgen.data.images.inspect_image``), the prompt length, image count and every
  setting have caps. A bad request is a 4xx whose ``detail`` names the field and the problem; the
  server keeps serving. Images never come as paths or URLs: the server reads no file and fetches
  nothing on a client's behalf.
- Binds 127.0.0.1 by default. The page and its script are static files of this package; text from
  the model is inserted with ``textContent`` only, never as HTML.
- Generation runs in a worker thread (``GenerationService.answer`` / ``.stream``). A client that
  disconnects from the stream cancels its generation.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from duetgen.data.images import encode_png
from duetgen.data.record import ImagePart, Message, RecordError, TextPart
from duetgen.infer.engine import Cancelled, DenoisingStep, Finished, GenerationConfig, ImageDone, ImageStarted, TextDelta
from duetgen.serve.common import (BadRequest, GenerationService, QueueFull, ServeLimits, WaitedTooLong,
                                  decode_image, image_size_problem, unicode_problem)
from duetgen.serve.guards import LOOPBACK_HOSTS, hosts_to_answer, uvicorn_config, validation_error
from duetgen.serve.openai_api import mount_openai_api

log = logging.getLogger("duetgen.serve")

STATIC_DIR = Path(__file__).parent / "static"


# ============================================================================ API schema
class Part(BaseModel):
    type: Literal["text", "image"]
    text: str | None = Field(None, description="for type=text")
    image: str | None = Field(None, description="for type=image: base64 PNG/JPEG/WEBP/GIF, optionally a data: URL")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: list[Part]


class GenerateRequest(BaseModel):
    """Either ``prompt`` (+ ``images``) for a single user turn, or a whole ``messages`` conversation."""

    prompt: str | None = Field(None, description="the user's request (a single-turn chat)",
                               examples=["How do I arrange a red circle at the top left and a blue square in the center?"])
    images: list[str] = Field(default_factory=list, description="input images for `prompt` (base64 or data: URLs), shown before its text")
    messages: list[ChatMessage] | None = Field(None, description="a conversation; the answer continues it")
    seed: int = Field(0, ge=-(2**63), lt=2**63, description="a signed 64-bit integer (torch's seed range)")
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    num_steps: int | None = Field(None, ge=1, description="sampler steps per image; default: the model's")
    guidance_scale: float | None = Field(None, gt=0, allow_inf_nan=False, description="w in v_neg + w (v_pos - v_neg); 1 = none; default: the model's")
    max_new_tokens: int = Field(512, ge=1)
    max_images: int | None = Field(None, ge=0, description="generated images at most")
    image_size: list[int] | None = Field(None, min_length=2, max_length=2, description="[height, width] of generated images")


class AnswerPart(BaseModel):
    type: Literal["text", "image"]
    text: str | None = None
    index: int | None = Field(None, description="image: its index among the message's images")
    image: str | None = Field(None, description="image: PNG data URL")


class GenerateResponse(BaseModel):
    id: str
    messages: list[dict] = Field(description="the conversation and the answer, images as PNG data URLs")
    answer: list[AnswerPart]
    meta: dict


# ============================================================================ request -> messages and settings
def image_data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def request_messages(req: GenerateRequest, limits: ServeLimits) -> list[Message]:
    """The request as record messages with decoded images; BadRequest naming the field on any problem."""
    if (req.prompt is None) == (req.messages is None):
        raise BadRequest("give exactly one of `prompt` or `messages`")
    if req.prompt is not None:
        if not req.prompt.strip():
            raise BadRequest("prompt is empty")
        raw = [ChatMessage(role="user", content=[*(Part(type="image", image=i) for i in req.images),
                                                  Part(type="text", text=req.prompt)])]
        names = [f"images[{i}]" for i in range(len(req.images))] + ["prompt"]
    else:
        if req.images:
            raise BadRequest("`images` goes with `prompt`; put images inside `messages` instead")
        if not req.messages:
            raise BadRequest("messages is empty")
        raw = req.messages
        names = [f"messages[{i}].content[{j}]" for i, m in enumerate(raw) for j in range(len(m.content))]
    if len(raw) > limits.max_messages:
        raise BadRequest(f"{len(raw)} messages, over the cap of {limits.max_messages}")
    n_images = sum(p.type == "image" for m in raw for p in m.content)
    if n_images > limits.max_images:
        raise BadRequest(f"{n_images} images, over the cap of {limits.max_images}", status=413)
    chars = sum(len(p.text or "") for m in raw for p in m.content)
    if chars > limits.max_prompt_chars:
        raise BadRequest(f"prompt is {chars:,} characters, over the cap of {limits.max_prompt_chars:,}", status=413)
    messages, k = [], 0
    for m in raw:
        content = []
        for p in m.content:
            where = names[k]
            k += 1
            if p.type == "text":
                if p.text is None:
                    raise BadRequest(f"{where}: a text part needs `text`")
                if problem := unicode_problem(p.text, where):
                    raise BadRequest(problem)
                content.append(TextPart(p.text))
            else:
                content.append(ImagePart(decode_image(p.image, where, limits)))
        messages.append(Message(m.role, content))
    if messages[-1].role == "user" and not any(
            isinstance(p, ImagePart) or p.text.strip() for p in messages[-1].content):
        raise BadRequest("the last user message is empty")
    return messages


def request_config(req: GenerateRequest, limits: ServeLimits, model) -> GenerationConfig:
    if req.num_steps is not None and req.num_steps > limits.max_steps:
        raise BadRequest(f"num_steps={req.num_steps} is over the cap of {limits.max_steps}")
    if req.max_new_tokens > limits.max_new_tokens:
        raise BadRequest(f"max_new_tokens={req.max_new_tokens} is over the cap of {limits.max_new_tokens}")
    size = tuple(req.image_size) if req.image_size is not None else None
    if size is not None and (problem := image_size_problem(size, limits, model)):
        raise BadRequest(problem)
    try:  # checked here, once: the engine resolves the model's defaults but does not check again
        return GenerationConfig(max_new_tokens=req.max_new_tokens, max_images=req.max_images,
                                temperature=req.temperature, top_p=req.top_p, seed=req.seed, num_steps=req.num_steps,
                                guidance_scale=req.guidance_scale, image_size=size)
    except ValueError as e:
        raise BadRequest(str(e)) from None


# ============================================================================ events on the wire
def event_json(event) -> tuple[str, dict]:
    if isinstance(event, TextDelta):
        return "text", {"text": event.text}
    if isinstance(event, ImageStarted):
        return "image_started", {"index": event.index, "height": event.height, "width": event.width}
    if isinstance(event, DenoisingStep):
        return "step", {"index": event.index, "step": event.step, "num_steps": event.num_steps}
    if isinstance(event, ImageDone):
        return "image_done", {"index": event.index, "image": image_data_url(event.image), "seconds": event.seconds}
    if isinstance(event, Finished):
        return "finished", {"id": event.record.id, "finish_reason": event.reason, "stats": event.stats,
                            "answer": answer_json(event.content, with_images=False)}
    raise TypeError(f"unknown event {type(event).__name__}")


def answer_json(content, with_images: bool = True) -> list[dict]:
    out, k = [], 0
    for p in content:
        if isinstance(p, TextPart):
            out.append({"type": "text", "text": p.text})
        else:
            out.append({"type": "image", "index": k, **({"image": image_data_url(p.image)} if with_images else {})})
            k += 1
    return out


def sse(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_error(e: Exception) -> str:
    """A failure during a stream: an ``error`` event (timeouts and prompt problems as they are)."""
    detail = str(e) if isinstance(e, (TimeoutError, RecordError)) else f"generation failed: {type(e).__name__}: {e}"
    return sse("error", {"detail": detail})


# ============================================================================ body size cap (ASGI)
class BodyLimit:
    """413 for a request body over ``max_bytes``, by Content-Length or while it streams in (chunked).

    The body is read here, up to the cap, before the app sees it (at most ``max_bytes`` in memory):
    an exception raised from inside the app's body parsing would be turned into a 400 by FastAPI.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send)
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client disconnected
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._too_large(send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications (streaming responses)

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        body = json.dumps({"detail": f"request body is over the cap of {self.max_bytes:,} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ============================================================================ the app
def create_app(pipeline, limits: ServeLimits | None = None, allowed_hosts: list[str] | None = None,
               image_store=None) -> FastAPI:
    """The ASGI app over one ``DuetGenPipeline`` (run it with uvicorn; ``duetgen serve`` does).

    ``allowed_hosts``: the ``Host`` header values answered (``guards.hosts_to_answer``); default the
    loopback names, ``["*"]`` for any. Any other Host gets 400 (DNS rebinding onto a local server).
    ``image_store``: where /v1 keeps generated images (default: an ``openai_api.ImageStore`` in this
    process; Ray Serve replicas share one, ``ray_serve.RemoteImageStore``).
    """
    limits = limits or ServeLimits()
    model_name = Path(pipeline.model_id).name or pipeline.model_id  # never the server's absolute path
    if limits.max_batch > 1 and getattr(pipeline.engine, "max_batch", 1) != limits.max_batch:
        from duetgen.infer.batched import BatchedEngine

        pipeline.engine = BatchedEngine(pipeline.model, limits.max_batch, max_image_wait=limits.batch_image_wait,
                                        max_text_wait=limits.batch_text_wait)  # concurrent requests share batched steps
    service = GenerationService(pipeline, limits)
    app = FastAPI(
        title="DuetGen",
        version="1",
        description="Interleaved text-and-image generation: an MLLM writes, a video DiT draws (DuetGen). "
                    "One generation at a time per model unless the server batches (--batch N); see docs/serving.md "
                    "for limits and events.",
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; /openapi.json is the contract
    )
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest):
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": "5"})

    app.add_exception_handler(RequestValidationError, validation_error)  # a 422 whose input was NaN rendered as 500

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/api/health", summary="Liveness and queue state")
    async def health():
        return {"status": "ok", "model": model_name, **service.status()}

    @app.get("/api/model", summary="The model's defaults and this server's limits")
    async def model_info():
        cfg = pipeline.model.config
        return {"model": model_name, "preset": cfg.preset, "image_size": list(cfg.image_size),
                "num_steps": cfg.sampler.num_steps, "guidance_scale": cfg.guidance_scale,
                "max_images": cfg.max_images, "pixel_multiple": pipeline.model.pixel_multiple,
                "limits": asdict(limits)}

    def prepare(req: GenerateRequest):
        messages = request_messages(req, limits)
        config = request_config(req, limits, pipeline.model)
        try:
            messages = pipeline.messages(messages)  # the pipeline's own checks (same as the Python API)
        except (ValueError, RecordError) as e:
            raise BadRequest(str(e)) from None
        return messages, config

    @app.post("/api/generate", response_model=GenerateResponse, response_model_exclude_none=True,
              summary="Generate one answer (JSON)",
              responses={400: {"description": "bad input"}, 413: {"description": "body, image or prompt too large"},
                         429: {"description": "queue full"}, 500: {"description": "the model failed"},
                         503: {"description": "waited too long"}, 504: {"description": "generation timed out"}})
    async def generate(req: GenerateRequest, request: Request):
        messages, config = await service.admit_and_prepare(prepare, req)
        try:
            finished = await service.answer(messages, config, disconnected=request.is_disconnected)
        except TimeoutError as e:
            status = 503 if isinstance(e, WaitedTooLong) else 504
            return JSONResponse({"detail": str(e)}, status_code=status)
        except RecordError as e:  # found while rendering the prompt (e.g. an image's aspect ratio)
            return JSONResponse({"detail": str(e)}, status_code=400)
        except Cancelled:  # the client left: nobody reads this answer, and nothing failed
            return JSONResponse({"detail": "the client went away"}, status_code=499)
        except Exception as e:  # a failure inside the model: reported, and the server keeps serving
            log.exception("generation failed")
            return JSONResponse({"detail": f"generation failed: {type(e).__name__}: {e}"}, status_code=500)
        record = finished.record
        return {"id": record.id, "answer": answer_json(finished.content),
                "messages": [{"role": m.role, "content": answer_json(m.content)} for m in record.messages],
                "meta": {**record.meta, "model": model_name}}

    @app.post("/api/generate/stream", summary="Generate one answer as server-sent events",
              response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "events: text {text}, image_started {index, height, width}, "
                                              "step {index, step, num_steps}, image_done {index, image: PNG data URL, seconds}, "
                                              "finished {id, finish_reason, stats, answer}, error {detail}"},
                         400: {"description": "bad input"}, 413: {"description": "too large"},
                         429: {"description": "queue full"}})
    async def generate_stream(req: GenerateRequest, request: Request):
        messages, config = await service.admit_and_prepare(prepare, req)  # 429 before the stream starts
        return service.stream(messages, config, lambda event: [sse(*event_json(event))], stream_error)

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS))  # before the body
    mount_openai_api(app, service, limits, image_store)  # /v1; its error rewriting (outermost) wraps the Host check and body cap
    return app


def serve(pipeline, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
          allowed_hosts: list[str] | None = None) -> None:
    """Run the server until interrupted (``duetgen serve``).

    The Host header must name ``host`` (or a loopback name when bound to loopback) or one of
    ``allowed_hosts`` (``["*"]``: any; for a server behind a proxy that checks it).
    """
    import uvicorn

    app = create_app(pipeline, limits, allowed_hosts=hosts_to_answer(host, allowed_hosts or ()))
    uvicorn.Server(uvicorn_config(app, host, port)).run()
