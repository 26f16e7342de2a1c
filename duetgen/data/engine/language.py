"""Page-level language ID (lingua) and the page text the language and near-duplicate checks read.

Design choices:
- ``lingua-language-detector``: its n-gram models for 75 languages ship inside the wheel (nothing
  is downloaded at run time) and it is made for mixed and short text. Low-accuracy mode (trigram
  models only) is meant for texts longer than a sentence, which every page past the page filter is
  (>= 200 characters); a one-off ~2 s model load per process, ~110 MB resident.
- The text is the page's cleaned body text (``clean_block`` over its text items, kept on the Doc
  for the near-dup sketch), first 1,000 characters: ten-odd sentences, where lingua's accuracy is
  saturated, and the cost stays flat on long pages. Measured per page (one core, after the model
  load): 1.1 ms at 500 characters, 1.8 ms at 1,000, 4.4 ms at 2,000 (the earlier sample); the
  language was the same at all three on every fixture page (the WARC test's German page: de).
- The stage reads ``BATCH_PAGES`` pages, then runs lingua over them one after another: its n-gram
  tables (memory-bound lookups) stay in the CPU caches instead of being evicted by each page's
  extraction in between. Same calls, same answers; in benchmarks/data_engine.py the stage went from
  3.2-5.3 to 2.9-3.3 CPU ms a page (issue 18).
- Undetectable is not guessed: lingua's answer is None (no letters, digits only...), its top
  confidence is under ``min_confidence``, or its letters are written in several scripts besides
  Latin (``script_mix``) -> the page is dropped as ``language_undetected`` (``--languages any``
  keeps it, with ``meta.language = {"code": null, ...}``). The script test is the audit's (session 14): a page of one word in each of five scripts
  was Sesotho at 0.64 (lingua ranks languages; it does not say "none of them"). Latin letters are
  neutral (brand names in Japanese or Hindi news; Serbian in both alphabets), kana and Hangul count
  with Han. ~0.01 ms a mostly-ASCII page (its ASCII letters are counted in C), ~0.2 ms otherwise.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from duetgen.data.engine.document import Doc
from duetgen.data.engine.text import clean_block

_DETECTOR = None
BATCH_PAGES = 32  # pages whose text lingua reads one after another (its n-gram tables stay in the CPU caches)
MIN_FOREIGN_SHARE = 0.25  # letters outside Latin: at least this share of the sample's letters ...
MIN_SCRIPT_SHARE = 0.75  # ... and no one non-Latin script holds this share of them: no language is named
_SCRIPT_GROUPS = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "HANGUL": "CJK", "HALFWIDTH": "CJK", "FULLWIDTH": "LATIN",
                  "MATHEMATICAL": "LATIN"}  # written together with Han (CJK ...); Latin in other clothes
_ASCII_LETTERS = re.compile(r"[A-Za-z]")


@dataclass
class LanguageConfig:
    languages: tuple[str, ...] = ("en",)  # ISO 639-1 codes kept; ("any",) keeps every page
    min_confidence: float = 0.5  # lingua's top confidence under this = undetectable
    sample_chars: int = 1000  # of the page's cleaned text (module docstring)


def page_text(d: Doc) -> str:
    """The page's cleaned body text (what the language and near-duplicate checks read); each text
    item keeps its cleaned block (``TextItem.cleaned``) for pass 2's clean-up stage."""
    for x in d.texts:
        x.cleaned = clean_block(x.text)
    return "\n".join(x.cleaned for x in d.texts if x.cleaned)


def check_languages(codes: tuple[str, ...]) -> None:
    """Raise ValueError naming a code lingua does not know."""
    if codes == ("any",):
        return
    if not codes:
        raise ValueError("--languages names no language: give ISO 639-1 codes (e.g. en or en,de) or 'any'")
    if "any" in codes:
        raise ValueError(f"--languages {','.join(codes)}: 'any' keeps every page, so it stands alone")
    from lingua import Language

    known = {lang.iso_code_639_1.name.lower() for lang in Language.all()}
    if bad := [c for c in codes if c not in known]:
        raise ValueError(f"--languages: unknown ISO 639-1 code(s) {', '.join(bad)} "
                         f"(lingua knows {len(known)}, e.g. en, de, fr; or 'any')")


def script_mix(text: str) -> str | None:
    """The letters' script shares ("Latin 59%, Greek 15%, ...") when the text is written in several scripts besides
    Latin, else None. Latin is neutral: brand names, code and units in Latin letters fill pages in every language
    (a review's Japanese, Chinese, Korean, Hindi and Arabic tech news were 28-72 % Latin letters, and a CJK letter
    is a syllable or a word), and Serbian is written in Latin and Cyrillic. A text is mixed when at least
    ``MIN_FOREIGN_SHARE`` of its letters are outside Latin and no one script holds ``MIN_SCRIPT_SHARE`` of those."""
    letters = sum(map(str.isalpha, text))
    if not letters or len(_ASCII_LETTERS.findall(text)) > (1 - MIN_FOREIGN_SHARE) * letters:
        return None
    scripts = Counter()
    for ch in text:
        if ch.isalpha():
            script = unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]
            scripts[_SCRIPT_GROUPS.get(script, script)] += 1
    foreign = letters - scripts["LATIN"]
    if foreign < MIN_FOREIGN_SHARE * letters or max(n for s, n in scripts.items() if s != "LATIN") >= (
            MIN_SCRIPT_SHARE * foreign):
        return None
    return ", ".join(f"{s.title()} {n / letters:.0%}" for s, n in scripts.most_common(4))


def detect(text: str, min_confidence: float) -> tuple[str | None, float, str]:
    """(ISO 639-1 code or None when undetectable, confidence in [0, 1], why undetectable or "")."""
    global _DETECTOR
    if _DETECTOR is None:
        from lingua import LanguageDetectorBuilder

        _DETECTOR = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()
    values = _DETECTOR.compute_language_confidence_values(text)
    confidence = round(values[0].value, 3) if values else 0.0
    if not values or values[0].value < min_confidence:
        return None, confidence, f"top confidence {confidence} < {min_confidence}"
    if mix := script_mix(text):
        return None, confidence, f"letters in several scripts ({mix}): no one language"
    return values[0].language.iso_code_639_1.name.lower(), confidence, ""


class LanguageFilter:
    name = "language"

    def __init__(self, cfg: LanguageConfig):
        check_languages(cfg.languages)
        self.cfg = cfg
        self.keep_any = cfg.languages == ("any",)

    def __call__(self, docs, stats):
        batch = []
        for d in docs:
            batch.append(d)
            if len(batch) == BATCH_PAGES:
                yield from self._judge(batch, stats)
                batch = []
        yield from self._judge(batch, stats)

    def _judge(self, batch: list[Doc], stats):
        for d in batch:
            d.clean_text = page_text(d)
        verdicts = [detect(d.clean_text[: self.cfg.sample_chars], self.cfg.min_confidence) for d in batch]
        for d, (code, conf, why) in zip(batch, verdicts):
            d.meta["language"] = {"code": code, "confidence": conf}
            stats.counts[f"language:{code or 'undetected'}"] += 1
            if code is None and not self.keep_any:
                stats.drop_page(d, "language_undetected", why)
            elif code is not None and not self.keep_any and code not in self.cfg.languages:
                stats.drop_page(d, "language_not_wanted", f"{code} ({conf}), wanted {', '.join(self.cfg.languages)}")
            else:
                yield d
