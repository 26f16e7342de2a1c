"""Expand the seed questions into a large, diverse, balanced query pool (paper section 3.1).

The paper expands ~1,500 seeds over 151 subcategories into 15,270 instructions with an LLM,
"the base category and other subcategories ... provided to avoid duplication". Here:

    seeds (taxonomy.json) --> LLM rounds per subcategory --> length filter --> near-dup removal
                          --> cap at ``per_subcategory`` --> queries.jsonl (+ report)

Design choices:
- Each request shows the domain, the sibling subcategories (to stay out of them) and examples
  already in the pool (seeds, then up to ``max_examples`` accepted questions) so a later round
  does not regenerate the first one.
- Rounds: round r asks only the subcategories still short of the target, so the pool ends
  balanced; after ``max_rounds`` a shortfall is reported per subcategory, never padded.
- Near-duplicates are removed against the *whole* pool (all subcategories), seeds first, with
  MinHash-LSH + exact Jaccard (``dedup.py``). Every dropped question is in the report with its
  reason (``near_duplicate``, ``too_short``, ``too_long``, ``over_target``) or the LLM failure.
- Per-request seeds are derived from (run seed, subcategory, round, batch), so with the LLM
  client's response cache a rerun reproduces the pool exactly and costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from duetgen.data.dataset import atomic_write_bytes
from duetgen.data.synthetic.dedup import NearDupConfig, NearDupIndex
from duetgen.data.synthetic.runlog import RunReport
from duetgen.data.synthetic.taxonomy import Subcategory, Taxonomy

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass
class ExpandConfig:
    per_subcategory: int = 100  # target questions per subcategory, seeds included (151 x 100 ~ the paper's 15,270)
    batch_size: int = 25  # questions asked for in one LLM call
    max_rounds: int = 3  # rounds of asking the subcategories still short of the target
    max_examples: int = 12  # pool questions shown in the prompt as "do not repeat"
    min_chars: int = 15  # shorter questions are dropped (too_short)
    max_chars: int = 300  # longer ones are dropped (too_long)
    include_seeds: bool = True  # the seed questions are part of the pool (and survive dedup first)
    seed: int = 0  # run seed; per-request LLM seeds derive from it
    dedup: NearDupConfig = field(default_factory=NearDupConfig)


def _request_seed(run_seed: int, sub_id: str, round_idx: int, batch: int) -> int:
    h = hashlib.sha256(f"{run_seed}/{sub_id}/{round_idx}/{batch}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def expansion_messages(template, sub: Subcategory, examples: list[str], n: int) -> list[dict]:
    return template.render(domain=sub.domain_name, subcategory=sub.name,
                           siblings="; ".join(sub.siblings) or "(none)",
                           examples="\n".join(f"- {q}" for q in examples), n=n)


def expand_queries(taxonomy: Taxonomy, client, cfg: ExpandConfig, report: RunReport | None = None,
                   progress: bool = True) -> list[dict[str, Any]]:
    """The balanced, deduplicated query pool as a list of dicts (see ``write_queries``)."""
    from duetgen.llm.templates import PromptTemplate

    template = PromptTemplate.load("expand_queries", root=TEMPLATE_DIR)
    report = report or RunReport("expand")
    subs = list(taxonomy.subcategories())
    index = NearDupIndex(cfg.dedup)
    pool: dict[str, list[dict[str, Any]]] = defaultdict(list)
    all_texts: list[str] = []  # index position -> text, for naming the duplicate kept

    def offer(sub: Subcategory, text: Any, origin: str, round_idx: int) -> None:
        item = f"{sub.id}: {str(text)[:120]!r}"
        if not isinstance(text, str):
            report.skip(item, "not_a_string")
            return
        q = " ".join(text.split())
        if len(q) < cfg.min_chars:
            report.skip(item, "too_short")
            return
        if len(q) > cfg.max_chars:
            report.skip(item, "too_long")
            return
        if len(pool[sub.id]) >= cfg.per_subcategory:
            report.skip(item, "over_target")
            return
        dup = index.add(q)
        if dup is not None:
            report.skip(item, "near_duplicate", f"near {all_texts[dup]!r}")
            return
        all_texts.append(q)
        pool[sub.id].append({"prompt": q, "origin": origin, "round": round_idx})
        report.count(f"accepted_{origin}")

    if cfg.include_seeds:
        for sub in subs:
            for q in sub.seeds:
                offer(sub, q, "seed", -1)

    for round_idx in range(cfg.max_rounds):
        short = [(s, cfg.per_subcategory - len(pool[s.id])) for s in subs if len(pool[s.id]) < cfg.per_subcategory]
        if not short:
            break
        requests, owners = [], []
        for sub, missing in short:
            examples = [e["prompt"] for e in pool[sub.id]][: cfg.max_examples] or sub.seeds[: cfg.max_examples]
            for b in range(math.ceil(missing / cfg.batch_size)):
                msgs = expansion_messages(template, sub, examples, cfg.batch_size)
                kw = template.chat_kwargs()
                kw["seed"] = _request_seed(cfg.seed, sub.id, round_idx, b)
                requests.append((msgs, kw))
                owners.append(sub)
        report.count("llm_requests", len(requests))
        results = client.chat_many(requests, progress=progress)
        for sub, res in zip(owners, results):
            if not res.ok:
                report.skip(f"{sub.id}: round {round_idx}", f"llm_{res.status}", res.error or "")
                continue
            for q in res.data["questions"]:
                offer(sub, q, "expanded", round_idx)

    out: list[dict[str, Any]] = []
    counts = Counter()
    for sub in subs:
        for k, e in enumerate(pool[sub.id]):
            out.append({"id": f"{sub.id}-{k:04d}", "prompt": e["prompt"], "kind": "howto",
                        "domain": sub.domain_id, "subcategory": sub.id, "origin": e["origin"]})
            counts[sub.id] += 1
    short_final = {s.id: counts[s.id] for s in subs if counts[s.id] < cfg.per_subcategory}
    report.extra["balance"] = {
        "target_per_subcategory": cfg.per_subcategory, "subcategories": len(subs), "total": len(out),
        "min": min(counts[s.id] for s in subs), "max": max(counts[s.id] for s in subs),
        "short_of_target": short_final,
    }
    report.config.setdefault("expand", {k: v for k, v in asdict(cfg).items()})
    return out


def write_queries(path: str | Path, queries: list[dict[str, Any]]) -> None:
    """One JSON object per line: id, prompt, kind, domain, subcategory, origin (atomic write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(q, ensure_ascii=False, separators=(",", ":")) + "\n" for q in queries)
    atomic_write_bytes(path, data.encode("utf-8"))


def seed_queries(taxonomy: Taxonomy) -> list[dict[str, Any]]:
    """The seeds alone as a query file (a pool without an LLM, e.g. for a quick synthesis run)."""
    return [{"id": f"{s.id}-{k:04d}", "prompt": q, "kind": "howto", "domain": s.domain_id,
             "subcategory": s.id, "origin": "seed"}
            for s in taxonomy.subcategories() for k, q in enumerate(s.seeds)]
