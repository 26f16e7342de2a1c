"""The one MinHash + LSH module (duetgen.data.minhash) that both near-duplicate filters use."""

import random

import numpy as np
import pytest

from duetgen.data.engine import neardup
from duetgen.data.minhash import GreedyIndex, MinHasher, char_shingles, jaccard, word_shingles
from duetgen.data.synthetic import dedup


def test_both_filters_run_on_the_shared_code(monkeypatch):
    """The page dedup and the query-pool dedup both build their signatures and indexes here: count the calls."""
    made = {"hasher": 0, "index": 0}

    class CountingHasher(MinHasher):
        def __init__(self, *a, **k):
            made["hasher"] += 1
            super().__init__(*a, **k)

    class CountingIndex(GreedyIndex):
        def __init__(self, *a, **k):
            made["index"] += 1
            super().__init__(*a, **k)

    for module in (neardup, dedup):
        monkeypatch.setattr(module, "MinHasher", CountingHasher)
        monkeypatch.setattr(module, "GreedyIndex", CountingIndex)
    dedup.dedup(["how do I fold a paper crane?", "how do i fold a paper crane"])
    assert made == {"hasher": 1, "index": 1}
    sketcher = neardup.PageSketcher(neardup.NearDupPageConfig())
    page = " ".join(f"word{i}" for i in range(40))
    sketches = [neardup.Sketch(0, pos, f"id{pos}", None, "", 0, sketcher(page)) for pos in range(2)]
    drops, _ = neardup.decide(sketches, neardup.NearDupPageConfig())
    assert made == {"hasher": 3, "index": 2}
    assert drops == {(0, 1): "near_duplicate_page"}


def test_signatures_are_stable_and_rebuild_from_their_hash_values():
    """A worker's signature means the same in the driver: same permutations from the seed, lean copy equal."""
    shingles = word_shingles("the quick brown fox jumps over the lazy dog again and again")
    a, b = MinHasher(64, seed=3)(shingles), MinHasher(64, seed=3)(shingles)
    assert np.array_equal(a.hashvalues, b.hashvalues) and a.hashvalues.dtype == np.uint32
    lean = MinHasher(64, seed=3).lean(a.hashvalues.copy())
    assert lean.jaccard(a) == 1.0
    assert not np.array_equal(MinHasher(64, seed=4)(shingles).hashvalues, a.hashvalues)


def test_first_near_returns_the_earliest_kept_item_the_test_accepts():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    base = [rng.choice(words) for _ in range(120)]
    hasher, index = MinHasher(128), GreedyIndex(128, bands=16)
    for _ in range(3):  # three kept copies of one text: keys 0, 1, 2
        index.add(hasher(word_shingles(" ".join(base))))
    query = hasher(word_shingles(" ".join(base)))
    assert index.first_near(query, lambda key, estimate: estimate >= 0.9) == (0, 1.0)
    assert index.first_near(query, lambda key, estimate: key >= 2) == (2, 1.0)  # the caller decides what is near
    other = hasher(word_shingles(" ".join(rng.choice(words) for _ in range(120))))
    assert index.first_near(other, lambda key, estimate: estimate >= 0.5) is None
    assert len(index) == 3


def test_bands_must_divide_the_permutations():
    with pytest.raises(ValueError, match=r"num_perm \(128\) must be a multiple of bands \(30\)"):
        GreedyIndex(128, bands=30)


def test_shingles_and_exact_jaccard():
    assert word_shingles("One two") == {"one two"}  # shorter than k: one shingle
    assert word_shingles("a b c d e f", k=5) == {"a b c d e", "b c d e f"}
    assert char_shingles("Hi!") == {"hi"}
    assert char_shingles("Hello, World") == {"hello", "ello ", "llo w", "lo wo", "o wor", " worl", "world"}
    assert jaccard(set(), set()) == 1.0
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
