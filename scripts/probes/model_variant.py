"""A DuetGen directory that differs from another only in duetgen.json settings (weights symlinked).

    python scripts/probes/model_variant.py SRC DST sampler.shift=3.0 guidance_scale_without_frames=null

Used for the inference-only rows of docs/training.md ("What session 5 measured"): then `duetgen train eval-toy --model DST`.
"""
import json, sys, os
from pathlib import Path
src, dst = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for p in src.iterdir():
    if p.name != "duetgen.json" and not (dst / p.name).exists():
        os.symlink(p, dst / p.name)
cfg = json.loads((src / "duetgen.json").read_text())
for kv in sys.argv[3:]:
    k, v = kv.split("=")
    d = cfg["settings"]
    *path, last = k.split(".")
    for q in path: d = d[q]
    d[last] = json.loads(v)
(dst / "duetgen.json").write_text(json.dumps(cfg, indent=2))
