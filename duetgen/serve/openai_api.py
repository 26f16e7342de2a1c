"""The OpenAI-compatible API of `duetgen serve`: `/v1`, so OpenAI clients and markdown chat front-ends work as they are.

    GET  /v1/models                  the served model, as an OpenAI model list
    GET  /v1/models/{model}          one model
    POST /v1/chat/completions        OpenAI chat messages in; the interleaved answer out as markdown
    GET  /v1/images/{sha256}.png     an image of an earlier answer (content-addressed, kept for a while)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    r = client.chat.completions.create(model="shapeworld-toy", seed=0, extra_body={"steps": 10},
                                       messages=[{"role": "user", "content": "Draw a purple square at the bottom."}])
    r.choices[0].message.content   # 'The purple square is at the bottom.\\n\\n![image 1](http://.../v1/images/3fa9....png)\\n\\n'

Design choices:
- The answer is markdown: text as the model wrote it, and each image at the place the model drew
  it as ``\\n\\n![image k](URL)\\n\\n`` (k from 1). Any OpenAI client gets a plain string, any
  markdown front-end shows the interleaved answer inline. The separators are added exactly once on
  each side, so an assistant message sent back in a later request is split into the same text and
  images again (``split_markdown_images``); an assistant message is the only place where markdown
  links become images, and only this server's own image URLs and ``data:`` URLs do.
- Images are served from an in-memory store keyed by the SHA-256 of their PNG bytes
  (``ImageStore``): the same picture has one URL, and the store is bounded by
  ``ServeLimits.image_store_bytes`` (oldest out first) and ``image_ttl_s`` (then 404). A client
  that wants the answer self-contained asks ``image_output="data_url"``.
- Input images come as ``data:`` URLs (checked for format, bytes and pixels before decoding, as
  on ``/api``) or as this server's own ``/v1/images/`` URLs (same host as the request, looked up in
  the store). Nothing else: the server never fetches a URL for a client (no SSRF through the API).
- One generation pipeline under both APIs: requests go through the same ``GenerationService`` as
  ``/api`` (the bounded queue and 429, the model lock, the request timeout, the stream's worker
  thread, cancellation when a stream's client leaves) and the same ``ServeLimits`` (body, pixels,
  images, prompt characters, messages, tokens, steps, output pixels), both in ``duetgen.serve.common``.
- Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx whose
  ``param`` names the field (``messages[0].content[1].image_url.url``). The ``OpenAIErrors``
  middleware rewrites the other errors that reach a ``/v1`` path (the body cap's 413, FastAPI's
  schema errors, which become 400 as OpenAI answers them, unknown routes) into the same shape.
- OpenAI fields DuetGen cannot honour (``n > 1``, ``stop``, penalties, ``logprobs``, ``tools``,
  a JSON ``response_format``, ...) are refused with a 400 naming the field, never silently ignored;
  an unknown field is a 400 too. DuetGen's own settings are extra fields of the body (the openai
  client's ``extra_body``): ``guidance``, ``steps``, ``image_size`` ([height, width]),
  ``max_images``, ``image_output``.
- Defaults: ``temperature`` 0 (the model's greedy decoding, not OpenAI's 1); no ``seed`` draws one
  per request (so a front-end's "regenerate" gives new pictures) and the answer reports it in
  ``duetgen.seed``, so any answer can be reproduced.
- ``usage``: ``prompt_tokens`` is the rendered prompt (text and input-image tokens),
  ``completion_tokens`` the sampled tokens (text and one ``<BOV>`` per image), plus ``images`` (drawn)
  and ``image_tokens`` (the vision tokens the engine wrote for them, not sampled, not in
  ``completion_tokens``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.concurrency import run_in_threadpool

from duetgen.data.images import encode_png, inspect_image, to_rgb
from duetgen.data.record import ImagePart, Message, RecordError, TextPart
from duetgen.infer.engine import Cancelled, Finished, GenerationConfig, ImageDone, TextDelta
from duetgen.models.image_processor import MAX_ASPECT_RATIO
from duetgen.serve.common import (BadRequest, QueueFull, ServeLimits, WaitedTooLong, decode_image,
                                  image_size_problem, unicode_problem)

log = logging.getLogger("duetgen.serve")

IMAGE_PATH = re.compile(r"^/v1/images/(?P<sha>[0-9a-f]{64})\.png$")
# an image link as this module writes it; the separators are part of the match (see module docstring)
MARKDOWN_IMAGE = re.compile(r"(?:\n\n)?!\[[^\]\n]*\]\((?P<url>[^)\s]+)\)(?:\n\n)?")
FINISH_REASONS = {"end_of_turn": "stop", "max_tokens": "length", "max_images": "length"}


# ============================================================================ errors
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_type(status: int) -> str:
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status in (503, 504):
        return "timeout_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)


def field_path(loc) -> str:
    """A pydantic error location -> ``messages[0].content[1].image_url.url`` (union branch names dropped, and the
    tag a discriminated union's item puts before its fields: ``content[1].text.text`` is ``content[1].text``)."""
    out, tagged, tag_next = "", False, False
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
            tag_next, tagged = tagged, False
        elif "[" in part or part in ("str", "list", "int", "float", "bool", "dict", "none"):
            tagged = "tagged-union[" in part  # pydantic's name for a union branch, e.g. "list[tagged-union[...]]"
        elif tag_next:
            tag_next = False  # the item's tag ("text", "image_url"), not a field
        else:
            out += f".{part}" if out else part
    return out


def _from_detail(status: int, detail) -> tuple[int, dict]:
    """A FastAPI / Starlette error body ``{"detail": ...}`` -> (status, OpenAI error body)."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):  # a schema error (422)
        deepest = max(detail, key=lambda d: len(d.get("loc", ())))  # the most specific branch of a union
        if deepest.get("type") == "json_invalid":  # its loc is a character offset, not a field
            why = deepest.get("ctx", {}).get("error")  # (empty for some inputs)
            at = next((part for part in reversed(deepest.get("loc", ())) if isinstance(part, int)), None)
            message = "the request body is not valid JSON" + (f" at offset {at}" if at is not None else "")  # from 0
            return 400, error_body(400, message + (f": {why}" if why else ""), None, "json_invalid")
        param = field_path(deepest.get("loc", ())) or None
        if deepest.get("type") == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        else:
            message = f"{param}: {deepest.get('msg', 'invalid')}" if param else str(deepest.get("msg"))
        return 400, error_body(400, message, param, deepest.get("type"))
    return status, error_body(status, detail if isinstance(detail, str) else json.dumps(detail))


class OpenAIErrors:
    """ASGI middleware: an error (4xx/5xx, ``{"detail": ...}`` or plain text) on a ``/v1`` path is rewritten in OpenAI's shape.

    Catches what the /v1 handlers do not answer themselves: the Host check's 400 (plain text from
    starlette), the body cap's 413, schema errors, 404 and 405 of unknown routes, a 500 of the
    framework. Bodies already in OpenAI's shape and successful responses pass as they are.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        held: dict = {}
        chunks: list[bytes] = []

        async def rewrite(message):
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                if message["status"] >= 400 and content_type.startswith((b"application/json", b"text/plain")):
                    held["start"] = message  # hold the start until the whole (small) body is here
                    return
                return await send(message)
            if "start" not in held or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            start = held.pop("start")
            status, body = start["status"], b"".join(chunks)
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict) and "detail" in data and "error" not in data:
                status, data = _from_detail(status, data["detail"])
                body = json.dumps(data, ensure_ascii=False).encode()
            elif data is None:  # plain text, e.g. starlette's "Invalid host header"
                text = body.decode("utf-8", errors="replace").strip() or f"HTTP {status}"
                body = json.dumps(error_body(status, text), ensure_ascii=False).encode()
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k.lower() not in (b"content-length", b"content-type")]
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


