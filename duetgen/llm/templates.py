"""Prompt templates as versioned data files (the lm-evaluation-harness way: prompts are data).

A template is one JSON file::

    {"name": "caption_image", "version": "1",
     "description": "what it is for",
     "system": "You are ...",
     "user": [{"type": "text", "text": "Page title: {title}\\nText before the image: {context}"},
              {"type": "image", "field": "image"}],
     "json_schema": {...},                       # optional: the reply must validate against it
     "sampling": {"temperature": 0.0, "max_tokens": 512}}   # optional defaults for achat

Design choices:
- ``user`` (and ``system``) are a string or a list of parts. Text holds named fields ``{field}``
  (identifiers only, so literal JSON braces in a prompt are left alone). A part
  ``{"type": "image", "field": F}`` takes an image (PIL, bytes or Path) or a list of them; a part
  ``{"type": "parts", "field": F}`` splices a list of ready OpenAI content parts, for prompts that
  carry a whole interleaved sequence.
- ``render`` refuses a missing field and an unknown one (a typo must not render silently).
- ``version_key`` = ``name@version:<sha256 of the file content, 12 hex>``: it goes into the LLM
  cache key, so editing a prompt without bumping its version still misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).parent / "templates"
_FIELD_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class TemplateError(ValueError):
    """A template file is malformed, or render() got missing / unknown fields."""


@dataclass
class PromptTemplate:
    name: str
    version: str
    user: str | list[dict]
    system: str | list[dict] | None = None
    json_schema: dict | None = None
    sampling: dict = field(default_factory=dict)  # default achat kwargs (temperature, max_tokens, ...)
    description: str = ""
    content_hash: str = ""  # sha256 of the canonical template content

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, name: str | Path, root: str | Path | None = None) -> "PromptTemplate":
        """Load ``<root>/<name>.json`` (root defaults to duetgen/llm/templates), or a .json path."""
        p = Path(name)
        if p.suffix == ".json" and p.is_file():
            path = p
        else:
            if not _NAME_RE.match(str(name)):
                raise TemplateError(f"template name {str(name)!r} must be a plain name (letters, digits, _ . -)")
            path = Path(root or TEMPLATE_DIR) / f"{name}.json"
            if not path.is_file():
                raise TemplateError(f"template {str(name)!r} not found at {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise TemplateError(f"template file {path}: not valid JSON ({e})") from None
        return cls.from_dict(d, where=str(path))

    @classmethod
    def from_dict(cls, d: Any, where: str = "<dict>") -> "PromptTemplate":
        if not isinstance(d, dict):
            raise TemplateError(f"template {where}: must be a JSON object")
        allowed = {"name", "version", "description", "system", "user", "json_schema", "sampling"}
        unknown = set(d) - allowed
        if unknown:
            raise TemplateError(f"template {where}: unknown key(s) {sorted(unknown)}")
        for k in ("name", "version", "user"):
            if k not in d:
                raise TemplateError(f"template {where}: missing {k!r}")
        if not isinstance(d["name"], str) or not isinstance(d["version"], str):
            raise TemplateError(f"template {where}: 'name' and 'version' must be strings")
        for k in ("system", "user"):
            _check_content(d.get(k), f"template {where}: {k!r}")
        if d.get("json_schema") is not None:
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(d["json_schema"])
            except jsonschema.SchemaError as e:
                raise TemplateError(f"template {where}: json_schema is not a valid schema: {e.message}") from None
        canonical = json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return cls(
            name=d["name"], version=d["version"], user=d["user"], system=d.get("system"),
            json_schema=d.get("json_schema"), sampling=dict(d.get("sampling") or {}),
            description=d.get("description", ""),
            content_hash=hashlib.sha256(canonical.encode()).hexdigest(),
        )

    @property
    def version_key(self) -> str:
        """What the client's cache key holds for this template (see module docstring)."""
        return f"{self.name}@{self.version}:{self.content_hash[:12]}"

    def fields(self) -> set[str]:
        out: set[str] = set()
        for content in (self.system, self.user):
            if isinstance(content, str):
                out |= set(_FIELD_RE.findall(content))
            elif isinstance(content, list):
                for part in content:
                    if part.get("type") == "text":
                        out |= set(_FIELD_RE.findall(part["text"]))
                    else:
                        out.add(part["field"])
        return out

    # ----------------------------------------------------------------------------- rendering
    def render(self, **values: Any) -> list[dict]:
        """The OpenAI chat messages for these field values."""
        need = self.fields()
        missing, unknown = need - set(values), set(values) - need
        if missing or unknown:
            raise TemplateError(
                f"template {self.name!r}: missing field(s) {sorted(missing)}, unknown field(s) {sorted(unknown)}"
            )
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": _render_content(self.system, values)})
        messages.append({"role": "user", "content": _render_content(self.user, values)})
        return messages

    def chat_kwargs(self) -> dict:
        """The achat keyword arguments this template implies (schema, version, sampling defaults)."""
        kw = dict(self.sampling)
        kw["template_version"] = self.version_key
        if self.json_schema is not None:
            kw["json_schema"] = self.json_schema
        return kw


def _check_content(content: Any, where: str) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise TemplateError(f"{where} must be a string or a list of parts")
    for i, part in enumerate(content):
        t = part.get("type") if isinstance(part, dict) else None
        if t == "text" and isinstance(part.get("text"), str):
            continue
        if t in ("image", "parts") and isinstance(part.get("field"), str):
            continue
        raise TemplateError(f"{where}[{i}]: expected {{type: text, text}} or {{type: image|parts, field}}, got {part!r}")


def _fill(text: str, values: dict) -> str:
    return _FIELD_RE.sub(lambda m: str(values[m.group(1)]), text)


def _render_content(content: str | list[dict], values: dict) -> str | list[dict]:
    if isinstance(content, str):
        return _fill(content, values)
    parts: list[dict] = []
    for part in content:
        if part["type"] == "text":
            parts.append({"type": "text", "text": _fill(part["text"], values)})
        elif part["type"] == "image":
            v = values[part["field"]]
            for img in v if isinstance(v, (list, tuple)) else [v]:
                parts.append({"type": "image", "image": img})
        else:  # "parts": a ready list of OpenAI content parts
            v = values[part["field"]]
            if not isinstance(v, list) or not all(isinstance(x, dict) and "type" in x for x in v):
                raise TemplateError(f"field {part['field']!r} must be a list of content parts")
            parts.extend(v)
    return parts
