"""The batched engine without HTTP (session 7's measurements of issue 17): where a request's time goes, what
the batched steps hold, and BatchedEngine settings against the one-at-a-time engine in alternating rounds.

    OMP_NUM_THREADS=1 python scripts/probes/batched_engine.py split 16          # one at a time: DiT / MLLM / VAE ms
    OMP_NUM_THREADS=1 python scripts/probes/batched_engine.py trace 16 4        # which answer did what, step by step
    OMP_NUM_THREADS=1 python scripts/probes/batched_engine.py rounds 16 4 6 8,0 8,20
        # 16 answers at concurrency 4, 6 rounds; variants max_image_wait,max_text_wait; ratios = one at a time / batched

    DUETGEN_PROBE_DEVICE=cuda python scripts/probes/batched_engine.py rounds 16 4 3 8,20   # on a GPU

Requests: ShapeWorld test prompts of every kind in turn (how-to, continuation, text-to-image, editing,
understanding), seeds = their index, the shipped checkpoint, one torch thread. `rounds` checks that every
batched answer equals the one-at-a-time answer in text. Trace letters: P prefill, d decode, h decode held
(text alignment), B image block, I DiT step, i first DiT step held (image alignment), . not in the step.
"""
import collections
import os
import random
import statistics
import sys
import threading
import time

import torch

import duetgen.infer.batched as batched
from duetgen.data.record import TextPart
from duetgen.infer.engine import GenerationConfig
from duetgen.infer.pipeline import DEFAULT_MODEL_DIR, DuetGenPipeline
from duetgen.shapeworld import world

DEVICE = os.environ.get("DUETGEN_PROBE_DEVICE", "cpu")  # cuda: the same measurements on a GPU
KINDS = ("how-to", "continuation", "text-to-image", "editing", "understanding")
torch.set_num_threads(1)


def tasks(n: int) -> list[tuple[str, list, int]]:
    out = []
    for i in range(n):
        t = world.sample_task(KINDS[i % 5], random.Random(1000 + i), split="test")
        out.append((t.prompt(), [world.render(t.initial)] if t.has_canvas else [], i))
    return out


def run_all(pipe, work, concurrency: int):
    """``work`` through ``pipe`` from ``concurrency`` client threads; (wall s, process CPU s, records)."""
    it, lock, out = iter(work), threading.Lock(), [None] * len(work)

    def client():
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            prompt, images, i = item
            out[i] = pipe(prompt, GenerationConfig(seed=i), images=images)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, time.process_time() - cpu, out


def texts(record) -> list[str]:
    return [p.text if isinstance(p, TextPart) else "<image>" for p in record.messages[-1].content]


