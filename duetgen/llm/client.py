"""OpenAI-compatible chat client: bounded async concurrency, retries, strict JSON, SQLite cache.

Used by the data engine (paper section 3.1: captions, categories, rewrites, dialogues), the
synthetic-data builder and the MLLM-as-judge. Talks to any ``/v1/chat/completions`` server (vLLM,
SGLang, a hosted API).

Design choices:
- One ``httpx.AsyncClient`` and one semaphore per event loop. The semaphore bounds HTTP requests in
  flight (cache hits never take a slot); ``amap`` keeps input order. The sync wrappers run on one
  event loop thread owned by the client, so connections and the client survive between calls.
- Every request has a total deadline (``timeout_s``: connect, headers and body together, not per
  read) and its reply a byte cap (``max_reply_bytes``, default 8 MB); both in ``transport.post_json``.
- Retries: 429 (honouring Retry-After, capped at ``backoff_max_s``), 5xx, timeouts and connection
  errors, with exponential backoff and jitter (delay * U[0.5, 1]) so a burst of workers does not
  retry in lock-step. Other 4xx are the caller's bug and are not retried. The transport is
  ``duetgen.llm.transport``, shared with the image-generation clients.
- Failures are states, not exceptions: ``status="api_error"`` after the retries are spent,
  ``status="invalid_json"`` when a schema was asked and the reply does not parse or validate,
  ``status="refusal"`` when the API declined with ``message.refusal`` (OpenAI structured-output
  refusals: ``content`` is null); ``text`` then holds the refusal message. The reply is parsed
  with ``json.loads`` as it stands: no fence stripping, no repair (never a guess).
- Cache key: sha256 over model, template version, the canonical messages with every image replaced
  by the sha256 of its bytes, and all sampling settings. Successful HTTP replies are cached, also
  those whose JSON turns out invalid and refusals (the model's answer is the answer: a rerun
  reproduces it at no cost; change the seed or the template to ask again). A refusal is an answer,
  not a fault, so it is not retried either. API errors are never cached.
- Images: ``{"type": "image", "image": PIL | bytes | Path}`` becomes a data URL. PNG/JPEG/WebP/GIF
  bytes are sent as they are; a PIL image is encoded as PNG (lossless and byte-deterministic, so
  the cache key is stable). A plain ``str`` is refused: it is ambiguous (path? URL?) and reading
  local files named by data must be the caller's explicit choice.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from duetgen.llm.cache import ResponseCache
from duetgen.llm.transport import DEFAULT_MAX_REPLY_BYTES, LoopPool, RequestFailed, check_status, post_json, with_retries

Status = Literal["ok", "api_error", "invalid_json", "refusal"]
_MIME_BY_FORMAT = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclass
class ChatResult:
    status: Status  # "ok" | "api_error" (retries exhausted / not retryable) | "invalid_json" | "refusal"
    text: str | None  # the reply text (also set for invalid_json, for debugging; the refusal message for refusal)
    data: Any | None  # the parsed, validated JSON when a schema was asked
    error: str | None  # why, when status != "ok"
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    cached: bool = False
    model: str = ""
    transient: bool = False  # an api_error that may pass (unreachable, 429 / 5xx / timeouts after the retries)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class LLMClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 120,
        max_retries: int = 4,
        cache_path: str | Path | None = None,
        backoff_base_s: float = 0.5,  # first retry waits about this long, doubling each time
        backoff_max_s: float = 30.0,  # cap on one wait, also on a server's Retry-After
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,  # a larger reply is an api_error (read as a stream, cut there)
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"LLM base_url {base_url!r} must start with http:// or https://")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        # Accept both ".../v1" and a bare host; the endpoint is always <v1 root>/chat/completions.
        root = base_url.rstrip("/")
        if root.endswith("/chat/completions"):
            root = root[: -len("/chat/completions")]
        self.endpoint = root + "/chat/completions"
        self.base_url, self.model = base_url, model
        self.api_key = api_key
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.max_reply_bytes = max_reply_bytes
        self.cache = ResponseCache(cache_path) if cache_path is not None else None
        self._totals = dict(requests=0, cached=0, prompt_tokens=0, completion_tokens=0, errors=0,
                            invalid_json=0, refusals=0, http_requests=0, retries=0)
        self._totals_lock = threading.Lock()
        self._pool = LoopPool(timeout_s=timeout_s, max_concurrency=max_concurrency,
                              headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        self._sync_loop: asyncio.AbstractEventLoop | None = None  # the sync wrappers' loop thread
        self._sync_thread: threading.Thread | None = None
        self._sync_lock = threading.Lock()

    # ----------------------------------------------------------------------------- public API
    @property
    def usage_totals(self) -> dict:
        with self._totals_lock:
            return dict(self._totals)

    async def achat(
        self,
        messages: list[dict],
        *,
        temperature: float = 0.0,
        top_p: float | None = None,
        max_tokens: int = 1024,
        json_schema: dict | None = None,
        seed: int | None = None,
        template_version: str = "none",
    ) -> ChatResult:
        """One chat completion. Never raises for server or reply problems: see ``ChatResult.status``.

        Raises ValueError only for a malformed ``messages`` argument (a bug in the caller).
        """
        wire_messages, key_messages = _encode_messages(messages)
        sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
        key = _cache_key(self.model, template_version, key_messages, sampling, json_schema)
        self._count(requests=1)

        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self._count(cached=1)
            return self._finish(hit.text, hit.usage, json_schema, cached=True, finish_reason=None,
                                refusal=hit.refusal)

        body: dict[str, Any] = {"model": self.model, "messages": wire_messages,
                                "temperature": temperature, "max_tokens": max_tokens}
        if top_p is not None:
            body["top_p"] = top_p
        if seed is not None:
            body["seed"] = seed
        if json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": json_schema, "strict": True}}
        try:
            text, usage, finish_reason, refusal = await self._post_with_retries(body)
        except RequestFailed as e:
            self._count(errors=1)
            return ChatResult("api_error", None, None, str(e), model=self.model, transient=e.transient)
        self._count(prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0))
        if self.cache is not None:
            self.cache.put(key, model=self.model, template_version=template_version, text=text, usage=usage,
                           refusal=refusal)
        return self._finish(text, usage, json_schema, cached=False, finish_reason=finish_reason, refusal=refusal)

    def chat(self, messages: list[dict], **kw) -> ChatResult:
        """Synchronous ``achat`` (not from inside a running event loop: use ``achat`` there)."""
        return self._run_sync(self.achat(messages, **kw))

    async def amap(self, requests: list[tuple[list[dict], dict]], on_done=None) -> list[ChatResult]:
        """Run many ``(messages, kwargs)`` requests, at most ``max_concurrency`` in flight; order kept."""

        async def one(messages, kw):
            r = await self.achat(messages, **kw)
            if on_done is not None:
                on_done(r)
            return r

        return list(await asyncio.gather(*(one(m, kw) for m, kw in requests)))

    def chat_many(self, requests: list[tuple[list[dict], dict]], progress: bool = True) -> list[ChatResult]:
        """Synchronous ``amap`` with a rich progress bar."""
        if not progress:
            return self._run_sync(self.amap(requests))
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(f"LLM {self.model}", total=len(requests))
            return self._run_sync(self.amap(requests, on_done=lambda _: bar.advance(task)))

    async def aclose(self) -> None:
        await self._pool.aclose()

    def close(self) -> None:
        """Stop the sync wrappers' event loop thread (closing its HTTP client) and the cache."""
        if self._sync_loop is not None:
            asyncio.run_coroutine_threadsafe(self.aclose(), self._sync_loop).result()
            self._sync_loop.call_soon_threadsafe(self._sync_loop.stop)
            self._sync_thread.join()
            self._sync_loop.close()
            self._sync_loop = self._sync_thread = None
        if self.cache is not None:
            self.cache.close()

    # ----------------------------------------------------------------------------- internals
    def _run_sync(self, coro):
        """Run ``coro`` on this client's own event loop thread, started on first use.

        One long-lived loop keeps one HTTP client and its keep-alive connections across calls;
        ``asyncio.run`` per call would build a new client (and TLS context, ~20 ms) every time.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError("LLMClient sync methods cannot run inside an event loop; await achat/amap instead")
        with self._sync_lock:
            if self._sync_loop is None:
                self._sync_loop = asyncio.new_event_loop()
                self._sync_thread = threading.Thread(target=self._sync_loop.run_forever, daemon=True,
                                                     name=f"llm-client-{self.model}")
                self._sync_thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._sync_loop).result()

    async def _post_with_retries(self, body: dict) -> tuple[str, dict, str | None, bool]:
        http, sem = self._pool.get()
        return await with_retries(lambda: self._post_once(http, body), sem, max_retries=self.max_retries,
                                  backoff_base_s=self.backoff_base_s, backoff_max_s=self.backoff_max_s,
                                  count=self._count)

    async def _post_once(self, http: httpx.AsyncClient, body: dict) -> tuple[str, dict, str | None, bool]:
        """(text, usage, finish_reason, refusal); with ``refusal`` the text is the refusal message."""
        resp, raw = await post_json(http, self.endpoint, body, timeout_s=self.timeout_s, max_bytes=self.max_reply_bytes)
        text = raw.decode("utf-8", "replace")
        check_status(resp, text)
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            message = choice["message"]
            refusal = message.get("refusal")
            # OpenAI's structured-output refusal: content null, refusal a non-empty string.
            if isinstance(refusal, str) and refusal:
                text, refused = refusal, True
            else:
                text, refused = message["content"], False
            if not isinstance(text, str):
                raise TypeError(f"message.content is {type(text).__name__}, not a string")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
            # a body that is not JSON (cut short by a proxy, a restarting server's page) may pass; JSON of the
            # wrong shape (no content, a model's refusal format) is the same next time
            raise RequestFailed(f"malformed response body ({type(e).__name__}: {e}): {text[:200]}",
                                transient=isinstance(e, json.JSONDecodeError)) from None
        u = payload.get("usage")
        u = u if isinstance(u, dict) else {}  # counts are the server's word: a missing or odd one counts 0
        usage = {k: token_count(u.get(k)) for k in ("prompt_tokens", "completion_tokens")}
        finish = choice.get("finish_reason")
        return text, usage, finish if isinstance(finish, str) else None, refused

    def _finish(self, text: str, usage: dict, json_schema: dict | None, *, cached: bool,
                finish_reason: str | None, refusal: bool = False) -> ChatResult:
        if refusal:
            self._count(refusals=1)
            return ChatResult("refusal", text, None, f"the API refused: {text[:300]}", usage, cached, self.model)
        if json_schema is None:
            return ChatResult("ok", text, None, None, usage, cached, self.model)
        data, err = _parse_and_validate(text, json_schema)
        if err is not None:
            if finish_reason == "length":
                err += " (reply truncated: finish_reason=length; raise max_tokens)"
            self._count(invalid_json=1)
            return ChatResult("invalid_json", text, None, err, usage, cached, self.model)
        return ChatResult("ok", text, data, None, usage, cached, self.model)

    def _count(self, **inc: int) -> None:
        with self._totals_lock:
            for k, v in inc.items():
                self._totals[k] += v


# ----------------------------------------------------------------------------- helpers
def token_count(v: Any) -> int:
    """A usage count from a server's reply: a non-negative integer, else 0 (a string, 1e999 or a list raised)."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 53 else 0