# ============================================================================ generated images, served by content
class ImageStore:
    """PNG bytes by SHA-256, at most ``max_bytes`` in all (oldest out first), each for ``ttl_s`` seconds."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # sha -> (png, stored at), oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        sha = hashlib.sha256(png).hexdigest()
        with self._lock:
            if sha in self._items:
                self._bytes -= len(self._items.pop(sha)[0])  # stored again: now the newest
            self._items[sha] = (png, time.monotonic())
            self._bytes += len(png)
            self._evict()
        return sha

    def get(self, sha: str) -> bytes | None:
        with self._lock:
            self._evict()
            item = self._items.get(sha)
            return item[0] if item else None

    def _evict(self) -> None:
        expired = time.monotonic() - self.ttl_s
        while self._items:
            sha, (png, stored) = next(iter(self._items.items()))
            if stored > expired and self._bytes <= self.max_bytes:
                break
            del self._items[sha]
            self._bytes -= len(png)


# ============================================================================ request schema
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="a data: URL (base64 PNG/JPEG/WEBP/GIF) or this server's /v1/images/<sha256>.png URL")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted, no effect: images are seen at the model's resolution")


class TextContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextContent | ImageContent, Field(discriminator="type")]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, description="accepted, not shown to the model")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, strict=True)


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request, plus DuetGen's own settings (``extra_body`` in the openai client)."""

    model_config = ConfigDict(extra="forbid")  # an unknown field is an error, not silently ignored

    model: str
    messages: list[ChatMessageIn]
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="default 0 (greedy), the model's default")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63, strict=True, description="default: drawn per request, returned in duetgen.seed")
    max_tokens: int | None = Field(None, ge=1, strict=True, description="sampled tokens (text and one <BOV> per image)")
    max_completion_tokens: int | None = Field(None, ge=1, strict=True, description="same as max_tokens")
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, strict=True, description="only 1: one answer per request")
    user: str | None = Field(None, description="accepted, not used")
    # OpenAI fields DuetGen does not implement: accepted only at their neutral value (see UNSUPPORTED)
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    # DuetGen
    guidance: float | None = Field(None, gt=0, allow_inf_nan=False, description="guidance scale w of every image; 1 = none; default: the model's")
    steps: int | None = Field(None, ge=1, strict=True, description="sampler steps per image; default: the model's")
    image_size: list[StrictInt] | None = Field(None, min_length=2, max_length=2, description="[height, width] of generated images")
    max_images: int | None = Field(None, ge=0, strict=True, description="generated images at most")
    image_output: Literal["url", "data_url"] = Field("url", description="images in the answer as this server's URLs or as data: URLs")


