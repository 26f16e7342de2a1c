"""Weighted mixture of datasets into a stage-2 training manifest (paper sections 3.2 and 4).

Stage 2 trains the connector and DiT on the context-alignment data (video transitions, image
generation and editing sets) *plus* the instruction-tuning data of section 3.1. This module
fixes, once and reproducibly, which records a stage-2 run sees and in what order:

    {"seed": 0, "num_samples": 100000,
     "datasets": [{"name": "video", "path": "data/video", "weight": 4},
                  {"name": "edit", "path": "data/nhr", "weight": 3}, ...]}   --> mix.json

Design choices:
- Weights are relative sampling probabilities (normalised). Draw counts per dataset are
  ``weight_i / sum(weights) * num_samples`` rounded by largest remainder, so they sum to
  ``num_samples`` exactly.
- A dataset drawn more times than it has records is repeated in whole passes, each pass a new
  permutation; the remainder is a without-replacement draw. So no record repeats before every
  record of its dataset was seen (upsampling without clumps).
- Each dataset's draws use its own RNG seeded by (seed, dataset name): adding a dataset to the
  mix changes the others' counts but not which records they draw for a given count. The final
  order is one seeded shuffle of all draws.
- The manifest names records by (dataset, record index) and stores each dataset's record count
  and shard list; ``Mixture`` refuses a dataset that changed since the mix was made.
- Paths are stored relative to the manifest file when possible, so a data folder can move.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duetgen.data.dataset import (MAX_RECORD_LINE_BYTES, Dataset, DatasetError, atomic_write_bytes, dataset_file,
                                  read_record_line)
from duetgen.data.record import Record

MIX_FORMAT = "duetgen-mixture"
MIX_VERSION = 1


@dataclass
class MixSource:
    name: str  # short name used in the manifest and in logs
    path: str  # dataset directory
    weight: float  # relative sampling probability


def parse_mix_config(d: Any, where: str = "<config>", base: Path | None = None) -> tuple[list[MixSource], int | None, int]:
    """(sources, num_samples or None, seed) from a config dict; errors name the config and entry."""
    if not isinstance(d, dict):
        raise DatasetError(f"{where}: a mix config must be a JSON object")
    unknown = set(d) - {"seed", "num_samples", "datasets"}
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {sorted(unknown)}")
    seed = d.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"{where}: 'seed' must be a non-negative integer")
    n = d.get("num_samples")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise DatasetError(f"{where}: 'num_samples' must be a positive integer")
    ds = d.get("datasets")
    if not isinstance(ds, list) or not ds:
        raise DatasetError(f"{where}: 'datasets' must be a non-empty list")
    sources = []
    for i, e in enumerate(ds):
        w = f"{where}: datasets[{i}]"
        if not isinstance(e, dict) or set(e) - {"name", "path", "weight"}:
            raise DatasetError(f"{w} must be an object with name, path, weight")
        if not isinstance(e.get("name"), str) or not e["name"]:
            raise DatasetError(f"{w}.name must be a non-empty string")
        if not isinstance(e.get("path"), str) or not e["path"]:
            raise DatasetError(f"{w}.path must be a non-empty string")
        wt = e.get("weight", 1.0)
        if (not isinstance(wt, (int, float)) or isinstance(wt, bool) or not wt > 0
                or wt > 1e308 or not math.isfinite(wt)):  # (an int past a float's range: a TypeError before)
            raise DatasetError(f"{w}.weight must be a positive number up to 1e308, got {wt!r}")
        path = e["path"] if base is None or os.path.isabs(e["path"]) else str(base / e["path"])
        sources.append(MixSource(e["name"], path, float(wt)))
    return sources, n, seed


MAX_SAMPLES = 50_000_000  # the manifest holds every sample: ~7.8 GB at the build's peak (an audit: 155 B a sample)


def _finite_sum_weights(weights: list[float]) -> np.ndarray:
    """The weights as floats, scaled down by the largest only when their sum overflows (1e308 + 1e308 made every
    share 0; scaling always would move exact ties by an ulp and change results for ordinary weights)."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(over="ignore"):
        return w if np.isfinite(w.sum()) else w / w.max()


