"""The data engine's stages (paper section 3.1, Fig. 2), each a generator over page documents.

    extract -> page_filter -> language -> (dedup_pages, across shards: runner.py)
            -> fetch_images -> image_rules -> [caption_images] -> dedup_images
            -> require_images -> clean_text -> [rewrite_text] -> reorder -> dialogue -> write

Stages in brackets need an LLM; ``reorder`` and ``dialogue`` use it when one is configured and
rules / a template when not.

Design choices:
- A stage is a callable ``(docs, stats) -> docs`` (datatrove's pipeline step); a pipeline is a
  plain list; ``run_stages`` chains them and counts pages and images in and out of each.
- Every drop goes through ``stats.drop_page`` / ``drop_image`` / ``drop_text`` with a reason code.
- LLM stages take pages in batches and send all of a batch's requests at once through
  ``LLMClient.chat_many`` (bounded concurrency), so throughput comes from the client's
  concurrency, not from more processes. A failed, invalid or refused LLM reply drops the item
  with the status as the reason (``llm_api_error`` / ``llm_rejected`` / ``llm_invalid_json`` /
  ``llm_refusal``) or a semantic check's reason (``llm_bad_reply``...); nothing is guessed, and an
  API error is not cached, so a rerun asks again (the runner builds such shards again).
"""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import urljoin, urlsplit

from duetgen.data.engine.document import Doc, ImageItem, StageStats, TextItem, counted
from duetgen.data.engine.extract import ExtractConfig, ExtractError, extract
from duetgen.data.engine.fetch import FetchConfig, FetchError, ImageFetcher, UndecodedImage
from duetgen.data.engine.fetch import ALLOWED_CONTENT_TYPES
from duetgen.data.engine.images import ImageRuleConfig, hamming, header_rule, phash, pixel_rule
from duetgen.data.engine.language import LanguageFilter
from duetgen.data.engine.text import clean_block, numbers_in, strip_step_prefix, title_to_question
from duetgen.data.record import ImagePart, Message, Record, TextPart

PROMPT_DIR = Path(__file__).parent / "prompts"
Stage = Callable[[Iterable[Doc], StageStats], Iterator[Doc]]


def run_stages(stages: list, docs: Iterable[Doc]) -> tuple[Iterator[Doc], list[StageStats]]:
    """Chain the stages lazily; returns (output docs, one StageStats per stage, filled as it runs)."""
    all_stats = []
    for stage in stages:
        stats = StageStats(stage.name)
        docs = counted(stage(counted(docs, stats, "in"), stats), stats, "out")
        all_stats.append(stats)
    return docs, all_stats


def _batched(docs: Iterable[Doc], n: int) -> Iterator[list[Doc]]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _llm_failure(result) -> str:
    """llm_api_error (may pass: a rerun asks again) | llm_rejected (the server refused the request itself: 4xx,
    a reply over the cap) | llm_invalid_json | llm_refusal."""
    if result.status == "api_error" and not result.transient:
        return "llm_rejected"
    return f"llm_{result.status}"


def _llm_image(item: ImageItem, side: int = 768) -> bytes:
    """The image as sent to the MLLM: the fetched bytes when at most ``side`` px, else a JPEG
    thumbnail (servers resize anyway). Re-encoding every image as PNG cost ~30 ms of CPU per
    request and capped a 32-way LLM stage far below its ideal rate (benchmarks/data_engine.py)."""
    if max(item.size) <= side:
        return item.data
    im = item.image.copy()
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------- 1. extract
class Extract:
    name = "extract"

    def __init__(self, cfg: ExtractConfig):
        self.cfg = cfg

    def __call__(self, docs, stats):
        for d in docs:
            if "input_drop" in d.meta:  # the reader could not even hand over the page
                reason, detail = d.meta.pop("input_drop")
                stats.drop_page(d, reason, detail)
                continue
            try:
                extract(d, self.cfg)
            except ExtractError as e:
                stats.drop_page(d, e.reason, str(e))
                continue
            if not d.items:
                stats.drop_page(d, "no_main_content", "nothing left after removing boilerplate")
                continue
            yield d