UNSUPPORTED = {  # field -> values that mean "not used"
    "stop": (None, [], ""), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
}


# ============================================================================ request -> messages and settings
class Translator:
    """OpenAI messages -> record messages with PIL images, under ``limits``; APIError naming the field."""

    def __init__(self, limits: ServeLimits, store: ImageStore):
        self.limits, self.store = limits, store

    @staticmethod
    def own_image_url(url: str, host: str | None):
        """The /v1/images/<sha256>.png match of a URL of this server (full with its Host, or a path), else None."""
        parts = urlsplit(url)
        match = IMAGE_PATH.match(parts.path)
        own = parts.scheme in ("http", "https") and parts.netloc == host or (not parts.scheme and not parts.netloc)
        return match if match and own and not parts.query and not parts.fragment else None

    def image(self, url: str, where: str, host: str | None):
        image = self._image(url, where, host)
        long, short = max(image.size), min(image.size)
        if long > MAX_ASPECT_RATIO * short:  # the vision processor's limit, named here rather than at generation
            raise APIError(400, f"{where}: image size {image.width}x{image.height}, an aspect ratio over "
                                f"{MAX_ASPECT_RATIO}", where)
        return image

    def _image(self, url: str, where: str, host: str | None):
        if url.startswith("data:"):
            try:
                return decode_image(url, where, self.limits)
            except BadRequest as e:
                raise APIError(e.status, str(e), where) from None
        match = self.own_image_url(url, host)
        if not match:
            raise APIError(400, f"{where}: only data: URLs and this server's own /v1/images/<sha256>.png URLs "
                                f"are accepted; the server fetches no other URL", where, "unsupported_image_url")
        png = self.store.get(match["sha"])
        if png is None:
            raise APIError(400, f"{where}: image {match['sha'][:12]}... is no longer kept by this server "
                                f"(images are kept {self.limits.image_ttl_s:g} s); send it as a data: URL", where,
                           "image_expired")
        return to_rgb(inspect_image(io.BytesIO(png), where, max_pixels=self.limits.max_image_pixels))

    def assistant_text(self, text: str, where: str, host: str | None) -> list:
        """An assistant's markdown -> text and image parts (our own image links and data: URLs become images)."""
        out, at = [], 0
        for m in MARKDOWN_IMAGE.finditer(text):
            url = m["url"]
            if not (url.startswith("data:") or self.own_image_url(url, host)):
                continue  # someone else's link: it stays text the model reads
            if m.start() > at:
                out.append(TextPart(text[at:m.start()]))
            out.append(ImagePart(self.image(url, where, host)))
            at = m.end()
        if at < len(text):
            out.append(TextPart(text[at:]))
        return out

    def messages(self, req: ChatCompletionRequest, host: str | None) -> list[Message]:
        limits = self.limits
        if not req.messages:
            raise APIError(400, "messages is empty", "messages")
        if len(req.messages) > limits.max_messages:
            raise APIError(400, f"{len(req.messages)} messages, over the cap of {limits.max_messages}", "messages")
        counted = 0  # images, before any is decoded (a request of many large images is refused for free)
        for i, m in enumerate(req.messages):
            for j, part in enumerate([m.content] if isinstance(m.content, str) else m.content or []):
                text = part if isinstance(part, str) else getattr(part, "text", None)
                if text is None:
                    counted += 1
                    continue
                where = f"messages[{i}].content" if isinstance(m.content, str) else f"messages[{i}].content[{j}]"
                if problem := unicode_problem(text, where):
                    raise APIError(400, problem, where)
                if m.role == "assistant":
                    counted += sum(1 for link in MARKDOWN_IMAGE.finditer(text)
                                   if link["url"].startswith("data:") or self.own_image_url(link["url"], host))
        if counted > limits.max_images:
            raise APIError(413, f"{counted} images, over the cap of {limits.max_images}", "messages")
        messages = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role  # OpenAI's newer name of the system role
            if m.content is None:
                raise APIError(400, f"messages[{i}].content is required", f"messages[{i}].content")
            raw = [TextContent(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            content = []
            for j, part in enumerate(raw):
                where = f"messages[{i}].content" if isinstance(m.content, str) else f"messages[{i}].content[{j}]"
                if part.type == "text":
                    content += self.assistant_text(part.text, where, host) if role == "assistant" else [TextPart(part.text)]
                elif role == "system":
                    raise APIError(400, f"{where}: a system message takes text only", where)
                else:
                    content.append(ImagePart(self.image(part.image_url.url, f"{where}.image_url.url", host)))
            messages.append(Message(role, [p for p in content if not isinstance(p, TextPart) or p.text]))
        n_images = sum(isinstance(p, ImagePart) for m in messages for p in m.content)
        if n_images > limits.max_images:
            raise APIError(413, f"{n_images} images, over the cap of {limits.max_images}", "messages")
        chars = sum(len(p.text) for m in messages for p in m.content if isinstance(p, TextPart))
        if chars > limits.max_prompt_chars:
            raise APIError(413, f"prompt is {chars:,} characters, over the cap of {limits.max_prompt_chars:,}", "messages")
        if messages[-1].role == "user" and not messages[-1].content:
            raise APIError(400, "the last user message is empty", f"messages[{len(messages) - 1}].content")
        return messages


def generation_config(req: ChatCompletionRequest, limits: ServeLimits, model) -> GenerationConfig:
    """The request's settings, checked against ``limits``; APIError naming the field."""
    for name, neutral in UNSUPPORTED.items():
        value = getattr(req, name)
        if value not in neutral:
            shown = json.dumps(value)
            shown = shown if len(shown) <= 80 else shown[:80] + "..."
            raise APIError(400, f"{name}={shown} is not supported by DuetGen; leave it out", name,
                           "unsupported_parameter")
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n}: DuetGen generates one answer per request; send n=1 (or leave it out) "
                            "and repeat the request with other seeds", "n", "unsupported_parameter")
    if req.stream_options is not None and not req.stream:  # as OpenAI answers it
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; give one", "max_completion_tokens")
    max_new = req.max_completion_tokens or req.max_tokens or min(GenerationConfig.max_new_tokens, limits.max_new_tokens)
    if max_new > limits.max_new_tokens:
        name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{name}={max_new} is over the cap of {limits.max_new_tokens}", name)
    if req.steps is not None and req.steps > limits.max_steps:
        raise APIError(400, f"steps={req.steps} is over the cap of {limits.max_steps}", "steps")
    size = tuple(req.image_size) if req.image_size is not None else None
    if size is not None and (problem := image_size_problem(size, limits, model)):
        raise APIError(400, problem, "image_size")
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    try:  # checked here, once (GenerationConfig checks itself when built)
        return GenerationConfig(max_new_tokens=max_new, max_images=req.max_images,
                                temperature=0.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, seed=seed, num_steps=req.steps,
                                guidance_scale=req.guidance, image_size=size)
    except ValueError as e:
        raise APIError(400, str(e)) from None


