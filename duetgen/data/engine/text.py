"""Rule-based text clean-up (paper section 3.1: remove HTML tags, formatting errors, external links).

Runs with or without an LLM; the LLM rewrite (stages.RewriteText) starts from this output.

Design choices:
- Per text block: unescape entities, strip tag remnants, turn ``[text](url)`` into ``text``, delete
  every sentence that holds a bare URL (it only points elsewhere), collapse whitespace, fix spacing around punctuation and runs of ``!!!``/``???``.
- A block that is boilerplate as a whole ("Advertisement", "Share on Facebook", "Was this step
  helpful?", "© 2024 ...") is dropped; the patterns are anchored to the whole block so that a
  sentence merely mentioning "share" survives.
- An explicit "Step 3:" / "3." prefix is removed and the block marked a step: the dialogue
  renumbers steps, and two numberings would disagree once blocks are dropped.
"""

from __future__ import annotations

import html
import re

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\((?:[^()\s]|\([^()\s]*\))*\)")
_URL = re.compile(r"(?:https?://|www\.)[^\s<>()\[\]]+", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_PUNCT = re.compile(r"([!?])\1+|\.{4,}")
_TWO_ALNUM = re.compile(r"[^\W_][\W_]*[^\W_]")  # [^\W_] is exactly str.isalnum
_STEP_PREFIX = re.compile(r"^\s*(?:step\s*\d+\s*[:.)\-–]?|\d+\s*[.)]\s+)\s*", re.I)
_BOILERPLATE = re.compile(
    r"^(?:advertisement|advertisements|sponsored(?: content)?|ad|ads|"
    r"click here\b.*|read more\b.*|continue reading\b.*|related(?: articles| posts| guides)?:?.*|"
    r"see also\b.*|jump to\b.*|skip to\b.*|share (?:this|on|via)\b.*|tweet\b.*|pin it\b.*|"
    r"(?:like|follow) us\b.*|subscribe\b.*|sign up\b.*|join our newsletter\b.*|"
    r"was this (?:step|article|section) helpful\??.*|thanks? for reading\b.*|print(?: this)?(?: article)?|"
    r"©.*|\(c\)\s*\d{4}.*|copyright\b.*|all rights reserved\b.*|"
    r"(?:this (?:site|website) uses )?cookies?\b.*|accept (?:all )?cookies\b.*|"
    r"(?:image|photo) (?:credit|by|courtesy)\b.*|loading\.*|menu|home)\W*$",
    re.I,
)


def clean_block(text: str) -> str:
    """The cleaned text of one block ('' if nothing worth keeping is left)."""
    t = html.unescape(text)
    t = _TAG.sub(" ", t)
    t = _MD_LINK.sub(lambda m: m.group(1), t)
    # A sentence built around a bare URL ("Visit www.x.com for more tips.") points elsewhere: drop it whole.
    t = "\n".join(" ".join(s for s in _SENTENCE.split(line) if not _URL.search(s)) for line in t.split("\n"))
    t = re.sub(r"[ \t\u00a0]+", " ", t)
    t = "\n".join(line.strip() for line in t.split("\n"))
    t = re.sub(r"\n{2,}", "\n", t).strip()
    t = _SPACE_BEFORE_PUNCT.sub(r"\1", t)
    t = _REPEATED_PUNCT.sub(lambda m: m.group(1) or "...", t)
    t = re.sub(r"^[\s•·*\-–—>|»]+", "", t).strip()
    t = re.sub(r"\(\s*\)", "", t).strip()  # "see (  )" left by a removed URL
    if _BOILERPLATE.match(t):
        return ""
    if not _TWO_ALNUM.search(t):  # fewer than two letters/digits (a generator over the characters cost 1 ms a page)
        return ""
    return t


def strip_step_prefix(text: str) -> tuple[str, bool]:
    """(text without a leading 'Step N:' / 'N.' numbering, whether there was one)."""
    m = _STEP_PREFIX.match(text)
    if m and m.end() < len(text):
        return text[m.end():].lstrip(), True
    return text, False


def numbers_in(text: str) -> set[str]:
    """The numbers a rewrite must keep (quantities, times, temperatures)."""
    return set(re.findall(r"\d+(?:[.,]\d+)?", text))


def title_to_question(title: str) -> str:
    """'How to Bathe a Cat' -> 'How do I bathe a cat?' (the deterministic dialogue template)."""
    t = " ".join(title.split()).rstrip(" .!:")
    if not t:
        return ""
    if t.endswith("?"):
        return t
    m = re.match(r"(?i)^how\s+to\s+(.+)$", t)
    body = m.group(1) if m else t
    words = body.split(" ")
    # Title Case -> sentence case: lower a word whose only capital is its first letter
    # (keeps "I", acronyms like "USB" and mixed-case names like "iPhone").
    words = [w.lower() if w[:1].isupper() and w[1:] == w[1:].lower() and w != "I" and len(w) > 1 or w in ("A",)
             else w for w in words]
    return f"How do I {' '.join(words)}?"
