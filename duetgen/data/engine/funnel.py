"""Funnel report: pages and images in and out of every stage, drop reasons, examples, LLM usage.

Written as ``funnel.json`` (the numbers) and ``funnel.html`` (one self-contained page: no script,
no external resources; every string from a page is HTML-escaped, thumbnails are data URLs).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from duetgen.data.engine.document import StageStats
from duetgen.data.dataset import atomic_write_bytes


def merge_stats(per_shard: list[list[dict]]) -> list[StageStats]:
    """Sum the per-shard stage stats (same stage list in every shard) into one list."""
    total: dict[str, StageStats] = {}
    order: list[str] = []
    for shard in per_shard:
        for d in shard:
            s = StageStats.from_json(d)
            if s.name not in total:
                total[s.name] = StageStats(s.name)
                order.append(s.name)
            total[s.name].merge(s)
    return [total[n] for n in order]


def funnel_json(stages: list[StageStats], summary: dict) -> dict:
    llm = {}
    for s in stages:
        for k, v in s.llm.items():
            llm[k] = llm.get(k, 0) + v
    return {"summary": summary, "llm": llm, "stages": [s.to_json() for s in stages]}


def write_report(out_dir: Path, stages: list[StageStats], summary: dict) -> dict:
    data = funnel_json(stages, summary)
    atomic_write_bytes(out_dir / "funnel.json", (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode())
    atomic_write_bytes(out_dir / "funnel.html", render_html(data).encode("utf-8"))
    return data


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _value(v) -> str:
    """A summary value as the JSON shows it (a dict of counts, null), escaped: not Python's repr."""
    return _e(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))


def render_html(data: dict) -> str:
    rows = []
    for s in data["stages"]:
        drops = []
        for kind in ("page_drops", "image_drops", "text_drops"):
            for reason, n in sorted(s[kind].items(), key=lambda kv: -kv[1]):
                drops.append(f"<li>{_e(kind.split('_')[0])}: <code>{_e(reason)}</code> &times; {n}</li>")
        for key, n in sorted((s.get("counts") or {}).items(), key=lambda kv: -kv[1]):
            drops.append(f"<li>seen: <code>{_e(key)}</code> &times; {n}</li>")
        llm = s.get("llm") or {}
        llm_cell = (f"{llm.get('requests', 0)} calls, {llm.get('cached', 0)} cached, "
                    f"{llm.get('prompt_tokens', 0)}+{llm.get('completion_tokens', 0)} tokens, "
                    f"{llm.get('errors', 0)} errors, {llm.get('invalid_json', 0)} invalid, "
                    f"{llm.get('refusals', 0)} refused") if llm else ""
        rows.append(
            f"<tr><td>{_e(s['name'])}</td><td>{s['pages_in']}</td><td>{s['pages_out']}</td>"
            f"<td>{s['images_in']}</td><td>{s['images_out']}</td><td><ul>{''.join(drops)}</ul></td>"
            f"<td>{_e(llm_cell)}</td></tr>"
        )
    examples = []
    for s in data["stages"]:
        for key, exs in sorted(s["examples"].items()):
            items = []
            for ex in exs:
                thumb = ex.get("thumb")
                img = f'<img src="{_e(thumb)}" alt="">' if thumb and thumb.startswith("data:image/jpeg;base64,") else ""
                what = ex.get("url") or ex.get("src") or ex.get("text") or ""
                items.append(f"<li>{img}<code>{_e(ex.get('doc', ''))}</code> {_e(what)} <i>{_e(ex.get('detail', ''))}</i></li>")
            examples.append(f"<h3>{_e(s['name'])} &middot; <code>{_e(key)}</code></h3><ul>{''.join(items)}</ul>")
    summ = "".join(f"<li>{_e(k)}: {_value(v)}</li>" for k, v in data["summary"].items())
    llm = "".join(f"<li>{_e(k)}: {_value(v)}</li>" for k, v in data["llm"].items()) or "<li>no LLM configured</li>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>DuetGen data engine funnel</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;vertical-align:top}}img{{height:48px;margin-right:6px;vertical-align:middle}}ul{{margin:0}}
li,code{{overflow-wrap:anywhere}}</style>
</head><body>
<h1>Data engine funnel</h1>
<h2>Run</h2><ul>{summ}</ul>
<h2>LLM</h2><ul>{llm}</ul>
<h2>Stages</h2>
<table><tr><th>stage</th><th>pages in</th><th>pages out</th><th>images in</th><th>images out</th>
<th>drops (reason &times; count)</th><th>LLM</th></tr>
{''.join(rows)}
</table>
<h2>Examples of dropped items</h2>
{''.join(examples)}
</body></html>
"""
