"""The hierarchical query pool: domains -> subcategories -> seed questions (paper section 3.1).

The pool is data (``taxonomy.json`` next to this file), not code, so annotators edit it without
touching Python. The shipped file has 8 everyday domains and 151 subcategories, as in the paper,
with three seed questions each written for this project (the paper's annotators wrote ~10).

Design choices:
- Strict loading: unknown keys, duplicate ids, empty seed lists and non-string questions are
  refused with a message naming the file, the domain and the subcategory (STYLE principle 12).
- ``Subcategory.siblings`` is precomputed: expansion shows the domain and the *other*
  subcategories of the same domain in the prompt so the model avoids overlap (section 3.1).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

DEFAULT_TAXONOMY = Path(__file__).parent / "taxonomy.json"
_ID_RE = re.compile(r"[a-z0-9][a-z0-9_]*")  # fullmatch: "$" would also match before a trailing newline
MAX_TAXONOMY_BYTES = 64 << 20


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    counts = Counter(k for k, _ in pairs)
    doubled = sorted(k for k, n in counts.items() if n > 1)
    if doubled:
        raise ValueError(f"key(s) {doubled} given twice in one object (JSON keeps only the last)")
    return dict(pairs)


class TaxonomyError(ValueError):
    """The taxonomy file is malformed; the message names the file and the entry."""


@dataclass
class Subcategory:
    id: str
    name: str
    seeds: list[str]
    domain_id: str
    domain_name: str
    siblings: list[str] = field(default_factory=list)  # names of the other subcategories in the domain


@dataclass
class Domain:
    id: str
    name: str
    description: str
    subcategories: list[Subcategory]


@dataclass
class Taxonomy:
    name: str
    version: str
    domains: list[Domain]
    path: str = ""

    def subcategories(self) -> Iterator[Subcategory]:
        for d in self.domains:
            yield from d.subcategories

    def subcategory(self, sub_id: str) -> Subcategory:
        for s in self.subcategories():
            if s.id == sub_id:
                return s
        raise KeyError(f"no subcategory {sub_id!r} in taxonomy {self.name!r}")

    @property
    def num_subcategories(self) -> int:
        return sum(len(d.subcategories) for d in self.domains)

    @property
    def num_seeds(self) -> int:
        return sum(len(s.seeds) for s in self.subcategories())

    def summary(self) -> list[dict[str, Any]]:
        """One row per domain: id, name, subcategory count, seed count."""
        return [{"domain": d.id, "name": d.name, "subcategories": len(d.subcategories),
                 "seeds": sum(len(s.seeds) for s in d.subcategories)} for d in self.domains]


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load and validate a taxonomy file (default: the shipped 8-domain, 151-subcategory pool)."""
    path = Path(path) if path is not None else DEFAULT_TAXONOMY
    where = str(path)
    if not path.exists():
        raise TaxonomyError(f"taxonomy file {where!r} does not exist")
    if not path.is_file():  # a FIFO would block the read forever
        raise TaxonomyError(f"taxonomy file {where!r} is not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TAXONOMY_BYTES + 1)
        if len(raw) > MAX_TAXONOMY_BYTES:
            raise TaxonomyError(f"taxonomy file {where!r} is over the cap of {MAX_TAXONOMY_BYTES:,} bytes")
        d = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise TaxonomyError(f"taxonomy file {where!r} is not readable JSON ({e})") from None
    except RecursionError:
        raise TaxonomyError(f"taxonomy file {where!r} is not readable JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise TaxonomyError(f"{where}: the top level must be an object")
    _only_keys(d, {"name", "version", "description", "domains"}, where)
    for k in ("name", "version"):
        if not isinstance(d.get(k), str) or not d[k]:
            raise TaxonomyError(f"{where}: {k!r} must be a non-empty string")
    if not isinstance(d.get("domains"), list) or not d["domains"]:
        raise TaxonomyError(f"{where}: 'domains' must be a non-empty list")

    domains: list[Domain] = []
    seen: set[str] = set()
    questions: dict[str, str] = {}  # a seed question, spaced and cased one way -> where it is given
    for i, dd in enumerate(d["domains"]):
        dw = f"{where}: domains[{i}]"
        if not isinstance(dd, dict):
            raise TaxonomyError(f"{dw} must be an object")
        _only_keys(dd, {"id", "name", "description", "subcategories"}, dw)
        did = _id(dd.get("id"), dw, seen)
        dw = f"{where}: domain {did!r}"
        dname = _text(dd.get("name"), f"{dw}.name")
        subs_raw = dd.get("subcategories")
        if not isinstance(subs_raw, list) or not subs_raw:
            raise TaxonomyError(f"{dw}: 'subcategories' must be a non-empty list")
        subs: list[Subcategory] = []
        for j, sd in enumerate(subs_raw):
            sw = f"{dw}: subcategories[{j}]"
            if not isinstance(sd, dict):
                raise TaxonomyError(f"{sw} must be an object")
            _only_keys(sd, {"id", "name", "seeds"}, sw)
            sid = _id(sd.get("id"), sw, seen)
            sw = f"{dw}: subcategory {sid!r}"
            seeds = sd.get("seeds")
            if not isinstance(seeds, list) or not seeds:
                raise TaxonomyError(f"{sw}: 'seeds' must be a non-empty list of questions")
            seeds = [_text(q, f"{sw}.seeds[{k}]") for k, q in enumerate(seeds)]
            for k, q in enumerate(seeds):  # (`expand --seeds-only` wrote a repeated seed twice)
                norm = " ".join(q.split()).casefold()
                if norm in questions:
                    raise TaxonomyError(f"{sw}.seeds[{k}]: the question {q!r} is given twice (also {questions[norm]})")
                questions[norm] = f"{sw}.seeds[{k}]"
            subs.append(Subcategory(sid, _text(sd.get("name"), f"{sw}.name"), seeds, did, dname))
        names: dict[str, str] = {}
        for s in subs:  # each subcategory's siblings are the names to steer away from: two equal names would
            key = " ".join(s.name.split()).casefold()  # list a subcategory's own name as one
            if key in names:
                raise TaxonomyError(f"{dw}: subcategories {names[key]!r} and {s.id!r} have the same name {s.name!r}")
            names[key] = s.id
        for s in subs:
            s.siblings = [o.name for o in subs if o.id != s.id]
        description = dd.get("description", "")
        if not isinstance(description, str):
            raise TaxonomyError(f"{dw}.description must be a string, got {type(description).__name__}")
        domains.append(Domain(did, dname, description, subs))
    return Taxonomy(d["name"], d["version"], domains, path=where)


def _only_keys(d: dict, allowed: set[str], where: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise TaxonomyError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")


def _id(v: Any, where: str, seen: set[str]) -> str:
    if not isinstance(v, str) or not _ID_RE.fullmatch(v):
        raise TaxonomyError(f"{where}.id must be a lowercase identifier (a-z, 0-9, _), got {v!r}")
    if v in seen:
        raise TaxonomyError(f"{where}.id {v!r} is used twice (ids are unique across domains and subcategories)")
    seen.add(v)
    return v


def _text(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise TaxonomyError(f"{where} must be a non-empty string, got {v!r}")
    return v.strip()
