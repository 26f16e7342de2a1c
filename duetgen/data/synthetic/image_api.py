"""HTTP clients for image-capable interleaved generation APIs (paper section 3.1: Nano Banana).

Two wire shapes, one result type:

- ``GeminiImageClient``: the Gemini ``models/{model}:generateContent`` REST shape, as Gemini 2.5
  Flash Image ("Nano Banana") answers it: ``candidates[0].content.parts`` is an ordered list of
  ``{"text": ...}`` and ``{"inlineData": {"mimeType": "image/png", "data": <base64>}}`` parts;
  ``promptFeedback.blockReason`` / ``finishReason`` say when a prompt or answer was blocked;
  ``usageMetadata`` counts tokens per modality.
- ``OpenAIImageClient``: an OpenAI-compatible ``/chat/completions`` server that returns images
  either as content parts ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``
  in order, or (OpenRouter style) as ``message.images`` after the text.

Design choices:
- Failures are states, not exceptions: ``status`` is "ok", "blocked" (the API refused: prompt
  block or a safety finish reason) or "api_error" (retries spent / not retryable / malformed).
- Parts keep their order; an image part that cannot be used (not base64, a non-image MIME type,
  a remote URL) becomes a ``bad_image`` part carrying the reason, so the quality filter can drop
  the whole answer with that reason instead of silently closing the gap.
- Remote image URLs in a reply are never fetched: untrusted replies must not make us reach
  arbitrary (possibly private) addresses.
- The reply body is streamed and capped (``max_response_bytes``) before JSON parsing.
- Retries: 429 (Retry-After honoured, capped), 5xx, timeouts and connection errors, exponential
  backoff with jitter; other 4xx are not retried. Concurrency is bounded by a semaphore. This
  transport is ``duetgen.llm.transport``, the one the chat client uses.
- Cost: from token usage and a ``Pricing`` table (per million tokens, by modality), or the
  server's own ``usage.cost`` when it reports one. Blocked answers are billed too.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from duetgen.llm.client import token_count
from duetgen.llm.transport import LoopPool, RequestFailed, check_status, post_json, with_retries

Status = Literal["ok", "blocked", "api_error"]
_DATA_URL_RE = re.compile(r"^data:([\w.+-]+/[\w.+-]+)(;[^,]*)?;base64,(.*)$", re.DOTALL)
# Gemini finish reasons that mean "refused / filtered", not "done".
GEMINI_BLOCK_FINISH = {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION", "IMAGE_SAFETY",
                       "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"}


@dataclass
class Pricing:
    """USD per one million tokens. Check your provider's current price list before trusting totals."""

    input_per_mtok: float = 0.0
    output_text_per_mtok: float = 0.0
    output_image_per_mtok: float = 0.0

    def cost(self, usage: dict) -> float:
        return (usage.get("prompt_tokens", 0) * self.input_per_mtok
                + usage.get("output_text_tokens", 0) * self.output_text_per_mtok
                + usage.get("output_image_tokens", 0) * self.output_image_per_mtok) / 1e6


# Gemini 2.5 Flash Image list price when this was written (input $0.30/M, text out $2.50/M, image
# out $30/M = $0.039 per 1024px image at 1290 tokens). Override with the CLI --price-* options.
GEMINI_25_FLASH_IMAGE_PRICING = Pricing(0.30, 2.50, 30.0)


@dataclass
class GenerationResult:
    status: Status
    parts: list[dict] = field(default_factory=list)  # {"type": "text"|"image"|"bad_image", ...} in order
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)  # prompt_tokens, output_text_tokens, output_image_tokens
    cost_usd: float = 0.0
    error: str | None = None  # why, for api_error and blocked
    model: str = ""
    transient: bool = False  # an api_error that may pass (unreachable, 429 / 5xx, a cut reply): a rerun asks again

    @property
    def num_images(self) -> int:
        return sum(p["type"] == "image" for p in self.parts)


