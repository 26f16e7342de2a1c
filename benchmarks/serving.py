"""Serving throughput: `duetgen serve` batching concurrent requests (duetgen.infer.batched) against one at a time.

    nice -n 19 .venv/bin/python benchmarks/serving.py                       # the shipped ShapeWorld checkpoint
    nice -n 19 .venv/bin/python benchmarks/serving.py --concurrency 1 4 16 --requests 16 --threads 1

Two real servers on 127.0.0.1 over the same model weights, taking turns in each round: the one-at-a-time
server (``ServeLimits(max_batch=1)``, the server as it was) and the batched one
(``max_batch = the largest concurrency``). Requests are ShapeWorld test prompts of every kind
(how-to, continuation and editing with a canvas, text-to-image, understanding) sent as OpenAI chat
completions to ``/v1`` with fixed seeds, each from its own client thread. In one run:

1. four requests in a row on the one-at-a-time server against the same four sent at once to the
   batched server (wall time of the four; issue 17's target: >= 2x);
2. answers per second at each ``--concurrency`` (``--requests`` answers, that many client
   threads keep that many requests in flight) on both servers, and their ratio.

3. what batching can save at most on this machine (``step_costs``): one packed DiT call for k answers'
   images (each a ShapeWorld image with one earlier canvas) and one MLLM decode step of k answers, against
   k such calls one at a time. A server that packs every step full cannot beat these per-call ratios, so
   they bound the throughput ratio from above (on one CPU thread the DiT's cost grows with its tokens;
   on a GPU a small step costs about the same for 1 or 4 answers).

The clients run in a process of their own (on another core where there is one), as a load generator
does (vLLM's benchmark_serving, for one): in the server's process their JSON and HTTP work took the
GIL from the server's threads, the batched server's most, since four or sixteen of its clients are
active while it steps. Every batched answer is checked equal in text to the one-at-a-time answer of the
same request. Reported: medians over ``--repeats`` rounds, and each round's ratios, by wall time and by
the server process's CPU time (all its threads; steadier than wall time when another process loads the
machine). ``--device cuda`` runs it all on a GPU.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/live_server.py
from live_server import live_server  # noqa: E402

from duetgen.infer.pipeline import DEFAULT_MODEL_DIR, DuetGenPipeline  # noqa: E402
from duetgen.serve.openai_api import served_model_name  # noqa: E402
from duetgen.serve.common import ServeLimits  # noqa: E402
from duetgen.serve.server import create_app  # noqa: E402
from duetgen.shapeworld import world  # noqa: E402

KINDS = ("how-to", "continuation", "text-to-image", "editing", "understanding")


def shapeworld_requests(n: int, model: str, seed: int = 0) -> list[dict]:
    """``n`` chat-completion bodies: test-split ShapeWorld prompts, kinds in turn, a canvas as a data: URL where the kind has one."""
    bodies = []
    for i in range(n):
        task = world.sample_task(KINDS[i % len(KINDS)], random.Random(seed * 1000 + i), split="test")
        content = [{"type": "text", "text": task.prompt()}]
        if task.has_canvas:
            buf = io.BytesIO()
            world.render(task.initial).save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        bodies.append({"model": model, "seed": i, "messages": [{"role": "user", "content": content}]})
    return bodies


def run_load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[str]]:
    """Send ``bodies`` with ``concurrency`` client threads; (wall seconds, answer texts in request order)."""
    answers: list[str | None] = [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                r = http.post(f"{url}/v1/chat/completions", json=bodies[i])
                if r.status_code != 200:
                    raise RuntimeError(f"request {i}: {r.status_code} {r.text}")
                answers[i] = r.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if any(a is None for a in answers):
        raise RuntimeError("some requests failed (see above)")
    return wall, answers


def _client_process(conn, core: int | None) -> None:
    """The load generator's loop: (url, bodies, concurrency) in, ("ok", run_load's result) or ("error", text) out."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    while (job := conn.recv()) is not None:
        try:
            conn.send(("ok", run_load(*job)))
        except Exception as e:  # noqa: BLE001 - reported in the server's process
            conn.send(("error", f"{type(e).__name__}: {e}"))


class LoadGenerator:
    """``run_load`` in a process of its own, pinned to the last core when there are two or more."""

    def __init__(self):
        cores = sorted(os.sched_getaffinity(0))
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_client_process, args=(child, cores[-1] if len(cores) > 1 else None),
                                    daemon=True)
        self._process.start()

    def run(self, url: str, bodies: list[dict], concurrency: int) -> tuple[tuple[float, float], list[str]]:
        """((wall seconds, the server process's CPU seconds meanwhile), answer texts in request order)."""
        cpu_start = time.process_time()
        self._conn.send((url, bodies, concurrency))
        status, result = self._conn.recv()
        cpu = time.process_time() - cpu_start
        if status != "ok":
            raise RuntimeError(f"load generator: {result}")
        wall, answers = result
        return (wall, cpu), answers

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)


