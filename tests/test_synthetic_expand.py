"""Query-pool expansion (paper section 3.1): LLM rounds, near-duplicate removal, balance.

The LLM is a local OpenAI-compatible server (duetgen.llm.testing) over real HTTP. Its answers are
made of random pseudo-words seeded by (subcategory, request seed), so distinct answers are truly
distinct; each answer also carries a reworded seed question (a near-duplicate), a too-short
question and a repeat, and the "Laundry" subcategory answers its first round with repeats only.
"""

import json
import random
import re
import string

import pytest
from typer.testing import CliRunner

from duetgen.cli import app
from duetgen.data.synthetic.dedup import NearDupConfig, dedup, jaccard, shingles
from duetgen.data.synthetic.expand import ExpandConfig, expand_queries
from duetgen.data.synthetic.runlog import RunReport
from duetgen.data.synthetic.taxonomy import load_taxonomy
from duetgen.llm.client import LLMClient
from duetgen.llm.testing import FakeOpenAIServer

TINY = {"name": "tiny", "version": "1", "domains": [
    {"id": "home", "name": "Home & Living", "subcategories": [
        {"id": "cleaning", "name": "Cleaning", "seeds": ["How do I clean the inside of a microwave?"]},
        {"id": "laundry", "name": "Laundry", "seeds": ["How do I get grass stains out of jeans?"]}]},
    {"id": "pets", "name": "Pets & Animal Care", "subcategories": [
        {"id": "dogs", "name": "Dog care", "seeds": ["How do I trim my dog's nails?"]}]}]}


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(n))


def make_responder():
    calls: dict[str, int] = {}

    def responder(body):
        user = body["messages"][-1]["content"]
        user = user if isinstance(user, str) else " ".join(p["text"] for p in user if p["type"] == "text")
        sub = re.search(r"Subcategory: (.+)\n", user).group(1)
        n = int(re.search(r"Write (\d+) new questions", user).group(1))
        calls[sub] = calls.get(sub, 0) + 1
        rng = random.Random(f"{sub}/{body['seed']}")
        if sub == "Laundry" and calls[sub] <= 2:  # its whole first round: one new question, then repeats
            q = "How do I " + words(random.Random("laundry-fixed"), 5) + "?"
            return json.dumps({"questions": [q] * n})
        qs = ["How do I " + words(rng, 5) + "?" for _ in range(n)]
        qs.append("How do I clean the inside of my microwave oven?")  # near-duplicate of a seed
        qs.append("Hi?")  # too short
        qs.append(qs[0])  # exact repeat
        return json.dumps({"questions": qs})

    return responder


@pytest.fixture()
def tiny_taxonomy(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY))
    return load_taxonomy(p)


def test_dedup_matches_brute_force_exact_jaccard():
    rng = random.Random(0)
    base = ["how do I " + words(rng, 6) for _ in range(120)]
    texts = []
    for t in base:
        texts.append(t)
        if rng.random() < 0.4:  # a light rewording: one character changed in one word
            i = rng.randrange(9, len(t))
            texts.append(t[:i] + rng.choice(string.ascii_lowercase) + t[i + 1:])
    rng.shuffle(texts)
    cfg = NearDupConfig(threshold=0.6)
    kept, dropped = dedup(texts, cfg)
    # brute force greedy with the exact measure gives the same decision for every text
    sh = [shingles(t) for t in texts]
    bf_kept = []
    for i in range(len(texts)):
        if not any(jaccard(sh[i], sh[j]) >= 0.6 for j in bf_kept):
            bf_kept.append(i)
    assert kept == bf_kept
    assert len(dropped) > 20
    for i, j in dropped.items():
        assert j < i and jaccard(sh[i], sh[j]) >= 0.6


def test_near_duplicate_rewording_is_caught_distinct_questions_are_kept():
    texts = ["How do I clean the inside of a microwave?", "How do I clean the inside of my microwave oven?",
             "How do I repot a root-bound houseplant?", "how do i clean the INSIDE of a microwave!!"]
    kept, dropped = dedup(texts)
    assert kept == [0, 2] and dropped == {1: 0, 3: 0}


