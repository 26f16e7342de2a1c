"""A WARC record whose HTTP header section never ends: memory and CPU of reading it (issue 18, session 14 audit).

    OMP_NUM_THREADS=1 python scripts/probes/warc_header_lines.py [MIB]     # default 80 MiB of header lines

Writes one gzip member holding a response whose HTTP headers are MIB MiB of ``X-A: b`` lines and no blank line
(~0.5 MB on disk for 80 MiB), reads it with ``iter_warc`` and prints what it read, the process's peak RSS before
and after the read, and the read's CPU seconds. warcio keeps every header line it parses; the reader stops them at
1 MiB (``warc.MAX_HEADER_SECTION_BYTES``). Runs on older code too (``PYTHONPATH`` a worktree).
"""
import gc
import gzip
import resource
import sys
import tempfile
import time
from pathlib import Path

from duetgen.data.engine.warc import iter_warc


def main(mib: int) -> None:
    lines = b"X-A: b\r\n" * ((mib << 20) // 8)
    payload = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n" + lines + b"\r\n<p>never</p>"
    head = (b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-000000000001>\r\n"
            b"WARC-Date: 2026-01-01T00:00:00Z\r\nWARC-Target-URI: https://x.example/h\r\n"
            b"Content-Type: application/http; msgtype=response\r\nContent-Length: %d\r\n\r\n" % len(payload))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "headers.warc.gz"
        path.write_bytes(gzip.compress(head + payload + b"\r\n\r\n"))
        del lines, payload
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        t = time.process_time()
        items = [(x.kind, x.reason[:70]) for x in iter_warc(path)]
        spent = time.process_time() - t
        print(f"{mib} MiB of header lines, {path.stat().st_size:,} bytes on disk: read {items}")
    print(f"peak RSS {before} MB before the read, {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB "
          f"after; the read took {spent:.2f} CPU s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 80)
