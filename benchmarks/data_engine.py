"""Data engine throughput (issue 6).

1. Non-LLM stages, one core: pages/s of extract -> page filter -> fetch -> image rules -> dedup ->
   clean-up -> reorder -> template dialogue over how-to fixture pages whose images come from a
   local HTTP site (in another process, pinned to another core when there is one, so its CPU is
   not counted). Also the per-stage share of the time.
2. LLM stage: the caption stage (one MLLM request per image) against the local fake OpenAI
   server with 200 ms injected latency, at client concurrency 1, 8 and 32, printed as the ratio
   to the ideal rate concurrency / latency (the target is >= 0.8 up to 32).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_engine.py [--pages 60] [--latency 0.2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures" / "engine"))


def _serve_site(q):
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[1]})
    from howto_site import Site

    site = Site().start()
    q.put(site.url)
    while True:
        time.sleep(3600)


def _serve_llm(q, latency):
    from duetgen.llm.testing import FakeOpenAIServer

    reply = json.dumps({"caption": "A step photo.", "category": "natural_photo", "relevant": True})
    server = FakeOpenAIServer(lambda body: reply, latency_s=latency).start()
    q.put(server.url)
    while True:
        time.sleep(3600)


def bench_rules(n_pages: int) -> None:
    from howto_site import PAGES_DIR

    from duetgen.data.engine import EngineConfig
    from duetgen.data.engine.fetch import FetchConfig
    from duetgen.data.engine.runner import ShardSpec, read_shard
    from duetgen.data.engine.stages import build_stages, run_stages

    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_serve_site, args=(q,), daemon=True)
    proc.start()
    url = q.get(timeout=60)
    try:
        names = ["bathe-a-cat.html", "repot-a-plant.html", "creme-brulee-cp1252.html"]
        with tempfile.TemporaryDirectory() as tmp:
            inp = Path(tmp) / "pages.jsonl"
            with open(inp, "w") as f:
                for i in range(n_pages):
                    name = names[i % len(names)]
                    html = (PAGES_DIR / name).read_bytes().decode("cp1252" if "cp1252" in name else "utf-8")
                    f.write(json.dumps({"url": f"{url}/pages/{name}?copy={i}", "html": html}) + "\n")
            cfg = EngineConfig(fetch=FetchConfig(allow_networks=("127.0.0.0/8",)), shard_pages=n_pages)
            spec = ShardSpec(0, "jsonl", str(inp), 0, 1, n_pages)
            stages = build_stages(cfg)
            # time spent inside each stage's own code: wrap every stage generator
            spent = {s.name: 0.0 for s in stages}

            def timed(stage):
                def run(docs, stats):
                    it = stage(docs, stats)
                    while True:
                        t0 = time.perf_counter()
                        try:
                            d = next(it)
                        except StopIteration:
                            spent[stage.name] += time.perf_counter() - t0
                            return
                        spent[stage.name] += time.perf_counter() - t0
                        yield d
                run.name = stage.name
                return run

            wrapped = [timed(s) for s in stages]
            t0 = time.perf_counter()
            docs, stats = run_stages(wrapped, read_shard(spec, cfg))
            out = sum(1 for _ in docs)
            wall = time.perf_counter() - t0
        # nested generators: a stage's time includes the stages upstream of it; subtract to get its own
        names_in_order = [s.name for s in stages]
        own = {n: spent[n] - (spent[names_in_order[i - 1]] if i else 0.0) for i, n in enumerate(names_in_order)}
        print(f"non-LLM stages, 1 core: {n_pages} pages in {wall:.2f} s = {n_pages / wall:.1f} pages/s "
              f"({out} records, {stats[2].images_in} images fetched)")
        for n in names_in_order:
            print(f"  {n:15s} {own[n]:6.2f} s  {100 * own[n] / wall:5.1f} %")
    finally:
        proc.kill()


def bench_llm(latency: float, concurrencies=(1, 8, 32)) -> None:
    import io

    from howto_site import photo
    from PIL import Image

    from duetgen.data.engine.document import Doc, ImageItem, StageStats, TextItem
    from duetgen.data.engine.stages import CaptionImages
    from duetgen.llm import LLMClient

    # The server runs in its own process, as a vLLM server would: in-process, its handler threads
    # and the client's event loop would share one GIL and the measurement would be of that.
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve_llm, args=(q, latency), daemon=True)
    proc.start()
    url = q.get(timeout=60)
    try:
        for c in concurrencies:
            n_requests = max(16, 8 * c)
            docs = []
            for p in range(n_requests // 8):
                items = []
                for k in range(8):
                    data = photo(100 + (p * 8 + k) % 40)
                    items += [TextItem(f"Step {k} text of page {p}."),
                              ImageItem(f"img{k}.jpg", data=data, image=Image.open(io.BytesIO(data)).convert("RGB"))]
                docs.append(Doc(id=f"p{p}", url=None, title=f"Page {p}", items=items))
            client = LLMClient(url, "fake", max_concurrency=c)  # no cache: every request goes out
            client.chat([{"role": "user", "content": "warm-up"}])  # imports and the first connection, paid once per process
            stage = CaptionImages(client, batch_pages=max(1, (4 * c) // 8))
            stats = StageStats(stage.name)
            t0 = time.perf_counter()
            list(stage(iter(docs), stats))
            wall = time.perf_counter() - t0
            client.close()
            assert stats.llm["requests"] == n_requests and stats.llm["errors"] == 0
            rate, ideal = n_requests / wall, c / latency
            print(f"LLM caption stage, concurrency {c:2d}: {n_requests} requests in {wall:.2f} s = {rate:6.1f} req/s; "
                  f"ideal {ideal:6.1f} req/s; ratio {rate / ideal:.2f}")
    finally:
        proc.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--latency", type=float, default=0.2)
    args = ap.parse_args()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if cores:
        os.sched_setaffinity(0, {min(cores)})  # "on one core"
    bench_rules(args.pages)
    if cores:
        os.sched_setaffinity(0, cores)  # the LLM stage is I/O bound; the fake server shares this process
    bench_llm(args.latency)


if __name__ == "__main__":
    main()