# ============================================================================ events -> markdown
class MarkdownAnswer:
    """Engine events -> pieces of the answer's markdown: text deltas as they come, each image's link when it is done."""

    def __init__(self, store: ImageStore, base_url: str, image_output: str, image_processor):
        self.store, self.base_url, self.image_output = store, base_url, image_output
        self.image_processor = image_processor
        self.image_urls: list[str] = []
        self.image_tokens = 0  # the vision block the engine wrote after each generated image

    def piece(self, event) -> str | None:
        if isinstance(event, TextDelta):
            return event.text
        if isinstance(event, ImageDone):
            png = encode_png(event.image)
            if self.image_output == "data_url":
                url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            else:
                url = f"{self.base_url}v1/images/{self.store.put(png)}.png"
            self.image_urls.append(url)
            # <BOV> + <|vision_start|> + pads + <|vision_end|>: what engine step 5 appends to the context
            self.image_tokens += 3 + self.image_processor.num_tokens(event.image.height, event.image.width)
            return f"\n\n![image {event.index + 1}]({url})\n\n"
        return None  # ImageStarted, DenoisingStep: nothing a chat client shows

    def usage(self, finished: Finished) -> dict:
        stats = finished.stats
        sampled_text = stats["new_tokens"] - stats["images"]  # each fed back as one token
        prompt = stats["context_tokens"] - sampled_text - self.image_tokens
        vision = self.image_tokens - 3 * stats["images"]
        return {"prompt_tokens": prompt, "completion_tokens": stats["new_tokens"],
                "total_tokens": prompt + stats["new_tokens"], "images": stats["images"], "image_tokens": vision}


