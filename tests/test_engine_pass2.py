"""Data engine: pass 2 builds from the pages pass 1 stored in its sketch files, not from the input."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "engine"))
from howto_site import PAGES_DIR, Site  # noqa: E402

from duetgen.data.engine import EngineConfig, EngineError, run_engine  # noqa: E402
from duetgen.data.engine import runner  # noqa: E402
from duetgen.data.engine.fetch import FetchConfig  # noqa: E402
from duetgen.data.dataset import Dataset  # noqa: E402


def config() -> EngineConfig:
    return EngineConfig(fetch=FetchConfig(allow_networks=("127.0.0.0/8",), timeout_s=2.0), shard_pages=2)


@pytest.fixture(scope="module")
def site():
    with Site() as s:
        yield s


def write_jsonl(path: Path, site: Site) -> Path:
    with open(path, "w") as f:
        for p in sorted(PAGES_DIR.glob("*.html")):
            if "cp1252" not in p.name:
                f.write(json.dumps({"url": site.page_url(p.name), "html": p.read_text()}) + "\n")
    return path


def pass1(inp: Path, out: Path, cfg: EngineConfig):
    work = out / runner.ENGINE_DIR
    for sub in ("sketch", "done"):
        (work / sub).mkdir(parents=True)
    shards = runner.plan_shards(inp, cfg.shard_pages)
    for s in shards:
        runner.sketch_shard((s, cfg, str(work)))
    return work, shards, runner._decide(work, shards, cfg)


def lines(out: Path) -> list[str]:
    return sorted(r.to_jsonl_line() for r in Dataset(out))


def test_pass2_builds_the_same_records_with_the_input_gone(site, tmp_path):
    inp = write_jsonl(tmp_path / "pages.jsonl", site)
    run_engine(inp, tmp_path / "whole", config(), progress=False)

    cfg, out = config(), tmp_path / "split"
    work, shards, keep = pass1(inp, out, cfg)
    inp.write_text("")  # pass 2 must not need the input: the pages come from the sketch files
    for s in shards:
        runner.build_shard((s, cfg, keep(s.index), str(out)))
    runner._publish(out, work, shards, {s.index for s in shards})
    got = lines(out)
    assert len(got) == 3
    assert got == lines(tmp_path / "whole")  # same text, images (content addressed) and meta


def test_a_sketch_without_pages_is_refused_by_name(site, tmp_path):
    inp = write_jsonl(tmp_path / "pages.jsonl", site)
    cfg, out = config(), tmp_path / "ds"
    work, shards, keep = pass1(inp, out, cfg)
    path = work / "sketch" / "shard-00000.npz"
    with np.load(path) as z:  # as an engine before this change wrote it
        old = {k: z[k] for k in z.files if k != "pages"}
    buf = io.BytesIO()
    np.savez(buf, **old)
    path.write_bytes(buf.getvalue())
    with pytest.raises(EngineError, match="shard-00000.npz.*new --out"):
        runner.build_shard((shards[0], cfg, keep(0), str(out)))
