"""MLLM-as-judge over any OpenAI-compatible endpoint (paper section 5.1).

    judge = Judge(JudgeConfig(base_url="http://127.0.0.1:8000/v1", model="Qwen2.5-VL-72B-Instruct", k=3),
                  cache_path="run/score_cache.sqlite")
    unit = await judge.score(load_template("duetgen_sequence"),
                             {"sequence": sequence_parts(sample, show="all"), "num_output_images": 4})
    unit["state"], unit["scores"]      # "ok", {"text_completeness": 4, ...}

Design choices:
- Prompts are versioned data (``duetgen/eval/templates/*.json``, the ``duetgen.llm`` template
  format); each reply must match the template's strict JSON schema (integer scores with their
  range). The one exception is a benchmark's own prompt file that asks for prose (ImgEdit's
  ``Name: N`` lines): such a template has no schema and its replies are read by ``LineScores``.
  The template's name, version and content sha256 go with every score.
- Temperature 0. ``k`` samples per judged unit with seeds 0..k-1 (so they are distinct requests
  for the endpoint and for the caches); each score is the median of the k. Temperature 0 is not
  deterministic on hosted APIs, and the median of a few samples damps that noise.
- Four states per request: ``ok``, ``api_error`` (HTTP/transport failure after the client's
  retries), ``refusal`` (the judge declined in prose, or through the API's ``message.refusal``),
  ``unparsable`` (not JSON, or not the schema). A failure is never turned into a score: a unit
  is ``ok`` only if all k samples are, otherwise it carries the first failing state and no score
  (STYLE principle 10).
- Score cache: SQLite (``duetgen.llm.cache.SqliteStore``, the LLM response cache's mechanism),
  keyed by sha256 of (endpoint, model, template version and hash, the rendered messages with each
  image replaced by the sha256 of the exact bytes sent, sampling settings, seed, schema). Same
  request, same answer: a rerun or a resume after a kill costs no judge call. ``ok``, ``refusal``
  and ``unparsable`` outcomes are cached (they are the judge's answer to that exact request);
  ``api_error`` never is, so a rerun retries it. The LLM client's own response cache is not
  used (it would duplicate this one).
- Images: RGB, longest side downscaled to 512 px (bicubic; CoMM's judge also caps at 512), sent as
  JPEG quality 90. The exact recipe is ``PREPROCESS`` and is recorded with every score.
- Views decide what the judge sees; images are numbered from 0 across input and output and
  wrapped as ``<Img_i> image </Img_i>`` (CoMM's convention). The ``hidden`` view, used by the
  first call of CoMM's IRS, carries no image at all: every image is an empty marker.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from duetgen.data.record import ImagePart, Message, Part, TextPart
from duetgen.llm.cache import SqliteStore
from duetgen.llm.client import ChatResult, LLMClient
from duetgen.llm.templates import PromptTemplate

TEMPLATE_DIR = Path(__file__).parent / "templates"
STATES = ("ok", "api_error", "refusal", "unparsable")
PREPROCESS = {"mode": "RGB", "max_side": 512, "resample": "bicubic", "format": "JPEG", "quality": 90}
PREPROCESS_ID = "rgb-max512-bicubic-jpeg90"
MAX_FAILED_TEXT = 2000  # chars of a failed reply kept for the report (enough to see why)

# Fields each view fills in its template; checked when a benchmark is loaded.
VIEW_FIELDS = {
    "sequence": {"sequence", "num_output_images"},
    "image": {"sequence", "target"},
    "hidden": {"sequence", "num_hidden", "first_hidden", "last_hidden"},
    "pair": {"description", "image"},
    "edit": {"instruction", "source", "edited"},  # ImgEdit, GEdit-Bench SC: before and after an edit
    "edited_image": {"edited"},  # GEdit-Bench PQ: the edited image alone
}

# A reply in prose that declines. Only replies that are not JSON are tested (a JSON reply that
# misses the schema is "unparsable"); the patterns are the openings hosted models use.
_REFUSAL_RE = re.compile(
    r"^\s*(?:i['’]m sorry|i am sorry|sorry[,.!]|i apologi[sz]e|i can(?:['’]t|not)\b|i won['’]t|i will not|"
    r"i['’]m (?:unable|not able)|i am (?:unable|not able)|as an ai\b|unfortunately,? i)",
    re.IGNORECASE,
)


# ----------------------------------------------------------------------------- templates
@lru_cache(maxsize=None)
def load_template(name: str) -> PromptTemplate:
    """A judge template from ``duetgen/eval/templates/<name>.json``."""
    return PromptTemplate.load(name, root=TEMPLATE_DIR)


def score_fields(t: PromptTemplate) -> list[str]:
    """The numeric fields of a template's reply schema: the scores it yields."""
    props = (t.json_schema or {}).get("properties", {})
    return [k for k, v in props.items() if v.get("type") in ("integer", "number")]