def _parse_and_validate(text: str, schema: dict) -> tuple[Any, str | None]:
    import jsonschema

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"reply is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting past Python's stack
        return None, f"reply is not readable JSON ({'nested too deeply' if isinstance(e, RecursionError) else e})"
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.path) or "<root>"
        return None, f"reply does not match the schema at {where}: {e.message}"
    return data, None


def _image_bytes(img: Any) -> tuple[bytes, str]:
    """(encoded bytes, mime type) for a PIL image, encoded bytes or an explicit Path."""
    from PIL import Image

    if isinstance(img, Path):
        img = img.read_bytes()
    if isinstance(img, (bytes, bytearray)):
        img = bytes(img)
        try:
            with Image.open(io.BytesIO(img)) as im:
                fmt = im.format
        except Exception as e:  # PIL raises many types for junk bytes
            raise ValueError(f"image part holds bytes that are not a readable image ({type(e).__name__})") from None
        if fmt in _MIME_BY_FORMAT:
            return img, _MIME_BY_FORMAT[fmt]
        with Image.open(io.BytesIO(img)) as im:  # e.g. BMP/TIFF: re-encode to something servers accept
            img = im.copy()
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        im = img if img.mode in ("RGB", "RGBA", "L", "LA") else img.convert("RGBA" if "A" in img.mode else "RGB")
        im.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    raise ValueError(f"image part must hold a PIL image, bytes or a pathlib.Path, got {type(img).__name__}")