# ----------------------------------------------------------------------------- 2. page filter
@dataclass
class PageFilterConfig:
    min_text_chars: int = 200  # a how-to page needs some instructions (characters of body text)
    max_images: int = 80  # galleries and image dumps are not step-by-step pages
    min_images: int = 1  # after the image stages: a page without pictures cannot teach interleaving


class PageFilter:
    name = "page_filter"

    def __init__(self, cfg: PageFilterConfig):
        self.cfg = cfg

    def __call__(self, docs, stats):
        for d in docs:
            n_img, n_chars = len(d.images), d.text_chars()
            if n_img == 0:
                stats.drop_page(d, "text_only", "no <img> in the main body")
            elif n_chars < self.cfg.min_text_chars:
                stats.drop_page(d, "too_short", f"{n_chars} characters < {self.cfg.min_text_chars}")
            elif n_img > self.cfg.max_images:
                stats.drop_page(d, "too_many_images", f"{n_img} images > {self.cfg.max_images}")
            else:
                yield d


# ----------------------------------------------------------------------------- 3. fetch images
class FetchImages:
    """Download a page's images (SSRF rules: fetch.py); a WARC input's images come from its own
    crawl first (``warc_index``: image responses by URI), and only the missing ones are fetched."""

    name = "fetch_images"

    def __init__(self, cfg: FetchConfig, threads: int = 8, warc_index: str | None = None,
                 rules: ImageRuleConfig | None = None):
        self.fetcher = ImageFetcher(cfg)
        self.threads = threads
        self.rules = rules  # the image rules that follow: an image a header rule drops is never decoded
        self.index = None
        if warc_index is not None:
            from duetgen.data.engine.warc import WarcImageIndex

            self.index = WarcImageIndex(warc_index)

    def _from_warc(self, url: str):
        """(bytes, image, "file@offset") of the crawl's response for ``url``, None if it has none."""
        from duetgen.data.engine.warc import read_warc_image

        hit = self.index.lookup(url)
        if hit is None:
            return None
        path, offset = hit
        mime, data = read_warc_image(path, offset, self.fetcher.cfg.max_bytes)
        if mime not in ALLOWED_CONTENT_TYPES:
            raise FetchError("bad_content_type", f"Content-Type {mime!r} in the WARC is not a raster image")
        return (*self.fetcher._decode(data, None, url, decode=self.rules is None), f"{Path(path).name}@{offset}")

    def _fetch(self, url: str):
        try:
            if self.index is not None and (got := self._from_warc(url)) is not None:
                return got
            return self.fetcher.fetch(url, decode=self.rules is None)
        except FetchError as e:
            return e

    def _read(self, d: Doc, src: str):
        try:
            return self.fetcher.read_local(d.local_root, d.local_page, src, decode=self.rules is None)
        except FetchError as e:
            return e

    def _load_needed(self, d: Doc, fetched: dict, files: dict, pool) -> dict[int, tuple[str, str]]:
        """The header rules of every image of ``d`` ({id(item): (reason, detail)} for those they drop); the
        bytes some image still needs are decoded now, in place in ``fetched`` / ``files`` (once each)."""
        verdicts, need = {}, {}
        for x in d.images:
            table, key = (files, x.src) if x.src in files else (fetched, x.url)
            got = table.get(key)
            if not isinstance(got, tuple):
                continue
            data = got[1] if table is files else got[0]  # files: (where, data, image); fetched: (data, image[, warc])
            if not isinstance(data, UndecodedImage):
                continue
            if (verdict := header_rule(data.size, x.hints, self.rules)) is not None:
                verdicts[id(x)] = verdict
            else:
                need[(id(table), key)] = (table, key)

        def load(job):
            table, key = job
            got = table[key]
            try:
                if table is files:
                    return (got[0], *self.fetcher.load(got[1], got[0]))
                return (*self.fetcher.load(got[0], key), *got[2:])
            except FetchError as e:
                return e

        jobs = list(need.values())
        for (table, key), got in zip(jobs, pool.map(load, jobs)):
            table[key] = got
        return verdicts

    def __call__(self, docs, stats):
        with ThreadPoolExecutor(self.threads) as pool:
            for d in docs:
                files = {}  # a saved page's relative images: files beside it (src -> result)
                for item in d.images:  # resolve first: bad URLs never reach the network
                    src = item.src
                    parts = urlsplit(src)
                    if parts.scheme:
                        item.url = src
                    elif d.local_root is not None and not parts.netloc:
                        files[src] = None
                    elif d.base_url or d.url:
                        item.url = urljoin(d.base_url or d.url, src)
                urls = sorted({i.url for i in d.images if i.url and urlsplit(i.url).scheme in ("http", "https")})
                fetched = dict(zip(urls, pool.map(self._fetch, urls)))  # each URL once per page
                files = dict(zip(files, pool.map(lambda src: self._read(d, src), files)))
                verdicts = {} if self.rules is None else self._load_needed(d, fetched, files, pool)
                kept = []
                for x in d.items:
                    if isinstance(x, ImageItem):
                        if x.src in files:
                            got = files[x.src]
                            if isinstance(got, FetchError):
                                stats.drop_image(d, x, got.reason, got.detail)
                                continue
                            x.file, x.data, x.image = got
                            x.verdict = verdicts.get(id(x))
                            kept.append(x)
                            continue
                        if x.url is None:
                            stats.drop_image(d, x, "unresolvable_url", f"relative {x.src[:100]!r} and no base URL")
                            continue
                        got = fetched.get(x.url)
                        if got is None:  # scheme other than http(s): file:, data:, javascript: ...
                            scheme = urlsplit(x.url).scheme or "none"
                            stats.drop_image(d, x, "unsupported_scheme", f"{scheme}: only http/https images are fetched")
                            continue
                        if isinstance(got, FetchError):
                            stats.drop_image(d, x, got.reason, got.detail)
                            continue
                        x.data, x.image = got[:2]
                        x.verdict = verdicts.get(id(x))
                        if len(got) == 3:
                            x.warc = got[2]
                            stats.counts["image_from_warc"] += 1
                        else:
                            stats.counts["image_fetched"] += 1
                    kept.append(x)
                d.items = kept
                yield d


