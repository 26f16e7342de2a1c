"""Near-duplicate removal for short texts: character shingles, MinHash, LSH, exact Jaccard check.

Used on the expanded query pool (paper section 3.1: 1,500 seeds -> 15,270 diverse instructions),
where an LLM asked for "more questions" often returns rewordings of ones it already gave.

Design choices:
- Texts are normalised (lowercase, punctuation dropped, whitespace collapsed) and cut into
  character 5-gram shingles: robust to word order tweaks and small rewordings, no tokenizer.
- MinHash and the LSH index are the data engine's own (``duetgen.data.minhash``: datasketch, one
  permutation table per index, reused for every text); only the shingles and the decision differ.
- LSH banding (bands x rows = num_perm) only proposes candidate pairs; the default 32 x 4 puts
  the LSH threshold near Jaccard 0.42, well below the 0.6 decision threshold, so recall is
  high. Candidates whose MinHash estimate is more than ``prefilter_margin`` under the threshold
  (3.5 standard deviations at 128 permutations) are skipped; the rest are checked with the
  *exact* shingle Jaccard: no false positives.
- Greedy and order-preserving: a text is dropped if it is near a text *kept* earlier, so seeds
  (listed first) always survive and the result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasketch import MinHash

from duetgen.data.minhash import GreedyIndex, MinHasher, char_shingles, jaccard, normalize

__all__ = ["NearDupConfig", "NearDupIndex", "dedup", "jaccard", "normalize", "shingles"]


def shingles(text: str, k: int = 5) -> set[str]:
    """Character ``k``-grams of the normalised text (``duetgen.data.minhash.char_shingles``)."""
    return char_shingles(text, k)


@dataclass
class NearDupConfig:
    threshold: float = 0.6  # exact shingle Jaccard at or above which two texts are near-duplicates
    shingle_k: int = 5  # characters per shingle
    num_perm: int = 128  # MinHash signature length
    bands: int = 32  # LSH bands; rows per band = num_perm // bands
    seed: int = 0  # MinHash permutation seed (changes candidates, never the exact decision)
    prefilter_margin: float = 0.15  # skip exact checks of candidates estimated this far below threshold


class NearDupIndex:
    """Incremental index: ``add(text)`` returns the index of an earlier near-duplicate or None."""

    def __init__(self, cfg: NearDupConfig | None = None):
        self.cfg = cfg = cfg or NearDupConfig()
        self._index = GreedyIndex(cfg.num_perm, cfg.bands)
        self._hasher = MinHasher(cfg.num_perm, cfg.seed)
        self._shingles: list[set[str]] = []

    def signature(self, sh: set[str]) -> MinHash:
        return self._hasher(sh)

    def query(self, text: str) -> tuple[int | None, set[str], MinHash]:
        cfg = self.cfg
        sh = shingles(text, cfg.shingle_k)
        m = self._hasher(sh)
        near = self._index.first_near(  # an estimate too far below the threshold is not worth the exact check
            m, lambda key, estimate: (estimate >= cfg.threshold - cfg.prefilter_margin
                                      and jaccard(sh, self._shingles[key]) >= cfg.threshold))
        return (None if near is None else near[0]), sh, m

    def add(self, text: str) -> int | None:
        """Insert ``text`` unless it is a near-duplicate; return the earlier index it duplicates."""
        dup, sh, m = self.query(text)
        if dup is not None:
            return dup
        self._index.add(m)
        self._shingles.append(sh)
        return None

    def __len__(self) -> int:
        return len(self._shingles)


def dedup(texts: list[str], cfg: NearDupConfig | None = None) -> tuple[list[int], dict[int, int]]:
    """(indices kept, {dropped index: index of the kept text it duplicates}), in input order."""
    index = NearDupIndex(cfg)
    kept: list[int] = []
    dropped: dict[int, int] = {}
    for i, t in enumerate(texts):
        dup = index.add(t)
        if dup is None:
            kept.append(i)
        else:
            dropped[i] = kept[dup]
    return kept, dropped