class _ImageAPIClient:
    """Shared transport: bounded concurrency, retries, capped body, totals."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_concurrency: int = 4,
                 timeout_s: float = 300, max_retries: int = 4, pricing: Pricing | None = None,
                 max_response_bytes: int = 64 << 20, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"image API base_url {base_url!r} must start with http:// or https://")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self.pricing = pricing or Pricing()
        self.max_response_bytes = max_response_bytes
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.totals = {"requests": 0, "http_requests": 0, "retries": 0, "ok": 0, "blocked": 0, "api_error": 0,
                       "prompt_tokens": 0, "output_text_tokens": 0, "output_image_tokens": 0, "cost_usd": 0.0}
        self._lock = threading.Lock()
        # _headers() may read only what is set above (api_key): subclasses finish their __init__ later.
        self._pool = LoopPool(timeout_s=timeout_s, max_concurrency=max_concurrency, headers=self._headers())

    # ----------------------------------------------------------------------------- subclass API
    def _endpoint(self) -> str:
        raise NotImplementedError

    def _headers(self) -> dict:
        raise NotImplementedError

    def _body(self, messages: list[dict], temperature: float, seed: int | None) -> dict:
        raise NotImplementedError

    def _parse(self, payload: dict) -> GenerationResult:
        raise NotImplementedError

    # ----------------------------------------------------------------------------- public
    async def agenerate(self, messages: list[dict], *, temperature: float = 1.0,
                        seed: int | None = None) -> GenerationResult:
        """One generation. Raises ValueError only for malformed ``messages`` (a caller bug)."""
        body = self._body(messages, temperature, seed)
        self._add(requests=1)
        try:
            payload = await self._post_with_retries(body)
            try:
                res = self._parse(payload)
            except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
                raise RequestFailed(f"malformed reply ({type(e).__name__}: {e})") from None  # the shape it assumed
        except RequestFailed as e:
            res = GenerationResult("api_error", error=str(e), transient=e.transient)
        res.model = self.model
        if res.status != "api_error":
            res.cost_usd = res.cost_usd or self.pricing.cost(res.usage)
        self._add(**{res.status: 1}, cost_usd=res.cost_usd,
                  **{k: res.usage.get(k, 0) for k in ("prompt_tokens", "output_text_tokens", "output_image_tokens")})
        return res

    async def aclose(self) -> None:
        await self._pool.aclose()

    # ----------------------------------------------------------------------------- transport
    def _add(self, **inc) -> None:
        with self._lock:
            for k, v in inc.items():
                self.totals[k] += v

    async def _post_with_retries(self, body: dict) -> dict:
        http, sem = self._pool.get()
        return await with_retries(lambda: self._post_once(http, body), sem, max_retries=self.max_retries,
                                  backoff_base_s=self.backoff_base_s, backoff_max_s=self.backoff_max_s,
                                  count=self._add)

    async def _post_once(self, http: httpx.AsyncClient, body: dict) -> dict:
        resp, raw = await post_json(http, self._endpoint(), body, timeout_s=self.timeout_s,
                                    max_bytes=self.max_response_bytes)
        text = raw[:300].decode("utf-8", "replace")
        check_status(resp, text)
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError) as e:  # (JSON, UTF-8, a 4,300-digit integer, deep nesting)
            raise RequestFailed(f"reply body is not JSON ({e}): {text[:200]}", transient=True) from None
        if not isinstance(payload, dict):
            raise RequestFailed(f"reply body is a JSON {type(payload).__name__}, not an object")
        return payload


# ============================================================================= Gemini
class GeminiImageClient(_ImageAPIClient):
    """``POST {base_url}/{api_version}/models/{model}:generateContent`` with TEXT+IMAGE modalities."""

    def __init__(self, base_url: str = "https://generativelanguage.googleapis.com",
                 model: str = "gemini-2.5-flash-image", *, api_version: str = "v1beta", **kw):
        kw.setdefault("pricing", GEMINI_25_FLASH_IMAGE_PRICING)
        super().__init__(base_url, model, **kw)
        self.api_version = api_version

    def _endpoint(self) -> str:
        return f"{self.base_url}/{self.api_version}/models/{self.model}:generateContent"

    def _headers(self) -> dict:
        return {"x-goog-api-key": self.api_key} if self.api_key else {}

    def _body(self, messages: list[dict], temperature: float, seed: int | None) -> dict:
        contents, system = [], []
        for i, m in enumerate(_check_messages(messages)):
            parts = []
            for p in m["content"]:
                if p["type"] == "text":
                    parts.append({"text": p["text"]})
                else:
                    data, mime = _encode_image(p["image"], f"messages[{i}]")
                    parts.append({"inline_data": {"mime_type": mime, "data": base64.b64encode(data).decode()}})
            if m["role"] == "system":
                system.extend(parts)
            else:
                contents.append({"role": "model" if m["role"] == "assistant" else "user", "parts": parts})
        gen = {"responseModalities": ["TEXT", "IMAGE"], "temperature": temperature}
        if seed is not None:
            gen["seed"] = seed
        body: dict[str, Any] = {"contents": contents, "generationConfig": gen}
        if system:
            body["systemInstruction"] = {"parts": system}
        return body

    def _parse(self, payload: dict) -> GenerationResult:
        um = _obj(payload.get("usageMetadata"))  # counts are the server's word: an odd one counts 0
        out_total = token_count(um.get("candidatesTokenCount"))
        details = um.get("candidatesTokensDetails")
        image_tokens = sum(token_count(d.get("tokenCount")) for d in (details if isinstance(details, list) else [])
                           if isinstance(d, dict) and d.get("modality") == "IMAGE")
        usage = {"prompt_tokens": token_count(um.get("promptTokenCount")),
                 # thinking tokens are billed as text output
                 "output_text_tokens": max(0, out_total - image_tokens) + token_count(um.get("thoughtsTokenCount")),
                 "output_image_tokens": image_tokens}
        block = _obj(payload.get("promptFeedback")).get("blockReason")
        cands = payload.get("candidates") or []
        if block and not cands:
            return GenerationResult("blocked", usage=usage, error=f"prompt blocked: {block}", finish_reason=block)
        if not cands or not isinstance(cands[0], dict):
            raise RequestFailed(f"reply has no candidates: {json.dumps(payload)[:200]}")
        cand = cands[0]
        finish = cand.get("finishReason")
        parts = []
        parts_in = _obj(cand.get("content")).get("parts")
        for j, p in enumerate(parts_in if isinstance(parts_in, list) else []):
            if not isinstance(p, dict) or p.get("thought"):  # thought summaries are not the answer
                continue
            if isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
                continue
            inline = p.get("inlineData") or p.get("inline_data")
            if isinstance(inline, dict):
                mime = inline.get("mimeType") or inline.get("mime_type") or ""
                parts.append(_decode_inline(mime, inline.get("data"), f"part {j}"))
        if finish in GEMINI_BLOCK_FINISH:
            return GenerationResult("blocked", parts, finish, usage, error=f"finishReason {finish}")
        return GenerationResult("ok", parts, finish, usage)


# ============================================================================= OpenAI-compatible
class OpenAIImageClient(_ImageAPIClient):
    """``POST {base_url}/chat/completions`` asking for ``modalities: ["image", "text"]``."""

    def _endpoint(self) -> str:
        root = self.base_url
        return root if root.endswith("/chat/completions") else root + "/chat/completions"

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _body(self, messages: list[dict], temperature: float, seed: int | None) -> dict:
        wire = []
        for i, m in enumerate(_check_messages(messages)):
            parts = []
            for p in m["content"]:
                if p["type"] == "text":
                    parts.append({"type": "text", "text": p["text"]})
                else:
                    data, mime = _encode_image(p["image"], f"messages[{i}]")
                    url = f"data:{mime};base64," + base64.b64encode(data).decode()
                    parts.append({"type": "image_url", "image_url": {"url": url}})
            wire.append({"role": m["role"], "content": parts})
        body: dict[str, Any] = {"model": self.model, "messages": wire, "modalities": ["image", "text"],
                                "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        return body

    def _parse(self, payload: dict) -> GenerationResult:
        u = _obj(payload.get("usage"))  # counts are the server's word: an odd one counts 0
        image_tokens = token_count(_obj(u.get("completion_tokens_details")).get("image_tokens"))
        usage = {"prompt_tokens": token_count(u.get("prompt_tokens")),
                 "output_text_tokens": max(0, token_count(u.get("completion_tokens")) - image_tokens),
                 "output_image_tokens": image_tokens}
        cost = u.get("cost")
        reported_cost = float(cost) if isinstance(cost, (int, float)) and 0 <= cost < 1e9 else 0.0
        try:
            choice = payload["choices"][0]
            msg = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise RequestFailed(f"reply has no choices[0].message: {json.dumps(payload)[:200]}") from None
        if not isinstance(msg, dict) or not isinstance(choice, dict):
            raise RequestFailed(f"reply's choices[0].message is not an object: {json.dumps(payload)[:200]}")
        finish = choice.get("finish_reason")
        parts: list[dict] = []
        content = msg.get("content")
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for j, p in enumerate(content):
                if not isinstance(p, dict):
                    continue
                if p.get("type") == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif p.get("type") == "image_url":
                    parts.append(_decode_data_url(p.get("image_url"), f"content[{j}]"))
        for j, p in enumerate(msg.get("images") or []):  # OpenRouter: images listed after the text
            parts.append(_decode_data_url(p.get("image_url") if isinstance(p, dict) else None, f"images[{j}]"))
        if msg.get("refusal"):
            return GenerationResult("blocked", parts, finish, usage, float(reported_cost),
                                    error=f"refusal: {str(msg['refusal'])[:200]}")
        if finish == "content_filter":
            return GenerationResult("blocked", parts, finish, usage, float(reported_cost),
                                    error="finish_reason content_filter")
        return GenerationResult("ok", parts, finish, usage, float(reported_cost))


# ============================================================================= helpers
def _obj(v: Any) -> dict:
    """A reply's field that should be a JSON object: itself, else an empty one (null, a list, a string)."""
    return v if isinstance(v, dict) else {}