# ----------------------------------------------------------------------------- 4. image rules
class ImageRules:
    name = "image_rules"

    def __init__(self, cfg: ImageRuleConfig):
        self.cfg = cfg

    def __call__(self, docs, stats):
        for d in docs:
            kept = []
            for x in d.items:
                if isinstance(x, ImageItem):
                    verdict = x.verdict or header_rule(x.size, x.hints, self.cfg)  # the fetch stage may have decided
                    if verdict is None:
                        if x.image is None:
                            raise RuntimeError(f"image_rules: {x.src[:100]!r} was not decoded and no header rule "
                                               "drops it (FetchImages needs these rules to decode what they keep)")
                        x.grey = x.image.convert("L")  # once: the uniformity test, the QR check and the pHash read it
                        verdict = pixel_rule(x.grey, self.cfg)
                    if verdict is not None:
                        stats.drop_image(d, x, *verdict)
                        continue
                kept.append(x)
            d.items = kept
            yield d


# ----------------------------------------------------------------------------- 5. caption (LLM)
class CaptionImages:
    """MLLM caption + category + relevance per image; the irrelevant are dropped (paper 3.1)."""

    name = "caption_images"

    def __init__(self, client, batch_pages: int = 16):
        from duetgen.llm import PromptTemplate

        self.client, self.batch_pages = client, batch_pages
        self.template = PromptTemplate.load("caption_image", root=PROMPT_DIR)

    @staticmethod
    def _context(d: Doc, i: int) -> str:
        before = next((x.text for x in reversed(d.items[:i]) if isinstance(x, TextItem)), "")
        after = next((x.text for x in d.items[i + 1:] if isinstance(x, TextItem)), "")
        return f"Before: {before[:500]}\nAfter: {after[:500]}"

    def __call__(self, docs, stats):
        for batch in _batched(docs, self.batch_pages):
            owners, requests = [], []
            for d in batch:
                for i, x in enumerate(d.items):
                    if isinstance(x, ImageItem):
                        msgs = self.template.render(title=d.title, context=self._context(d, i), image=_llm_image(x))
                        owners.append(x)
                        requests.append((msgs, self.template.chat_kwargs()))
            results = _chat(self.client, requests, stats)
            verdict = {id(x): r for x, r in zip(owners, results)}
            for d in batch:
                kept = []
                for x in d.items:
                    if isinstance(x, ImageItem):
                        r = verdict[id(x)]
                        if not r.ok:
                            stats.drop_image(d, x, _llm_failure(r), r.error or "")
                            continue
                        x.caption, x.category = r.data["caption"], r.data["category"]
                        if not r.data["relevant"]:
                            stats.drop_image(d, x, "irrelevant", f"{x.category}: {x.caption}")
                            continue
                    kept.append(x)
                d.items = kept
                d.meta.setdefault("prompts", {})["caption_image"] = self.template.version_key
                yield d


