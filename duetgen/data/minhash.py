"""MinHash + LSH near-duplicate search, one implementation for the data engine's cross-page dedup
(``data/engine/neardup.py``) and the synthetic query pool's (``data/synthetic/dedup.py``).

    hasher = MinHasher(num_perm=128, seed=0)
    index = GreedyIndex(num_perm=128, bands=16)
    m = hasher(word_shingles(text))                      # a datasketch MinHash
    near = index.first_near(m, lambda key, estimate: estimate >= 0.8)
    if near is None:
        index.add(m)                                     # kept; its key is its position among the kept

Design choices:
- ``datasketch`` (``MinHash``, ``MinHashLSH``): measured faster than our own numpy MinHash on the same pages
  (docs/decisions.md, "Near-duplicate MinHash/LSH is datasketch"). Its affine32 scheme over 32-bit shingle
  hashes is stable across processes and machines, so a signature computed in a worker means the same in the
  driver (``MinHasher.lean`` rebuilds it from its hash values). One permutation table per hasher, drawn once.
- Shingles are hashed with xxHash's xxh32 (datasketch's ``hashfunc`` option), not its SHA-1 default: signatures
  1.4-2.0x faster in ``benchmarks/data_engine.py --only minhash`` (session 14, docs/decisions.md). Signatures made with
  one hash do not mix with another's: the engine's config names it (a run sketched before refuses to resume).
- Greedy and order-preserving: the caller visits items in its own order and keeps an item unless it is near
  one kept before it; ``first_near`` tries the LSH's candidates earliest kept first and returns the first the
  caller's test accepts, so the decision is deterministic and names the earliest kept near item.
- What "near" means is the caller's: pages decide on the MinHash estimate (their shingles stay in the
  workers), queries check candidates with the exact Jaccard of their shingles (short texts, no false
  positives). Their shingles differ too: word 5-grams for pages (datatrove's and Gopher's default),
  character 5-grams of normalised text for one-line queries.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.hashfunc import sha1_hash32

SCHEME = "affine32"  # datasketch's default since 2.0; hash values are uint32
SHINGLE_HASHES = {"xxh32": xxhash.xxh32_intdigest, "sha1": sha1_hash32}  # (sha1: datasketch's default, before)

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_PUNCT_RE = re.compile(r"[^\w\s]", re.UNICODE)
_WS_RE = re.compile(r"\s+")


def word_shingles(text: str, k: int = 5) -> set[str]:
    """The distinct word ``k``-grams of ``text`` (lowercased ``\\w+`` words); a shorter text is one shingle."""
    words = _WORD_RE.findall(text.lower())
    return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def normalize(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed."""
    return _WS_RE.sub(" ", _PUNCT_RE.sub(" ", text.lower())).strip()


def char_shingles(text: str, k: int = 5) -> set[str]:
    """The distinct character ``k``-grams of the normalised text; a shorter text is one shingle."""
    t = normalize(text)
    if len(t) <= k:
        return {t}
    return {t[i:i + k] for i in range(len(t) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """Exact Jaccard similarity of two shingle sets (two empty sets: 1)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class MinHasher:
    """MinHash signatures of shingle sets, all with one permutation table."""

    def __init__(self, num_perm: int = 128, seed: int = 0, shingle_hash: str = "xxh32"):
        if shingle_hash not in SHINGLE_HASHES:
            raise ValueError(f"shingle_hash {shingle_hash!r}: one of {', '.join(SHINGLE_HASHES)}")
        self.num_perm, self.seed, self._hashfunc = num_perm, seed, SHINGLE_HASHES[shingle_hash]
        self._permutations = MinHash(num_perm, seed=seed, scheme=SCHEME).permutations  # drawn once

    def __call__(self, shingles: set[str]) -> MinHash:
        m = MinHash(self.num_perm, seed=self.seed, permutations=self._permutations, scheme=SCHEME,
                    hashfunc=self._hashfunc)
        m.update_batch([s.encode() for s in shingles])
        return m

    def lean(self, hashvalues: np.ndarray) -> LeanMinHash:
        """A signature from its (P,) uint32 hash values (e.g. computed in another process)."""
        return LeanMinHash(seed=self.seed, hashvalues=hashvalues, scheme=SCHEME)


class GreedyIndex:
    """The kept items' signatures in an LSH index (``bands`` x ``num_perm / bands`` rows); keys are kept order."""

    def __init__(self, num_perm: int = 128, bands: int = 16):
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        self._lsh = MinHashLSH(num_perm=num_perm, params=(bands, num_perm // bands))
        self._minhashes: list[MinHash | LeanMinHash] = []

    def first_near(self, m: MinHash | LeanMinHash,
                   is_near: Callable[[int, float], bool]) -> tuple[int, float] | None:
        """(key, estimated Jaccard) of the earliest kept item that the LSH proposes and ``is_near(key, estimate)``
        accepts, or None."""
        for key in sorted(self._lsh.query(m)):
            estimate = m.jaccard(self._minhashes[key])
            if is_near(key, estimate):
                return key, estimate
        return None

    def add(self, m: MinHash | LeanMinHash) -> int:
        """Keep ``m``; its key."""
        key = len(self._minhashes)
        self._lsh.insert(key, m, check_duplication=False)
        self._minhashes.append(m)
        return key

    def __len__(self) -> int:
        return len(self._minhashes)