def score_range(t: PromptTemplate, field_name: str) -> tuple[float, float]:
    p = t.json_schema["properties"][field_name]
    return p["minimum"], p["maximum"]


# ----------------------------------------------------------------------------- images
def preprocess_image(im) -> bytes:
    """RGB, longest side <= 512 px (bicubic), JPEG q90: the bytes the judge receives (``PREPROCESS``)."""
    from PIL import Image

    im = im.convert("RGB") if im.mode != "RGB" else im
    w, h = im.size
    side = PREPROCESS["max_side"]
    if max(w, h) > side:
        scale = side / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format=PREPROCESS["format"], quality=PREPROCESS["quality"])
    return buf.getvalue()


# ----------------------------------------------------------------------------- what is judged
@dataclass
class Sample:
    """One benchmark item with one model's answer: the request and the interleaved output."""

    id: str
    category: str
    input: list[Message]  # the request: system / user turns (and any assistant prefix), in order
    output: list[Part]  # the answer: every assistant part after the last user turn, in order
    input_images: Any  # ImageSource for the input's image paths
    output_images: Any  # ImageSource for the output's image paths
    _bytes: dict = field(default_factory=dict, repr=False)  # (side, index) -> preprocessed bytes

    @property
    def input_image_parts(self) -> list[ImagePart]:
        return [p for m in self.input for p in m.content if isinstance(p, ImagePart)]

    @property
    def output_image_parts(self) -> list[ImagePart]:
        return [p for p in self.output if isinstance(p, ImagePart)]

    def image_bytes(self, side: Literal["input", "output"], index: int) -> bytes:
        """Preprocessed bytes of the index-th image of one side (decoded once per sample)."""
        key = (side, index)
        if key not in self._bytes:
            parts, source = ((self.input_image_parts, self.input_images) if side == "input"
                             else (self.output_image_parts, self.output_images))
            self._bytes[key] = preprocess_image(source.open_image(parts[index].path, record_id=self.id))
        return self._bytes[key]


def sequence_parts(s: Sample, show: Literal["all", "none"] | int) -> list[dict]:
    """The sample as OpenAI content parts: ``INPUT:`` request, ``OUTPUT:`` answer.

    ``show``: "all" every image; "none" no image at all (empty markers; the hidden view);
    an int j: the input images and only output image j (the image view).
    """
    parts: list[dict] = []

    def text(t: str) -> None:
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += t
        else:
            parts.append({"type": "text", "text": t})

    def image(number: int, side: str, index: int, visible: bool) -> None:
        if not visible:
            text(f"<Img_{number}></Img_{number}>")
            return
        text(f"<Img_{number}>")
        parts.append({"type": "image", "image": s.image_bytes(side, index)})
        text(f"</Img_{number}>")

    text("INPUT:\n")
    number = 0
    labelled = len(s.input) > 1 or s.input[0].role != "user"
    for m in s.input:
        if labelled:
            text(f"[{m.role}]\n")
        for p in m.content:
            if isinstance(p, TextPart):
                text(p.text + "\n")
            else:
                image(number, "input", number, visible=show != "none")
                number += 1
                text("\n")
    text("\nOUTPUT:\n")
    first_output = number
    for p in s.output:
        if isinstance(p, TextPart):
            text(p.text + "\n")
        else:
            j = number - first_output
            image(number, "output", j, visible=show == "all" or (isinstance(show, int) and show == j))
            number += 1
            text("\n")
    return parts


def count_images(messages: list[dict]) -> int:
    """Image parts in rendered messages (any form the client accepts)."""
    n = 0
    for m in messages:
        if isinstance(m["content"], list):
            n += sum(1 for p in m["content"] if p.get("type") in ("image", "image_url"))
    return n


# ----------------------------------------------------------------------------- score cache
class ScoreCache(SqliteStore):
    """key -> judged outcome (JSON) in one SQLite file; safe to share between processes (WAL)."""

    table = "scores"
    columns = "key TEXT PRIMARY KEY, value TEXT NOT NULL, template TEXT NOT NULL, created REAL NOT NULL"

    def get(self, key: str) -> dict | None:
        row = self._fetch_one("SELECT value FROM scores WHERE key = ?", (key,))
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: dict, template: str) -> None:
        self._execute("INSERT OR REPLACE INTO scores (key, value, template, created) VALUES (?, ?, ?, ?)",
                      (key, json.dumps(value, sort_keys=True), template, time.time()))


