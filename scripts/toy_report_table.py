"""Markdown tables from `duetgen train eval-toy` reports (report.json): per kind, each metric with its 95% bootstrap interval.

    python scripts/toy_report_table.py runs/eval-a/report.json [runs/eval-b/report.json ...] [--compact]

--compact: one row per report (the "all" row plus IT-Co per image kind), for comparing runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ["t_com", "i_com", "i_co", "it_co", "i_q", "u_acc"]
LABELS = ["T-Com", "I-Com", "I-Co", "IT-Co", "I-Q", "U-Acc"]
IMAGE_KINDS = ["how-to", "continuation", "text-to-image", "editing"]


def cell(s: dict, m: str, ci: bool = True) -> str:
    if s.get(m) is None:
        return "-"
    if not ci or s.get(f"{m}_ci") is None:
        return f"{s[m]:.3f}"
    lo, hi = s[f"{m}_ci"]
    return f"{s[m]:.3f} [{lo:.2f}, {hi:.2f}]"


def main() -> None:
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    compact = "--compact" in sys.argv
    reports = [(p, json.loads(Path(p).read_text())) for p in paths]
    if compact:
        print("| report | " + " | ".join(LABELS) + " | " + " | ".join(f"IT-Co {k}" for k in IMAGE_KINDS) + " |")
        print("|---" * (1 + len(LABELS) + len(IMAGE_KINDS)) + "|")
        for p, r in reports:
            s = r["summary"]
            print(f"| {p} | " + " | ".join(cell(s["all"], m, ci=False) for m in METRICS) + " | "
                  + " | ".join(cell(s.get(k, {}), "it_co", ci=False) for k in IMAGE_KINDS) + " |")
        return
    for p, r in reports:
        print(f"{p}\n")
        print("| kind | n | " + " | ".join(LABELS) + " |")
        print("|---|---|" + "---|" * len(LABELS))
        for kind, s in r["summary"].items():
            print(f"| {kind} | {s['n']} | " + " | ".join(cell(s, m) for m in METRICS) + " |")
        print()


if __name__ == "__main__":
    main()