def _encode_messages(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(messages as sent on the wire, canonical messages for the cache key with images hashed)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} dicts")
    wire, key = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        content = m["content"]
        if isinstance(content, str):
            wire.append({"role": m["role"], "content": content})
            key.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        wparts, kparts = [], []
        for j, p in enumerate(content):
            t = p.get("type") if isinstance(p, dict) else None
            if t == "text":
                wparts.append({"type": "text", "text": p["text"]})
                kparts.append({"type": "text", "text": p["text"]})
            elif t == "image_url":
                url = p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
                wparts.append({"type": "image_url", "image_url": {"url": url}})
                kparts.append({"type": "image", "sha256": hashlib.sha256(url.encode()).hexdigest()})
            elif t == "image":
                try:
                    data, mime = _image_bytes(p.get("image"))
                except ValueError as e:
                    raise ValueError(f"messages[{i}].content[{j}]: {e}") from None
                url = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
                wparts.append({"type": "image_url", "image_url": {"url": url}})
                # Hash of the data URL = hash of (mime, bytes): the same image sent either way keys alike.
                kparts.append({"type": "image", "sha256": hashlib.sha256(url.encode()).hexdigest()})
            else:
                raise ValueError(f"messages[{i}].content[{j}]: unknown part type {t!r} (text, image_url, image)")
        wire.append({"role": m["role"], "content": wparts})
        key.append({"role": m["role"], "content": kparts})
    return wire, key


def _cache_key(model: str, template_version: str, key_messages: list[dict], sampling: dict,
               json_schema: dict | None) -> str:
    blob = json.dumps({"model": model, "template_version": template_version, "messages": key_messages,
                       "sampling": sampling, "json_schema": json_schema},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