# ============================================================================ the endpoints
def served_model_name(model_id: str) -> str:
    """The id clients use: a checkpoint directory's name ("shapeworld-toy"), else the model id as given."""
    return Path(model_id).name or model_id


def mount_openai_api(app, service, limits: ServeLimits, store=None) -> None:
    """Add ``/v1`` to a ``duetgen serve`` app; call it after the app's own middleware (errors are rewritten outside it).

    ``store``: the generated images' store (``put(png) -> sha``, ``get(sha) -> png | None``); default
    an ``ImageStore`` of ``limits``. Its calls may block (a shared store is remote): they run off the event loop.
    """
    pipeline = service.pipeline
    store = store if store is not None else ImageStore(limits.image_store_bytes, limits.image_ttl_s)
    translator = Translator(limits, store)
    name = served_model_name(pipeline.model_id)
    created = int(time.time())
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
    app.state.openai_images = store

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "duetgen"}

    def check_model(model: str) -> None:
        if model != name:  # never the server's own path (pipeline.model_id): it would confirm where the model lies
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{name}`", "model",
                           "model_not_found")

    @router.get("/models", summary="The served model (OpenAI model list)")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{model:path}", summary="One model")
    async def get_model(model: str):
        try:
            check_model(model)
        except APIError as e:
            return error_response(e)
        return model_card()

    @router.get("/images/{filename}", summary="An image of an earlier answer (PNG, content-addressed)",
                response_class=Response, responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown or expired"}})
    async def get_image(filename: str):
        match = IMAGE_PATH.match(f"/v1/images/{filename}")
        png = await run_in_threadpool(store.get, match["sha"]) if match else None
        if png is None:
            return error_response(APIError(404, f"no image {filename!r} here (images are kept "
                                                f"{limits.image_ttl_s:g} s and {limits.image_store_bytes:,} bytes in all)",
                                           None, "image_not_found"))
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": f"public, max-age={int(limits.image_ttl_s)}, immutable"})

    def prepare(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        config = generation_config(req, limits, pipeline.model)
        messages = translator.messages(req, request.headers.get("host"))
        try:
            messages = pipeline.messages(messages)  # the pipeline's own checks, as on /api
        except (ValueError, RecordError) as e:
            raise APIError(400, str(e), "messages") from None
        return messages, config


    def failure(e: Exception) -> APIError:
        if isinstance(e, Cancelled):  # the client left: nobody reads this answer, and nothing failed
            return APIError(499, "the client went away", None, "client_closed_request")
        if isinstance(e, TimeoutError):
            return APIError(503 if isinstance(e, WaitedTooLong) else 504, str(e), None, "timeout")
        if isinstance(e, RecordError):  # found while rendering the prompt (e.g. an image's aspect ratio)
            return APIError(400, str(e), "messages")
        log.error("generation failed", exc_info=e)
        return APIError(500, f"generation failed: {type(e).__name__}: {e}", None, "generation_failed")

    @router.post("/chat/completions", summary="An interleaved answer (OpenAI chat completion; stream=true for chunks)",
                 responses={400: {"description": "bad input; error.param names the field"},
                            404: {"description": "unknown model"}, 413: {"description": "body, image or prompt too large"},
                            429: {"description": "queue full"}, 503: {"description": "waited too long"},
                            504: {"description": "generation timed out"}})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        try:  # off the event loop: decoding input images, and the image store may be remote
            messages, config = await service.admit_and_prepare(prepare, req, request)
        except QueueFull as e:
            return error_response(APIError(429, str(e), None, "server_busy", headers={"Retry-After": "5"}))
        except APIError as e:
            return error_response(e)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": completion_id, "created": int(time.time()), "model": name}
        answer = MarkdownAnswer(store, str(request.base_url), req.image_output, pipeline.model.image_processor)

        def extras(finished: Finished) -> dict:
            return {"finish_reason": finished.reason, "seed": config.seed, "images": answer.image_urls,
                    "stats": finished.stats}

        if not req.stream:
            pieces: list[str] = []

            def collect(event):
                piece = answer.piece(event)
                if piece:
                    pieces.append(piece)

            try:
                finished = await service.answer(messages, config, collect, disconnected=request.is_disconnected)
            except Exception as e:
                return error_response(failure(e))
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                 "logprobs": None, "finish_reason": FINISH_REASONS[finished.reason]}],
                    "usage": answer.usage(finished), "duetgen": extras(finished)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish_reason: str | None = None, **more) -> str:
            data = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **more}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def to_sse(event) -> list[str]:  # worker thread: the PNG is encoded and stored here, off the event loop
            piece = answer.piece(event)
            if piece:
                return [chunk({"content": piece})]
            if not isinstance(event, Finished):
                return []
            final = [chunk({}, FINISH_REASONS[event.reason], duetgen=extras(event))]
            if include_usage:  # OpenAI's last chunk: no choices, the usage
                usage = {**head, "object": "chat.completion.chunk", "choices": [], "usage": answer.usage(event)}
                final.append(f"data: {json.dumps(usage)}\n\n")
            return final

        def error_sse(e: Exception) -> str:  # reported in the stream; the server keeps serving
            err = failure(e)
            return f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"

        return service.stream(messages, config, to_sse, error_sse, first=[chunk({"role": "assistant", "content": ""})],
                              last=["data: [DONE]\n\n"])

    app.include_router(router)
    app.add_middleware(OpenAIErrors)