def _chat(client, requests, stats: StageStats):
    before = client.usage_totals
    results = client.chat_many(requests, progress=False) if requests else []
    after = client.usage_totals
    for k in ("requests", "cached", "prompt_tokens", "completion_tokens", "errors", "invalid_json", "refusals"):
        stats.llm[k] += after[k] - before[k]
    return results


# ----------------------------------------------------------------------------- 6. dedup
class DedupConsecutive:
    """Drop an image within ``max_distance`` pHash bits of the previous kept image of the page."""

    name = "dedup_images"

    def __init__(self, max_distance: int = 8):
        self.max_distance = max_distance

    def __call__(self, docs, stats):
        for d in docs:
            kept, prev = [], None
            for x in d.items:
                if isinstance(x, ImageItem):
                    x.phash = phash(x.grey)
                    if prev is not None and (dist := hamming(prev, x.phash)) <= self.max_distance:
                        stats.drop_image(d, x, "near_duplicate", f"pHash distance {dist} <= {self.max_distance}")
                        continue
                    prev = x.phash
                kept.append(x)
            d.items = kept
            yield d


class RequireImages:
    name = "require_images"

    def __init__(self, min_images: int = 1):
        self.min_images = min_images

    def __call__(self, docs, stats):
        for d in docs:
            if len(d.images) < self.min_images:
                stats.drop_page(d, "no_images_left", f"{len(d.images)} usable images < {self.min_images}")
                continue
            yield d


# ----------------------------------------------------------------------------- 7. text
class CleanText:
    name = "clean_text"

    def __call__(self, docs, stats):
        for d in docs:
            kept = []
            for x in d.items:
                if isinstance(x, TextItem):
                    # pass 1 cleaned every block already (language.page_text): 1.2 CPU ms a page not spent again
                    t = x.cleaned if x.cleaned is not None else clean_block(x.text)
                    if not t:
                        stats.drop_text(d, x.text, "boilerplate_or_empty")
                        continue
                    if re.fullmatch(r"(?i)step\s*\d+\W*", t):  # a bare "Step 3" heading: the dialogue renumbers
                        stats.drop_text(d, x.text, "step_number_only")
                        continue
                    t, had_number = strip_step_prefix(t)
                    x.text = t
                    if had_number and x.kind == "paragraph":
                        x.kind = "step"
                    if d.title and x.kind == "heading" and t.lower() == d.title.lower():
                        stats.drop_text(d, x.text, "title_repeated")
                        continue
                kept.append(x)
            d.items = kept
            if not d.texts:
                stats.drop_page(d, "no_text_left", "every text block was boilerplate")
                continue
            yield d


class RewriteText:
    """LLM rewrite of every text block, one request per page; facts are checked by their numbers."""

    name = "rewrite_text"

    def __init__(self, client, batch_pages: int = 16):
        from duetgen.llm import PromptTemplate

        self.client, self.batch_pages = client, batch_pages
        self.template = PromptTemplate.load("rewrite_text", root=PROMPT_DIR)

    def __call__(self, docs, stats):
        for batch in _batched(docs, self.batch_pages):
            requests = []
            for d in batch:
                blocks = [t.text for t in d.texts]
                msgs = self.template.render(title=d.title, blocks_json=json.dumps(blocks, ensure_ascii=False),
                                            n_blocks=len(blocks))
                requests.append((msgs, self.template.chat_kwargs()))
            for d, r in zip(batch, _chat(self.client, requests, stats)):
                if not r.ok:
                    stats.drop_page(d, _llm_failure(r), r.error or "")
                    continue
                texts, new = d.texts, r.data["blocks"]
                if len(new) != len(texts):
                    stats.drop_page(d, "llm_bad_reply", f"rewrite has {len(new)} blocks for {len(texts)}")
                    continue
                lost = [sorted(numbers_in(t.text) - numbers_in(n)) for t, n in zip(texts, new)]
                if any(lost):
                    stats.drop_page(d, "llm_lost_facts", f"numbers missing from the rewrite: {[x for x in lost if x][:3]}")
                    continue
                for t, n in zip(texts, new):
                    t.text = n.strip()
                d.meta.setdefault("prompts", {})["rewrite_text"] = self.template.version_key
                yield d