def _time_ms(call, device: str, repeats: int = 30) -> float:
    """Median wall milliseconds of ``call()`` after two warm-up calls (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def step_costs(model, rows=(1, 2, 4), context_tokens: int = 80) -> dict:
    """Milliseconds of one packed DiT call for k images and one MLLM decode step for k answers; their
    "k calls alone / one call of k" ratios (the most batching can save on each kind of step)."""
    device = str(model.device)
    dit = model.dit
    g = torch.Generator().manual_seed(0)
    h, w = (side // model.vae.spatial_factor for side in model.config.image_size)
    canvas, target = (torch.randn(dit.latent_channels, h, w, generator=g).to(model.device) for _ in range(2))
    text = dit.project_text(torch.randn(context_tokens, dit.text_channels, generator=g).to(model.device))
    sample = {"frames": [canvas, target], "timesteps": torch.tensor([0.0, 0.5], device=model.device),
              "condition_mask": torch.tensor([True, False], device=model.device), "text": text}
    mllm = model.mllm
    ids = torch.randint(10, 200, (max(rows), context_tokens), generator=g).to(model.device)
    costs: dict = {"dit_ms": {}, "decode_ms": {}}
    for k in rows:
        packed = {name: [value] * k for name, value in sample.items()}
        costs["dit_ms"][k] = round(_time_ms(lambda: dit(**packed, targets_only=True), device), 2)
        cache = mllm(input_ids=ids[:k], use_cache=True).past_key_values  # k answers' KV caches of context_tokens
        token = ids[:k, :1]
        costs["decode_ms"][k] = round(_time_ms(
            lambda: mllm(input_ids=token, past_key_values=cache, use_cache=True, output_hidden_states=True,
                         logits_to_keep=1), device), 2)  # the cache grows by one token a call: ~2 % over the run
    for kind in ("dit", "decode"):
        ms = costs[f"{kind}_ms"]
        costs[f"{kind}_saving"] = {k: round(k * ms[1] / ms[k], 2) for k in rows}
    return costs


def text_only(markdown: str) -> str:
    """The answer without its image links (URLs are content hashes: float noise in a pixel changes them)."""
    import re

    return re.sub(r"\n\n!\[image \d+\]\([^)]*\)\n\n", "<image>", markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="answers per throughput measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported (a shared machine is noisy)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for one GPU")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = DuetGenPipeline.from_pretrained(args.model, device=args.device).model
    name = served_model_name(str(args.model))
    largest = max(max(args.concurrency), 4)
    servers = {  # the same weights; each pipeline has its own engine
        "one_at_a_time": (DuetGenPipeline(model, model_id=str(args.model)), ServeLimits(max_batch=1, queue_size=largest)),
        "batched": (DuetGenPipeline(model, model_id=str(args.model)), ServeLimits(max_batch=largest, queue_size=largest)),
    }
    four = shapeworld_requests(4, name)
    load = shapeworld_requests(args.requests, name, seed=1)
    results: dict = {"model": str(args.model), "device": args.device, "torch_threads": args.threads,
                     "max_batch": largest, "requests_per_load": args.requests, "repeats": args.repeats,
                     "step_costs": step_costs(model)}
    print(json.dumps({"step_costs": results["step_costs"]}), file=sys.stderr)
    answers: dict = {}
    walls: dict = {}  # (label, "four" | concurrency) -> wall seconds per round
    cpus: dict = {}  # the same, process CPU seconds
    with contextlib.ExitStack() as stack:
        urls = {label: stack.enter_context(live_server(create_app(pipe, limits))) for label, (pipe, limits) in servers.items()}
        clients = LoadGenerator()
        stack.callback(clients.close)
        for url in urls.values():
            clients.run(url, four[:1], 1)  # warm-up
        # the servers take turns within each round, so a change in the machine's load hits both alike
        for _ in range(args.repeats):
            for label, url in urls.items():
                loads = [("four", four, 1 if label == "one_at_a_time" else 4)] + [(c, load, c) for c in args.concurrency]
                for key, bodies, concurrency in loads:
                    (wall, cpu), answers[label, key] = clients.run(url, bodies, concurrency)
                    walls.setdefault((label, key), []).append(wall)
                    cpus.setdefault((label, key), []).append(cpu)
            print(f"round {len(walls['batched', 'four'])} done", file=sys.stderr)
    median = statistics.median

    def ratios(times: dict, key) -> list[float]:  # one-at-a-time / batched, per round
        return [round(a / b, 2) for a, b in zip(times["one_at_a_time", key], times["batched", key])]

    results["four_in_a_row_s"] = round(median(walls["one_at_a_time", "four"]), 3)
    results["four_at_once_batched_s"] = round(median(walls["batched", "four"]), 3)
    results["four_speedup_per_round"] = ratios(walls, "four")
    results["four_speedup"] = round(median(results["four_speedup_per_round"]), 2)
    results["answers_per_s"] = {label: {c: round(args.requests / median(walls[label, c]), 3) for c in args.concurrency}
                                for label in servers}
    results["throughput_ratio_per_round"] = {c: ratios(walls, c) for c in args.concurrency}
    results["throughput_ratio"] = {c: round(median(r), 2) for c, r in results["throughput_ratio_per_round"].items()}
    # per CPU second of the server's process: steadier than wall time on a shared machine (another process's load
    # moves wall time)
    results["cpu_ratio_per_round"] = {key: ratios(cpus, key) for key in ["four", *args.concurrency]}
    results["cpu_ratio"] = {key: round(median(r), 2) for key, r in results["cpu_ratio_per_round"].items()}
    keys = ["four", *args.concurrency]
    results["answers_equal_in_text"] = all(
        [text_only(a) for a in answers["batched", k]] == [text_only(a) for a in answers["one_at_a_time", k]] for k in keys)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