def split(n: int) -> None:
    pipe = DuetGenPipeline.from_pretrained(DEFAULT_MODEL_DIR, device=DEVICE)
    m, seconds, calls = pipe.model, collections.Counter(), collections.Counter()

    def timed(obj, name, label):
        f = getattr(obj, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            result = f(*a, **k)
            seconds[label] += time.perf_counter() - start
            calls[label] += 1
            return result
        setattr(obj, name, wrapper)

    timed(m.dit, "forward", "dit")
    timed(m.mllm, "forward", "mllm")
    for name in ("encode_images", "decode_latents", "connect"):
        timed(m, name, name)
    work = tasks(n)
    run_all(pipe, work[:1], 1)
    seconds.clear(), calls.clear()
    wall, _, _ = run_all(pipe, work, 1)
    print(f"{n} answers one at a time: {wall:.2f} s")
    for label in seconds:
        print(f"  {label:15s} {calls[label]:4d} calls {seconds[label]:.3f} s ({100 * seconds[label] / wall:.0f} %), "
              f"{1000 * seconds[label] / calls[label]:.2f} ms a call")


def trace(n: int, concurrency: int, image_wait: int = 8, text_wait: int = 20) -> None:
    job = batched._Job
    owner = {}  # id(job) -> client slot

    model = DuetGenPipeline.from_pretrained(DEFAULT_MODEL_DIR, device=DEVICE).model
    pipe = DuetGenPipeline(model)
    pipe.engine = batched.BatchedEngine(model, concurrency, max_image_wait=image_wait, max_text_wait=text_wait)
    scheduler, names, rows = pipe.engine.scheduler, {}, []

    class TracedJob(job):  # remembers the thread that submitted it
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            owner[id(self)] = names.get(threading.get_ident(), "?")

    batched._Job = TracedJob
    step = scheduler._step

    def traced_step(jobs):
        held = step(jobs)
        row = {}
        for j in jobs:
            was_held = any(j is h for h in held)
            if j.kind == "dit":
                row[owner[id(j)]] = "i" if was_held else "I"
            elif j.inputs[1] is not None:
                row[owner[id(j)]] = "B"
            elif j.inputs[0].numel() > 1:
                row[owner[id(j)]] = "P"
            else:
                row[owner[id(j)]] = "h" if was_held else "d"
        rows.append(row)
        return held

    scheduler._step = traced_step
    work, lock = iter(tasks(n)), threading.Lock()

    def client(slot):
        names[threading.get_ident()] = slot
        while True:
            with lock:
                item = next(work, None)
            if item is None:
                return
            pipe(item[0], GenerationConfig(seed=item[2]), images=item[1])
            with lock:
                rows.append({slot: f"<{KINDS[item[2] % 5]} done>"})

    threads = [threading.Thread(target=client, args=(s,)) for s in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batched._Job = job
    previous, count = None, 0
    for row in rows + [None]:  # runs of identical steps, counted
        line = None if row is None else "  ".join(f"{s}:{row.get(s, '.')}" for s in range(concurrency))
        if line == previous:
            count += 1
            continue
        if previous is not None:
            print(f"{count:3d} x  {previous}")
        previous, count = line, 1
    dit_calls = collections.Counter(sum(v in "I" for v in r.values()) for r in rows if any(v == "I" for v in r.values()))
    decodes = collections.Counter(sum(v == "d" for v in r.values()) for r in rows if any(v == "d" for v in r.values()))
    print("packed DiT calls by images in them:", dict(sorted(dit_calls.items())))
    print("decode steps by answers decoding in them:", dict(sorted(decodes.items())))


def rounds(n: int, concurrency: int, repeats: int, variants: list[tuple[int, int]]) -> None:
    model = DuetGenPipeline.from_pretrained(DEFAULT_MODEL_DIR, device=DEVICE).model
    pipes = {"one at a time": (DuetGenPipeline(model), 1)}
    for image_wait, text_wait in variants:
        pipe = DuetGenPipeline(model)
        pipe.engine = batched.BatchedEngine(model, concurrency, max_image_wait=image_wait, max_text_wait=text_wait)
        pipes[f"batched image_wait={image_wait} text_wait={text_wait}"] = (pipe, concurrency)
    work = tasks(n)
    for pipe, c in pipes.values():
        run_all(pipe, work, c)  # warm-up
    times = {label: [] for label in pipes}
    reference, equal = None, True
    for _ in range(repeats):  # the variants take turns within each round
        for label, (pipe, c) in pipes.items():
            wall, cpu, out = run_all(pipe, work, c)
            times[label].append((wall, cpu))
            answer = [texts(r) for r in out]
            reference = reference or answer
            equal &= answer == reference
    base = times["one at a time"]
    for label, rows in times.items():
        if label == "one at a time":
            continue
        wall = [a[0] / b[0] for a, b in zip(base, rows)]
        cpu = [a[1] / b[1] for a, b in zip(base, rows)]
        print(f"{label}: wall ratio {statistics.median(wall):.2f} {[round(x, 2) for x in wall]}, "
              f"CPU ratio {statistics.median(cpu):.2f}")
    print(f"one at a time, wall s per round: {[round(a[0], 2) for a in base]}; answers equal in text: {equal}")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "split":
        split(int(args[0]))
    elif command == "trace":
        trace(int(args[0]), int(args[1]), *map(int, args[2:4]))
    elif command == "rounds":
        rounds(int(args[0]), int(args[1]), int(args[2]), [tuple(map(int, v.split(","))) for v in args[3:]])
    else:
        sys.exit(f"unknown command {command!r}: split, trace or rounds (see the docstring)")
