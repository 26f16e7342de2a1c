"""Aggregation of judged samples: means with bootstrap 95% intervals, state counts, per-category tables.

Design choices:
- The unit of resampling is the benchmark item (one answer): image-level scores are averaged
  within an answer first (harness), so correlated images of one answer do not narrow the interval.
- Percentile bootstrap, 2000 resamples, a fixed seed (0): the same results give the same interval
  on every machine, and the seed is written into the summary.
- Only ``ok`` values enter a mean. Every other state (judge failures: ``api_error``, ``refusal``,
  ``unparsable``; item states: ``missing`` prediction, ``no_image`` for an image-level metric of an
  answer without images, ``undefined`` for a metric an exact judge does not define for that task
  kind, ``not_applicable`` for a metric the benchmark does not score on the item's category,
  ``bad_image`` for an item whose image file is missing or unreadable) is counted and reported
  next to the mean, never scored.
- Two aggregates are not plain means over items, because the benchmarks define them otherwise:
  ``mean_of`` (InterleavedBench's Avg.: the mean of the component metrics' means, each over its
  own scored items) and ``over_categories`` (GenEval's Overall, ImgEdit's Overall, GEdit-Bench's
  scores: the mean of the per-category means). Their intervals bootstrap the same statistic:
  items resampled jointly for ``mean_of``, within each category for ``over_categories``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

import numpy as np

JUDGE_FAILURES = ("api_error", "refusal", "unparsable")
METRIC_STATES = ("ok", *JUDGE_FAILURES, "no_image", "missing", "undefined", "not_applicable", "bad_image")
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


def _boot_chunks(n: int, n_boot: int):
    """(start, stop) chunks of the resamples so that no chunk holds more than ~2M indices."""
    chunk = max(1, 2_000_000 // max(1, n))
    for start in range(0, n_boot, chunk):
        yield start, min(n_boot, start + chunk)


def _nan_mean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN; NaN where every value is NaN (no warning)."""
    valid = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, x, 0.0).sum(axis=axis) / valid.sum(axis=axis)


def mean_of_means(x: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """``x``: (items, metrics), NaN where an item's metric is not scored. The mean over metrics of
    each metric's mean over its scored items, with a bootstrap that resamples items jointly."""
    means = _nan_mean(x, axis=0)  # (K,)
    if x.size == 0 or np.isnan(means).all():
        return {"mean": None, "ci95": None, "n": 0}
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    stats = np.empty(n_boot)
    for start, stop in _boot_chunks(n * x.shape[1], n_boot):
        idx = rng.integers(0, n, size=(stop - start, n))
        stats[start:stop] = _nan_mean(_nan_mean(x[idx], axis=1), axis=1)  # (B, N, K) -> (B, K) -> (B,)
    lo, hi = np.nanquantile(stats, [0.025, 0.975])
    return {"mean": float(np.nanmean(means)), "ci95": [float(lo), float(hi)], "n": int((~np.isnan(x)).any(axis=1).sum())}


def mean_over_categories(values: dict[str, list[float]], n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """The mean of the per-category means (categories with at least one scored item), with a
    bootstrap that resamples items within each category (stratified)."""
    cats = [np.asarray(v, dtype=np.float64) for _, v in sorted(values.items()) if v]
    if not cats:
        return {"mean": None, "ci95": None, "n": 0}
    rng = np.random.default_rng(seed)
    per_cat = np.empty((n_boot, len(cats)))
    for j, v in enumerate(cats):
        for start, stop in _boot_chunks(v.size, n_boot):
            per_cat[start:stop, j] = v[rng.integers(0, v.size, size=(stop - start, v.size))].mean(axis=1)
    lo, hi = np.quantile(per_cat.mean(axis=1), [0.025, 0.975])
    return {"mean": float(np.mean([v.mean() for v in cats])), "ci95": [float(lo), float(hi)],
            "n": int(sum(v.size for v in cats))}


def _table(results: list[dict], metric_names: list[str], n_boot: int, seed: int,
           mean_of: dict[str, list[str]] | None = None, over_categories: frozenset = frozenset()) -> dict:
    mean_of = mean_of or {}
    out = {}
    for name in metric_names:
        if name in mean_of:
            continue
        values, states, by_cat = [], Counter(), defaultdict(list)
        for r in results:
            m = r["metrics"][name]
            states[m["state"]] += 1
            if m["state"] == "ok":
                values.append(m["value"])
                by_cat[r["category"]].append(m["value"])
        row = (mean_over_categories(by_cat, n_boot=n_boot, seed=seed) if name in over_categories
               else aggregate(values, n_boot=n_boot, seed=seed))
        if name in over_categories:
            row["aggregate"] = "mean_over_categories"
        row["states"] = {s: states.get(s, 0) for s in METRIC_STATES}
        unknown = set(states) - set(METRIC_STATES)
        if unknown:
            raise ValueError(f"metric {name!r}: unknown state(s) {sorted(unknown)} in results")
        out[name] = row
    for name, parts in mean_of.items():
        x = np.array([[r["metrics"][p]["value"] if r["metrics"][p]["state"] == "ok" else np.nan for p in parts]
                      for r in results], dtype=np.float64).reshape(len(results), len(parts))
        row = mean_of_means(x, n_boot=n_boot, seed=seed)
        row["aggregate"] = {"mean_of": list(parts)}
        row["states"] = {s: 0 for s in METRIC_STATES}
        out[name] = row
    return {name: out[name] for name in metric_names}


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


def summarize(results: list[dict], metric_names: list[str], n_boot: int = N_BOOT, seed: int = SEED,
              mean_of: dict[str, list[str]] | None = None, over_categories=frozenset()) -> dict:
    """Overall and per-category tables for these result lines (see harness for their shape).

    ``mean_of``: metric -> its components (summary-level mean of their means; absent from the
    lines). ``over_categories``: metrics whose overall value is the mean of the category means."""
    by_cat = defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(r)
    over_categories = frozenset(over_categories)
    return {
        "n_items": len(results),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95, "method": "percentile"},
        "metrics": _table(results, metric_names, n_boot, seed, mean_of, over_categories),
        "categories": {c: {"n_items": len(rs), "metrics": _table(rs, metric_names, n_boot, seed, mean_of)}
                       for c, rs in sorted(by_cat.items())},
        "judge_requests": judge_request_states(results),
    }