# ----------------------------------------------------------------------------- the judge
@dataclass
class JudgeConfig:
    base_url: str  # OpenAI-compatible endpoint root, e.g. http://127.0.0.1:8000/v1 (a local vLLM) or a hosted API
    model: str  # the judge model id as that endpoint names it
    k: int = 1  # samples per judged unit (seeds 0..k-1); each score is their median
    max_concurrency: int = 8  # judge requests in flight
    timeout_s: float = 120.0  # per request, in all (connect + reply), not per read
    max_retries: int = 4  # client retries on 429 / 5xx / timeouts before a request is an api_error
    max_reply_bytes: int = 8 << 20  # a larger reply is cut off and recorded as an api_error
    backoff_base_s: float = 0.5  # first retry wait (doubles each retry)

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base URL {self.base_url!r} must start with http:// or https://")
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (samples per judged unit), got {self.k}")
        if not self.timeout_s > 0 or self.timeout_s == float("inf"):  # 0 or less failed every request
            raise ValueError(f"timeout_s must be a positive number of seconds per judge request, got {self.timeout_s}")
        if self.max_concurrency < 1 or self.max_retries < 0:
            raise ValueError(f"max_concurrency must be >= 1 and max_retries >= 0, got {self.max_concurrency} and "
                             f"{self.max_retries}")

    def settings(self) -> dict:
        """What identifies the judge in a run (no secrets)."""
        return {"base_url": self.base_url.rstrip("/"), "model": self.model, "k": self.k, "temperature": 0.0,
                "preprocess": dict(PREPROCESS, id=PREPROCESS_ID)}


def classify(res: ChatResult) -> dict:
    """A client result as one of the four states; a score exists only in ``ok``."""
    if res.status == "api_error":
        return {"state": "api_error", "error": res.error}
    if res.status == "refusal":  # the API's own refusal field (content null), not prose
        return {"state": "refusal", "error": res.error, "text": (res.text or "")[:MAX_FAILED_TEXT]}
    if res.status == "invalid_json":
        text = res.text or ""
        state = "refusal" if _REFUSAL_RE.match(text) else "unparsable"
        return {"state": state, "error": res.error, "text": text[:MAX_FAILED_TEXT]}
    if res.data is None:  # no reply schema: the reply is prose, parsed by the caller (LineScores)
        return {"state": "ok", "data": None, "text": res.text}
    return {"state": "ok", "data": res.data}


@dataclass(frozen=True)
class LineScores:
    """How a prose reply with one ``Name: N`` line per score becomes scores: the rule of ImgEdit's
    step1_get_avgscore.py (a line split at ``": "`` whose second half is digits is a score), for
    the official prompts, which ask for such lines instead of JSON. ``fields`` name the scores in
    reply order. A reply with another number of score lines, or a score outside
    [minimum, maximum], is ``unparsable``: the official script would average whatever it found."""

    fields: tuple[str, ...]
    minimum: int
    maximum: int

    def parse(self, text: str) -> tuple[dict | None, str | None]:
        """(scores with the reasoning line as ``justification``, None) or (None, why not)."""
        scores, justification = [], None
        for line in text.splitlines():
            parts = line.strip().split(": ")
            if len(parts) == 2 and parts[1].isdigit():
                scores.append((parts[0], int(parts[1])))
            elif len(parts) >= 2 and justification is None and "reasoning" in parts[0].lower():
                justification = ": ".join(parts[1:])
        if len(scores) != len(self.fields):
            return None, (f"{len(scores)} 'Name: N' score line(s) in the reply, expected {len(self.fields)}")
        bad = [(n, v) for n, v in scores if not self.minimum <= v <= self.maximum]
        if bad:
            return None, f"score {bad[0][0]!r} = {bad[0][1]} outside [{self.minimum}, {self.maximum}]"
        return {**{f: v for f, (_, v) in zip(self.fields, scores)}, "justification": justification}, None

    def settings(self) -> dict:
        return {"rule": "line_scores", "fields": list(self.fields), "range": [self.minimum, self.maximum]}


def _parse_prose(sample: dict, reply: LineScores) -> dict:
    if sample["state"] != "ok":
        return sample
    if sample.get("text") is None:
        raise RuntimeError("LineScores reads prose replies; the template has a reply schema")
    data, err = reply.parse(sample["text"])
    if err is not None:
        return {"state": "unparsable", "error": err, "text": sample["text"][:MAX_FAILED_TEXT]}
    return {"state": "ok", "data": data}