def allocate(weights: list[float], total: int) -> list[int]:
    """Largest-remainder rounding of ``total * w / sum(w)``; the counts sum to ``total``."""
    w = _finite_sum_weights(weights)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")  # ties: earlier dataset first
    counts[order[:rest]] += 1
    return counts.tolist()


def _rng(seed: int, name: str) -> np.random.Generator:
    h = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def draw(num_records: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` record indices: whole permutations, then a without-replacement remainder."""
    passes, rem = divmod(count, num_records)
    chunks = [rng.permutation(num_records) for _ in range(passes)]
    if rem:
        chunks.append(rng.permutation(num_records)[:rem])
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def build_mixture(sources: list[MixSource], num_samples: int | None, seed: int, out_path: str | Path) -> dict:
    """Write the mixture manifest to ``out_path`` and return it."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DatasetError(f"dataset names must be unique, got {names}")
    datasets = []
    for s in sources:
        ds = Dataset(s.path)  # validates the manifest; names the path on error
        if len(ds) == 0:
            raise DatasetError(f"dataset {s.name!r} at {s.path!r} has no records")
        datasets.append(ds)
    out_resolved = Path(os.path.abspath(out_path)).resolve()
    for s, ds in zip(sources, datasets):  # writing there could replace its manifest or a shard
        if out_resolved.is_relative_to(ds.root.resolve()):
            raise DatasetError(f"{str(out_path)!r} lies inside the dataset {s.name!r} ({str(ds.root)!r}); write the "
                               "mixture manifest elsewhere")
    sizes = [len(d) for d in datasets]
    total = num_samples if num_samples is not None else sum(sizes)
    if total > MAX_SAMPLES:
        raise DatasetError(f"{total:,} samples is over the cap of {MAX_SAMPLES:,}: the manifest lists every sample "
                           f"and is built in memory (~155 bytes a sample at its peak); give fewer (--num-samples / "
                           f"'num_samples') or mix in parts")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    counts = allocate([s.weight for s in sources], total)

    parts, src_ids = [], []
    for k, (s, size, c) in enumerate(zip(sources, sizes, counts)):
        idx = draw(size, c, _rng(seed, s.name))
        parts.append(idx)
        src_ids.append(np.full(len(idx), k, dtype=np.int64))
    all_idx = np.concatenate(parts)
    all_src = np.concatenate(src_ids)
    order = np.random.default_rng(seed).permutation(len(all_idx))
    samples = np.stack([all_src[order], all_idx[order]], axis=1).tolist()  # (N, 2)

    out_path = Path(out_path)
    wsum = sum(s.weight for s in sources)
    if np.isfinite(wsum):
        probability = [s.weight / wsum for s in sources]
    else:  # (weights whose sum overflows)
        scaled = _finite_sum_weights([s.weight for s in sources])
        probability = (scaled / scaled.sum()).tolist()
    manifest = {
        "format": MIX_FORMAT, "format_version": MIX_VERSION, "seed": seed, "num_samples": total,
        "sources": [{"name": s.name, "path": _rel(s.path, out_path.parent), "weight": s.weight,
                     "probability": round(prob, 6), "num_records": size, "num_drawn": c,
                     "epochs": round(c / size, 4), "shards": d.manifest["shards"]}
                    for s, prob, size, c, d in zip(sources, probability, sizes, counts, datasets)],
        "samples": samples,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, (json.dumps(manifest, separators=(",", ":")) + "\n").encode())
    return manifest


def _rel(path: str, base: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        return str(Path(path).resolve())


class Mixture:
    """Read a mixture manifest: ``len(m)``, ``m[i] -> (source name, Record)``, ``m.dataset(name)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            m = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # (UTF-8, JSON, a 4,300-digit integer, deep nesting)
            raise DatasetError(f"mixture manifest {str(self.path)!r} is not readable JSON ({e})") from None
        if not isinstance(m, dict) or m.get("format") != MIX_FORMAT or m.get("format_version") != MIX_VERSION:
            raise DatasetError(f"{str(self.path)!r} is not a {MIX_FORMAT} v{MIX_VERSION} manifest")
        self.manifest = m
        self.sources, self.samples = m.get("sources"), m.get("samples")
        if not isinstance(self.sources, list) or not isinstance(self.samples, list):
            raise DatasetError(f"{str(self.path)!r}: a mixture manifest needs 'sources' and 'samples' lists")
        for k, src in enumerate(self.sources):  # (a hand-edited manifest crashed training with a KeyError)
            if not (isinstance(src, dict) and isinstance(src.get("name"), str) and isinstance(src.get("path"), str)
                    and isinstance(src.get("num_records"), int) and not isinstance(src["num_records"], bool)
                    and src["num_records"] >= 0 and isinstance(src.get("shards"), list)):
                raise DatasetError(f"{str(self.path)!r}: sources[{k}] is not a source of `duetgen data mix` "
                                   "(name, path, num_records, shards)")

        self._datasets: dict[int, Dataset] = {}
        self._offsets: dict[tuple[int, int], list[int]] = {}  # (source, shard) -> byte offset of each line

    def __len__(self) -> int:
        return len(self.samples)

    def dataset(self, k: int) -> Dataset:
        if k not in self._datasets:
            src = self.sources[k]
            root = Path(src["path"]) if os.path.isabs(src["path"]) else self.path.parent / src["path"]
            root = root.resolve()  # one spelling per dataset: stage 2's condition cache keys on the root
            ds = Dataset(root)
            if len(ds) != src["num_records"] or ds.manifest["shards"] != src["shards"]:
                raise DatasetError(f"mixture {str(self.path)!r}: dataset {src['name']!r} at {str(root)!r} changed "
                                   f"since the mixture was built ({len(ds)} records now, {src['num_records']} then)")
            self._datasets[k] = ds
        return self._datasets[k]

    def locate(self, k: int, index: int) -> tuple[int, int]:
        """(shard number, line number) of record ``index`` of source ``k``."""
        counts = [s["num_records"] for s in self.sources[k]["shards"]]
        starts = np.cumsum([0] + counts[:-1]).tolist()
        shard = bisect_right(starts, index) - 1
        return shard, index - starts[shard]

    def __getitem__(self, i: int) -> tuple[str, Record]:
        sample = self.samples[i]
        if not (isinstance(sample, list) and len(sample) == 2  # (checked here, not for 50M samples at load)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in sample)
                and sample[0] < len(self.sources) and isinstance(self.sources[sample[0]], dict)
                and sample[1] < self.sources[sample[0]].get("num_records", 0)):
            raise DatasetError(f"{str(self.path)!r}: samples[{i}] = {sample!r} is not [source, record] of its "
                               "sources")  # a hostile [-1, 0] read the last source
        k, index = sample
        ds = self.dataset(k)
        shard, line = self.locate(k, index)
        key = (k, shard)
        path = dataset_file(ds.root, ds.shards[shard])  # inside its root, a regular file (as every reader)
        if key not in self._offsets:
            offs, pos = [], 0
            with open(path, "rb") as f:
                for raw in iter(lambda: f.readline(MAX_RECORD_LINE_BYTES + 2), b""):
                    if not raw.endswith(b"\n") and len(raw) > MAX_RECORD_LINE_BYTES:  # (not split into lines)
                        raise DatasetError(f"{path}:{len(offs) + 1}: a record over the cap of "
                                           f"{MAX_RECORD_LINE_BYTES:,} bytes")
                    offs.append(pos)
                    pos += len(raw)
            if len(offs) != ds.manifest["shards"][shard]["num_records"]:
                raise DatasetError(f"{path}: holds {len(offs)} lines but the manifest says "
                                   f"{ds.manifest['shards'][shard]['num_records']}")
            self._offsets[key] = offs
        with open(path, "rb") as f:
            f.seek(self._offsets[key][line])
            rec = read_record_line(f, f"{path}:{line + 1}")
        if rec is None:  # (the file shrank since its lines were counted)
            raise DatasetError(f"{path}: record {line + 1} is gone")
        return self.sources[k]["name"], rec