# ----------------------------------------------------------------------------- 8. reorder
def reorder_by_group(items: list) -> list:
    """Within one step container (same ``group``), put the text before the images: on how-to pages
    the step photo usually sits above its text; the paper wants each image after its description."""
    out, i = [], 0
    while i < len(items):
        g = items[i].group
        j = i + 1
        if g is not None:
            while j < len(items) and items[j].group == g:
                j += 1
        run = items[i:j]
        out += [x for x in run if isinstance(x, TextItem)] + [x for x in run if isinstance(x, ImageItem)]
        i = j
    return out


class Reorder:
    name = "reorder"

    def __init__(self, client=None, batch_pages: int = 16):
        self.client, self.batch_pages = client, batch_pages
        if client is not None:
            from duetgen.llm import PromptTemplate

            self.template = PromptTemplate.load("reorder", root=PROMPT_DIR)

    @staticmethod
    def _listing(d: Doc) -> str:
        lines = []
        for i, x in enumerate(d.items):
            if isinstance(x, TextItem):
                lines.append(f"[{i}] TEXT: {x.text[:400]}")
            else:
                lines.append(f"[{i}] IMAGE: {x.caption or x.alt or '(no caption)'}")
        return "\n".join(lines)

    def __call__(self, docs, stats):
        for batch in _batched(docs, self.batch_pages if self.client else 1):
            for d in batch:
                d.items = reorder_by_group(d.items)
            if self.client is None:
                yield from batch
                continue
            requests = [(self.template.render(title=d.title, items=self._listing(d)), self.template.chat_kwargs())
                        for d in batch]
            for d, r in zip(batch, _chat(self.client, requests, stats)):
                if not r.ok:
                    stats.drop_page(d, _llm_failure(r), r.error or "")
                    continue
                order = r.data["order"]
                if sorted(order) != list(range(len(d.items))):
                    stats.drop_page(d, "llm_bad_reply", f"order {order[:20]} is not a permutation of {len(d.items)} items")
                    continue
                texts_before = [id(x) for x in d.items if isinstance(x, TextItem)]
                new = [d.items[i] for i in order]
                if [id(x) for x in new if isinstance(x, TextItem)] != texts_before:
                    stats.drop_page(d, "llm_bad_reply", "the order moves text items (only images may move)")
                    continue
                d.items = new
                d.meta.setdefault("prompts", {})["reorder"] = self.template.version_key
                yield d