class Judge:
    def __init__(self, config: JudgeConfig, cache_path: str | Path | None = None, api_key: str | None = None):
        self.config = config
        self.client = LLMClient(config.base_url, config.model, api_key=api_key,
                                max_concurrency=config.max_concurrency, timeout_s=config.timeout_s,
                                max_retries=config.max_retries, backoff_base_s=config.backoff_base_s,
                                max_reply_bytes=config.max_reply_bytes, cache_path=None)
        self.cache = ScoreCache(cache_path) if cache_path is not None else None
        self.stats: Counter = Counter()  # requests by state, cache hits

    def provenance(self, t: PromptTemplate, k: int | None = None) -> dict:
        """Recorded with every judged unit: who judged, with which prompt, on which pixels."""
        return {"model": self.config.model, "base_url": self.config.base_url.rstrip("/"),
                "template": t.version_key, "template_sha256": t.content_hash, "preprocess": PREPROCESS_ID,
                "temperature": 0.0, "k": self.config.k if k is None else k}

    def _key(self, t: PromptTemplate, messages: list[dict], seed: int, max_tokens: int) -> str:
        canon = []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                content = [{"type": "image", "sha256": hashlib.sha256(p["image"]).hexdigest()} if p["type"] == "image"
                           else p for p in content]
            canon.append({"role": m["role"], "content": content})
        blob = json.dumps({"base_url": self.config.base_url.rstrip("/"), "model": self.config.model,
                           "template": t.version_key, "template_sha256": t.content_hash, "messages": canon,
                           "temperature": 0.0, "max_tokens": max_tokens, "seed": seed, "schema": t.json_schema,
                           "preprocess": PREPROCESS}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    async def ask(self, t: PromptTemplate, fields: dict, seed: int) -> dict:
        """One judge request (or its cached outcome): {"state", "data" | "error", "text"?}."""
        messages = t.render(**fields)
        max_tokens = int(t.sampling.get("max_tokens", 1024))
        key = self._key(t, messages, seed, max_tokens)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats["cache_hits"] += 1
            self.stats[hit["state"]] += 1
            return hit
        res = await self.client.achat(messages, temperature=0.0, max_tokens=max_tokens, json_schema=t.json_schema,
                                      seed=seed, template_version=t.version_key)
        out = classify(res)
        self.stats["requests"] += 1
        self.stats[out["state"]] += 1
        if self.cache is not None and out["state"] != "api_error":
            self.cache.put(key, out, t.version_key)
        return out

    async def score(self, t: PromptTemplate, fields: dict, reply: LineScores | None = None) -> dict:
        """One judged unit: k samples, the median of each score; ok only if every sample is ok.
        ``reply``: how a template without a reply schema is read (the cache holds the raw reply)."""
        samples = await asyncio.gather(*(self.ask(t, fields, seed) for seed in range(self.config.k)))
        if reply is not None:
            parsed = [_parse_prose(s, reply) for s in samples]
            for raw, p in zip(samples, parsed):  # request states count what the reply turned out to be
                self.stats[raw["state"]] -= 1
                self.stats[p["state"]] += 1
            samples = parsed
        names = list(reply.fields) if reply is not None else score_fields(t)
        unit: dict[str, Any] = {"state": "ok", "scores": None}
        failed = [s for s in samples if s["state"] != "ok"]
        if failed:
            unit["state"] = failed[0]["state"]
        else:
            unit["scores"] = {n: float(statistics.median(s["data"][n] for s in samples)) for n in names}
            unit["justification"] = samples[0]["data"].get("justification")
        unit["samples"] = [{"state": s["state"], "scores": {n: s["data"][n] for n in names}} if s["state"] == "ok"
                           else {k: s[k] for k in ("state", "error", "text") if k in s} for s in samples]
        unit["judge"] = self.provenance(t)
        return unit

    async def predict(self, t: PromptTemplate, fields: dict, n_expected: int) -> dict:
        """The text-only first call of a two-call protocol: one sample (seed 0), ``n_expected`` descriptions."""
        if count_images(t.render(**fields)):
            raise RuntimeError(f"template {t.name!r} would carry an image in a hidden-content prediction")
        s = await self.ask(t, fields, seed=0)
        unit: dict[str, Any] = {"state": s["state"], "descriptions": None}
        if s["state"] == "ok":
            d = s["data"]["descriptions"]
            if len(d) != n_expected:
                unit["state"] = "unparsable"
                unit["error"] = f"expected {n_expected} description(s), got {len(d)}"
            else:
                unit["descriptions"] = d
        else:
            unit.update({k: s[k] for k in ("error", "text") if k in s})
        unit["judge"] = self.provenance(t, k=1)
        return unit

    @property
    def http_requests(self) -> int:
        """HTTP requests actually sent (retries included)."""
        return self.client.usage_totals["http_requests"]

    async def aclose(self) -> None:
        await self.client.aclose()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