def _check_messages(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] must be a dict with role system|user|assistant")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not all(isinstance(p, dict) and p.get("type") in ("text", "image")
                                                    for p in content):
            raise ValueError(f"messages[{i}].content must be a string or a list of text/image parts")
        out.append({"role": m["role"], "content": content})
    return out


_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def _encode_image(img: Any, where: str) -> tuple[bytes, str]:
    """(bytes, mime) for PIL images (sent as PNG) and encoded bytes (format checked)."""
    from PIL import Image

    if isinstance(img, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(img)) as im:
                fmt = im.format
        except Exception as e:  # PIL raises many types on junk
            raise ValueError(f"{where}: image bytes are not a readable image ({type(e).__name__})") from None
        if fmt not in _MIME:
            raise ValueError(f"{where}: image format {fmt!r} is not one the APIs accept (PNG, JPEG, WEBP, GIF)")
        return bytes(img), _MIME[fmt]
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        (img if img.mode in ("RGB", "RGBA", "L") else img.convert("RGB")).save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    raise ValueError(f"{where}: an image part must hold a PIL image or encoded bytes, got {type(img).__name__}")


def _decode_inline(mime: str, data: Any, where: str) -> dict:
    if not isinstance(mime, str) or not mime.startswith("image/"):
        return {"type": "bad_image", "reason": f"{where}: inline data has MIME type {mime!r}, not an image"}
    if not isinstance(data, str):
        return {"type": "bad_image", "reason": f"{where}: inline data is not a base64 string"}
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return {"type": "bad_image", "reason": f"{where}: inline data is not valid base64"}
    return {"type": "image", "data": raw, "mime": mime}


def _decode_data_url(image_url: Any, where: str) -> dict:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        return {"type": "bad_image", "reason": f"{where}: image_url has no url string"}
    m = _DATA_URL_RE.match(url)
    if not m:
        return {"type": "bad_image", "reason": f"{where}: image is not an inline base64 data URL "
                                               f"(remote URLs are not fetched): {url[:60]!r}"}
    return _decode_inline(m.group(1), m.group(3), where)
