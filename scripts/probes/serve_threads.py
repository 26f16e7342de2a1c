"""`duetgen serve` (the real command, in its own process) answering ShapeWorld requests one after another over
/v1, with each --threads given (session 7: torch's default of every core against one thread on 2 cores).

    python scripts/probes/serve_threads.py "" "--threads 2" "" "--threads 2"      # "" = the command's default

Prints the seconds for 10 requests per run (the first request, a warm-up, not counted).
"""
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serving import shapeworld_requests  # noqa: E402

PORT = 8765
bodies = shapeworld_requests(10, "shapeworld-toy", seed=1)
env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the command decides its threads
for flags in sys.argv[1:]:
    server = subprocess.Popen([sys.executable, "-m", "duetgen.cli", "serve", "--port", str(PORT), *shlex.split(flags)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{PORT}/api/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
        httpx.post(url, json=bodies[0], timeout=60).raise_for_status()  # warm-up
        start = time.perf_counter()
        for body in bodies:
            httpx.post(url, json=body, timeout=60).raise_for_status()
        print(f"serve {flags or '(default threads)'}: {time.perf_counter() - start:.2f} s for {len(bodies)} requests")
    finally:
        server.terminate()
        server.wait()
