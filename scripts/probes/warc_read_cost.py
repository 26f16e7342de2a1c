"""CPU time of one full read of the benchmark's WARC (`benchmarks/data_engine.py`), gzipped and uncompressed.

    python scripts/probes/warc_read_cost.py [PAGES] [ROUNDS]

`iter_warc` over every record (pages read, images indexed, digests checked), best of ROUNDS, in CPU ms per page
record. Session 11 added a check of an uncompressed record's header bytes (`warc._raw_headers_damage`, one
`os.pread` a record); the benchmark's WARC is gzipped, where that check returns at once, so this probe also reads
the same records uncompressed. Runs on older code too (`PYTHONPATH` a worktree).
"""
import gzip
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from data_engine import write_bench_warc  # noqa: E402

from duetgen.data.engine.warc import iter_warc  # noqa: E402


def cpu_ms_per_page(path: Path, rounds: int) -> tuple[float, int]:
    best, pages = float("inf"), 0
    for _ in range(rounds):
        t = time.process_time()
        pages = sum(x.kind == "page" for x in iter_warc(path))
        best = min(best, time.process_time() - t)
    return 1e3 * best / pages, pages


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory() as tmp:
        gz = Path(tmp) / "bench.warc.gz"
        write_bench_warc(gz, n)
        raw = Path(tmp) / "bench.warc"
        raw.write_bytes(gzip.decompress(gz.read_bytes()))  # every member, concatenated: one uncompressed WARC
        for path in (gz, raw):
            ms, pages = cpu_ms_per_page(path, rounds)
            print(f"{path.name}: {pages} pages, {ms:.3f} CPU ms a page (best of {rounds})")
