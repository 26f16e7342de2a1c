"""Bootstrap intervals and aggregation: sane intervals, fixed seed, failures counted and never scored."""

import numpy as np
import pytest

from duetgen.eval.metrics import aggregate, bootstrap_ci, judge_request_states, summarize


def test_interval_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = rng.integers(1, 6, size=20).astype(float)
    large = rng.integers(1, 6, size=2000).astype(float)
    for x in (small, large):
        lo, hi = bootstrap_ci(x)
        assert lo <= x.mean() <= hi
        assert 1 <= lo < hi <= 5
    width = lambda x: np.subtract(*bootstrap_ci(x)[::-1])  # noqa: E731
    assert width(large) < width(small) / 5  # ~ 1/sqrt(100) of it


def test_interval_is_reproducible_with_its_seed():
    x = np.random.default_rng(2).normal(size=50)
    assert bootstrap_ci(x, seed=0) == bootstrap_ci(x, seed=0)
    assert bootstrap_ci(x, seed=0) != bootstrap_ci(x, seed=1)


def test_degenerate_inputs():
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    assert bootstrap_ci([4.0] * 30) == (4.0, 4.0)
    assert aggregate([]) == {"mean": None, "ci95": None, "n": 0}
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], level=1.5)


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    hits = 0
    trials = 200
    for t in range(trials):
        x = rng.normal(loc=2.0, scale=1.0, size=60)
        lo, hi = bootstrap_ci(x, n_boot=400, seed=t)
        hits += lo <= 2.0 <= hi
    assert 0.88 <= hits / trials <= 0.99


def _line(cat, **states_values):
    metrics = {}
    for name, v in states_values.items():
        metrics[name] = {"state": "ok", "value": v} if isinstance(v, (int, float)) else {"state": v, "value": None}
    return {"id": f"x{len(metrics)}", "category": cat, "calls": {}, "metrics": metrics}


def test_only_ok_values_enter_the_mean_and_every_other_state_is_counted():
    results = [
        _line("a", A=5.0, B=1.0),
        _line("a", A=3.0, B="refusal"),
        _line("b", A="api_error", B="no_image"),
        _line("b", A="unparsable", B="missing"),
        _line("b", A=1.0, B=2.0),
    ]
    s = summarize(results, ["A", "B"], n_boot=200)
    assert s["metrics"]["A"]["mean"] == pytest.approx(3.0) and s["metrics"]["A"]["n"] == 3
    assert s["metrics"]["A"]["states"] == {"ok": 3, "api_error": 1, "refusal": 0, "unparsable": 1, "no_image": 0,
                                           "missing": 0, "undefined": 0, "not_applicable": 0, "bad_image": 0}
    assert s["metrics"]["B"]["mean"] == pytest.approx(1.5) and s["metrics"]["B"]["n"] == 2
    assert s["metrics"]["B"]["states"]["refusal"] == 1 and s["metrics"]["B"]["states"]["no_image"] == 1
    assert s["categories"]["a"]["metrics"]["A"]["mean"] == pytest.approx(4.0)
    assert s["categories"]["b"]["metrics"]["A"]["n"] == 1 and s["categories"]["b"]["n_items"] == 3
    assert s["bootstrap"]["seed"] == 0


def test_unknown_states_are_refused():
    with pytest.raises(ValueError, match="unknown state"):
        summarize([_line("a", A="weird")], ["A"])


def test_judge_request_states_count_every_sample_including_two_call_protocols():
    unit = lambda *states: {"state": states[0], "samples": [{"state": s} for s in states]}  # noqa: E731
    results = [{"id": "1", "category": "c", "metrics": {}, "calls": {
        "seq": [unit("ok", "ok", "refusal")],
        "irs": {"predict": {"state": "ok"}, "pairs": [unit("unparsable"), unit("ok")]},
        "irs2": {"predict": {"state": "api_error"}, "pairs": []},
    }}]
    assert judge_request_states(results) == {"ok": 4, "api_error": 1, "refusal": 1, "unparsable": 1}