# ----------------------------------------------------------------------------- 9. dialogue
class BuildDialogue:
    """Cleaned sequence -> user question (+ optional image) and a step-by-step illustrated answer."""

    name = "dialogue"

    def __init__(self, client=None, batch_pages: int = 16, model: str | None = None):
        self.client, self.batch_pages, self.model = client, batch_pages, model
        if client is not None:
            from duetgen.llm import PromptTemplate

            self.template = PromptTemplate.load("build_dialogue", root=PROMPT_DIR)

    def _meta(self, d: Doc, mode: str) -> dict:
        return {"url": d.url, "title": d.title, **{k: v for k, v in d.meta.items() if k != "engine"},
                "engine": {**d.meta.get("engine", {}), "dialogue": mode, "model": self.model},
                "images": [{"url": x.url, **({"file": x.file} if x.file else {}),
                            **({"warc": x.warc} if x.warc else {}), "caption": x.caption,
                            "category": x.category} for x in d.images]}

    def template_record(self, d: Doc) -> Record | str:
        """Deterministic: title -> question; steps 'Step k: ...' each followed by its images."""
        question = title_to_question(d.title)
        if not question:
            return "no_title"
        parts: list = []
        text_buf: list[str] = []
        step, last_group = 0, object()
        for x in d.items:
            if isinstance(x, ImageItem):
                if text_buf:
                    parts.append(TextPart("\n\n".join(text_buf)))
                    text_buf = []
                parts.append(ImagePart(x.data))
                continue
            t = x.text
            if x.kind == "step" and (x.group is None or x.group != last_group):
                step += 1
                t = f"Step {step}: {t}"
            last_group = x.group
            text_buf.append(t)
        if text_buf:
            parts.append(TextPart("\n\n".join(text_buf)))
        return Record(id=d.id, source=d.source, meta=self._meta(d, "template"),
                      messages=[Message("user", [TextPart(question)]), Message("assistant", parts)])

    def llm_request(self, d: Doc):
        sequence, k = [], 0
        for x in d.items:
            if isinstance(x, TextItem):
                sequence.append({"type": "text", "text": x.text})
            else:
                sequence.append({"type": "text", "text": f"[IMAGE {k}]"})
                sequence.append({"type": "image", "image": _llm_image(x)})
                k += 1
        return self.template.render(title=d.title, sequence=sequence), self.template.chat_kwargs()

    def llm_record(self, d: Doc, data: dict) -> Record | str:
        images = d.images
        used = [a["image"] for a in data["answer"] if a["image"] is not None]
        ui = data["user_image"]
        bad = [i for i in used + ([ui] if ui is not None else []) if not 0 <= i < len(images)]
        if bad:
            return f"image index {bad[0]} out of range (page has {len(images)})"
        if len(set(used)) != len(used) or (ui is not None and ui in used):
            return "an image is used twice (or the user's image is reused in the answer)"
        if not used:
            return "the answer uses no image"
        user = [TextPart(data["question"].strip())] + ([ImagePart(images[ui].data)] if ui is not None else [])
        assistant: list = []
        for a in data["answer"]:
            if a["text"].strip():
                assistant.append(TextPart(a["text"].strip()))
            if a["image"] is not None:
                assistant.append(ImagePart(images[a["image"]].data))
        meta = self._meta(d, "llm")
        meta.setdefault("prompts", {})["build_dialogue"] = self.template.version_key
        return Record(id=d.id, source=d.source, meta=meta,
                      messages=[Message("user", user), Message("assistant", assistant)])

    def __call__(self, docs, stats):
        for batch in _batched(docs, self.batch_pages if self.client else 1):
            if self.client is None:
                outs = [self.template_record(d) for d in batch]
            else:
                results = _chat(self.client, [self.llm_request(d) for d in batch], stats)
                outs = [self.llm_record(d, r.data) if r.ok else r for d, r in zip(batch, results)]
            for d, out in zip(batch, outs):
                if isinstance(out, Record):
                    d.record = out
                    yield d
                elif isinstance(out, str):
                    stats.drop_page(d, "no_title" if out == "no_title" else "llm_bad_reply", out)
                else:  # a failed ChatResult
                    stats.drop_page(d, _llm_failure(out), out.error or "")


# ----------------------------------------------------------------------------- the pipeline
def page_stages(cfg) -> list:
    """Pass 1 (runner.py): what decides from the page alone whether it goes on."""
    return [Extract(cfg.extract), PageFilter(cfg.pages), LanguageFilter(cfg.language)]


def build_stages(cfg, client=None, warc_index: str | None = None) -> list:
    """Pass 2 (runner.py): images, text and dialogue for the pages that passed pass 1 and dedup."""
    stages = [FetchImages(cfg.fetch, cfg.fetch_threads, warc_index, rules=cfg.images), ImageRules(cfg.images)]
    if client is not None:
        stages.append(CaptionImages(client, cfg.llm_batch_pages))
    stages += [DedupConsecutive(cfg.dedup_max_distance), RequireImages(cfg.pages.min_images), CleanText()]
    if client is not None:
        stages.append(RewriteText(client, cfg.llm_batch_pages))
    stages += [Reorder(client, cfg.llm_batch_pages), BuildDialogue(client, cfg.llm_batch_pages, cfg.llm_model)]
    return stages