def test_expand_balances_dedups_and_shows_siblings(tiny_taxonomy):
    srv = FakeOpenAIServer(responder=make_responder()).start()
    try:
        client = LLMClient(srv.url, "fake-llm")
        report = RunReport("expand")
        cfg = ExpandConfig(per_subcategory=6, batch_size=4, max_rounds=3)
        pool = expand_queries(tiny_taxonomy, client, cfg, report, progress=False)
    finally:
        srv.stop()
    by_sub = {}
    for q in pool:
        by_sub.setdefault(q["subcategory"], []).append(q)
    assert {k: len(v) for k, v in by_sub.items()} == {"cleaning": 6, "laundry": 6, "dogs": 6}
    assert by_sub["cleaning"][0] == {"id": "cleaning-0000", "prompt": "How do I clean the inside of a microwave?",
                                     "kind": "howto", "domain": "home", "subcategory": "cleaning", "origin": "seed"}
    texts = [q["prompt"] for q in pool]
    kept, dropped = dedup(texts)
    assert dropped == {}  # nothing near-duplicate survived
    reasons = report.skip_reasons
    assert reasons["near_duplicate"] >= 3 and reasons["too_short"] >= 3
    assert report.extra["balance"]["short_of_target"] == {}
    # the prompt shows the domain and the sibling subcategories (and not the subcategory itself)
    cleaning_prompts = [b for b in srv.bodies if "Subcategory: Cleaning" in json.dumps(b)]
    user = cleaning_prompts[0]["messages"][-1]["content"]
    assert "Domain: Home & Living" in user and "(do NOT write questions that belong to them): Laundry" in user
    # Laundry needed a second round (round 0: ceil(5/4) = 2 calls gave 1 new question; round 1: one
    # call for the 4 missing); Cleaning was full after round 0
    calls = lambda name: sum(f"Subcategory: {name}" in json.dumps(b) for b in srv.bodies)  # noqa: E731
    assert calls("Laundry") == 3 and calls("Cleaning") == 2
    assert len({b["seed"] for b in srv.bodies}) == len(srv.bodies)  # every request has its own seed


def test_shortfall_is_reported_not_padded(tiny_taxonomy):
    srv = FakeOpenAIServer(responder=lambda body: json.dumps({"questions": ["Hi?"]})).start()
    try:
        report = RunReport("expand")
        pool = expand_queries(tiny_taxonomy, LLMClient(srv.url, "m"), ExpandConfig(per_subcategory=5, max_rounds=2),
                              report, progress=False)
    finally:
        srv.stop()
    assert len(pool) == 3  # the seeds only
    assert report.extra["balance"]["short_of_target"] == {"cleaning": 1, "laundry": 1, "dogs": 1}


def test_llm_failures_are_reported_and_rerun_is_free_with_cache(tiny_taxonomy, tmp_path):
    srv = FakeOpenAIServer(responder=make_responder()).start()
    try:
        cfg = ExpandConfig(per_subcategory=4, batch_size=4, max_rounds=1)
        srv.inject("400")  # one request fails for good (4xx is not retried)
        c1 = LLMClient(srv.url, "m", cache_path=tmp_path / "cache.sqlite")
        r1 = RunReport("expand")
        expand_queries(tiny_taxonomy, c1, cfg, r1, progress=False)
        assert r1.skip_reasons["llm_api_error"] == 1
        c1.close()
        c2 = LLMClient(srv.url, "m", cache_path=tmp_path / "cache.sqlite")
        p2 = expand_queries(tiny_taxonomy, c2, cfg, RunReport("expand"), progress=False)
        n = srv.requests
        c2.close()
        c3 = LLMClient(srv.url, "m", cache_path=tmp_path / "cache.sqlite")
        p3 = expand_queries(tiny_taxonomy, c3, cfg, RunReport("expand"), progress=False)
        assert srv.requests == n  # all from the cache
        assert p2 == p3
        c3.close()
    finally:
        srv.stop()


def test_cli_expand(tmp_path):
    runner = CliRunner()
    out = tmp_path / "seeds.jsonl"
    res = runner.invoke(app, ["data", "expand", "--out", str(out), "--seeds-only"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 453 and len({l["subcategory"] for l in lines}) == 151

    (tmp_path / "tiny.json").write_text(json.dumps(TINY))

    def expand_tiny(out: str, *faults: str):
        srv = FakeOpenAIServer(responder=make_responder()).start()
        srv.inject(*faults)
        try:
            return runner.invoke(app, ["data", "expand", "--out", str(tmp_path / out), "--taxonomy",
                                       str(tmp_path / "tiny.json"), "--llm-url", srv.url, "--llm-model", "m",
                                       "--per-subcategory", "5", "--batch-size", "4"])
        finally:
            srv.stop()

    res = expand_tiny("pool.jsonl")
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "pool.jsonl").read_text().splitlines()) == 15
    assert list((tmp_path / "reports").glob("expand-*.json"))
    res = runner.invoke(app, ["data", "expand", "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "--llm-url" in res.output
    # every LLM request fails: said on the terminal and in the exit code (it printed "wrote N queries", exit 0)
    res = expand_tiny("failed.jsonl", *["400"] * 500)
    assert res.exit_code == 2 and "every LLM request failed" in res.output, res.output
    assert " LLM requests failed (" in res.output and "short of 5 queries" in res.output
    (tmp_path / "bad.json").write_text("[]")
    res = runner.invoke(app, ["data", "taxonomy", "--file", str(tmp_path / "bad.json")])
    assert res.exit_code == 2 and "bad.json" in res.output
