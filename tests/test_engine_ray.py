"""Data engine on a local Ray: the same records, in the same order, as the local executor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "engine"))
from howto_site import PAGES_DIR, Site  # noqa: E402

from duetgen.data.engine import EngineConfig, LocalExecutor, RayExecutor, run_engine  # noqa: E402
from duetgen.data.engine.fetch import FetchConfig  # noqa: E402
from duetgen.data.dataset import Dataset  # noqa: E402


@pytest.mark.slow
def test_ray_executor_writes_the_same_records_as_local(tmp_path):
    with Site() as site:
        inp = tmp_path / "pages.jsonl"
        inp.write_text("".join(json.dumps({"url": site.page_url(n), "html": (PAGES_DIR / n).read_text()}) + "\n"
                               for n in ("bathe-a-cat.html", "repot-a-plant.html", "text-only.html")))
        cfg = EngineConfig(fetch=FetchConfig(allow_networks=("127.0.0.0/8",)), shard_pages=1)
        local = run_engine(inp, tmp_path / "local", cfg, LocalExecutor(1), progress=False)
        try:
            distributed = run_engine(inp, tmp_path / "ray", cfg, RayExecutor(None, workers=2), progress=False)
        finally:
            ray.shutdown()
    a = [r.to_json() for r in Dataset(tmp_path / "local")]
    b = [r.to_json() for r in Dataset(tmp_path / "ray")]
    assert a == b and len(a) == 2
    assert local["stages"] == distributed["stages"]
