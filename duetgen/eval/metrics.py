"""Aggregation of judged samples: means with bootstrap 95% intervals, state counts, per-category tables.

Design choices:
- The unit of resampling is the benchmark item (one answer): image-level scores are averaged
  within an answer first (harness), so correlated images of one answer do not narrow the interval.
- Percentile bootstrap, 2000 resamples, a fixed seed (0): the same results give the same interval
  on every machine, and the seed is written into the summary.
- Only ``ok`` values enter a mean. Every other state (judge failures: ``api_error``, ``refusal``,
  ``unparsable``; item states: ``missing`` prediction, ``no_image`` for an image-level metric of an
  answer without images, ``undefined`` for a metric an exact judge does not define for that task
  kind) is counted and reported next to the mean, never scored.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

import numpy as np

JUDGE_FAILURES = ("api_error", "refusal", "unparsable")
METRIC_STATES = ("ok", *JUDGE_FAILURES, "no_image", "missing", "undefined")
N_BOOT = 2000
SEED = 0


def bootstrap_ci(values: Iterable[float], n_boot: int = N_BOOT, seed: int = SEED,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean; None for no values, (x, x) for one."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return None
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    # Resample in chunks so a large benchmark never holds n_boot x n indices at once.
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def aggregate(values: list[float], n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """{"mean", "ci95": [lo, hi], "n"} over the ok values (mean and ci95 None when n == 0)."""
    if not values:
        return {"mean": None, "ci95": None, "n": 0}
    ci = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"mean": float(np.mean(values)), "ci95": [ci[0], ci[1]], "n": len(values)}


def _table(results: list[dict], metric_names: list[str], n_boot: int, seed: int) -> dict:
    out = {}
    for name in metric_names:
        values, states = [], Counter()
        for r in results:
            m = r["metrics"][name]
            states[m["state"]] += 1
            if m["state"] == "ok":
                values.append(m["value"])
        row = aggregate(values, n_boot=n_boot, seed=seed)
        row["states"] = {s: states.get(s, 0) for s in METRIC_STATES}
        unknown = set(states) - set(METRIC_STATES)
        if unknown:
            raise ValueError(f"metric {name!r}: unknown state(s) {sorted(unknown)} in results")
        out[name] = row
    return out


def judge_request_states(results: list[dict]) -> dict[str, int]:
    """How every judge request of these results ended (k samples per unit count k times)."""
    counts = Counter()
    for r in results:
        for units in (r.get("calls") or {}).values():
            if isinstance(units, dict):  # hidden_pair: a prediction request, then the pair units
                if units["predict"] is not None:
                    counts[units["predict"]["state"]] += 1
                units = units["pairs"]
            for u in units:
                for s in u["samples"]:
                    counts[s["state"]] += 1
    return {s: counts.get(s, 0) for s in ("ok", *JUDGE_FAILURES)}


def summarize(results: list[dict], metric_names: list[str], n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """Overall and per-category tables for these result lines (see harness for their shape)."""
    by_cat = defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(r)
    return {
        "n_items": len(results),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95, "method": "percentile"},
        "metrics": _table(results, metric_names, n_boot, seed),
        "categories": {c: {"n_items": len(rs), "metrics": _table(rs, metric_names, n_boot, seed)}
                       for c, rs in sorted(by_cat.items())},
        "judge_requests": judge_request_states(results),
    }
