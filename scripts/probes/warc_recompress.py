"""What copying a one-stream ``.warc.gz`` as one gzip member per record costs (issue 18; docs/data-engine.md).

    python scripts/probes/warc_recompress.py 500       # pages of benchmarks/data_engine.py's WARC
    python scripts/probes/warc_recompress.py bomb 200  # 2 pages, then 200 MiB of zeros, all one gzip stream
    python scripts/probes/warc_recompress.py zeros 52  # the reader on a per-record file whose first member is zeros

Writes the data engine benchmark's WARC (per-record gzip, as crawlers write it), re-gzips its records as one
stream (what ``gzip crawl.warc`` makes), then times ``recompress_members`` on that and compares the sizes:
the copy should come back near the per-record original, every record readable.
"""
import gzip
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "benchmarks"),
                str(Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "engine")]
from data_engine import write_bench_warc  # noqa: E402

from duetgen.data.engine.warc import iter_warc  # noqa: E402  (alone: `zeros` also runs on older code)


def main(n: int) -> None:
    from duetgen.data.engine.warc import one_gzip_stream, recompress_members

    with tempfile.TemporaryDirectory() as tmp:
        per_record, one, copy = (Path(tmp) / name for name in ("per-record.warc.gz", "one.warc.gz", "copy.warc.gz"))
        write_bench_warc(per_record, n)
        plain = gzip.decompress(per_record.read_bytes())  # the members' records, concatenated
        one.write_bytes(gzip.compress(plain))
        assert one_gzip_stream(one) and not one_gzip_stream(per_record)
        start = time.perf_counter()
        records = recompress_members(one, copy)
        seconds = time.perf_counter() - start
        kinds = [x.kind for x in iter_warc(copy, read_pages=False)]
        sizes = {p.name: p.stat().st_size for p in (per_record, one, copy)}
    print(f"{records} records, {len(plain) / 1e6:.1f} MB decompressed; sizes: "
          + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
          + f"; copy / per-record original {sizes['copy.warc.gz'] / sizes['per-record.warc.gz']:.2f}; "
          f"{seconds:.2f} s ({len(plain) / 1e6 / seconds:.0f} MB/s decompressed); copy reads {len(kinds)} records, "
          f"{kinds.count('corrupt')} corrupt")


def bomb(mib: int) -> None:
    """``recompress_members`` on a one-stream file of 2 pages and ``mib`` MiB of zeros: time and peak memory."""
    from duetgen.data.engine.warc import recompress_members

    import resource
    import zlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from test_engine_warc import plain_member

    with tempfile.TemporaryDirectory() as tmp:
        src, copy = Path(tmp) / "bomb.warc.gz", Path(tmp) / "copy.warc.gz"
        z = zlib.compressobj(6, zlib.DEFLATED, 31)
        with open(src, "wb") as f:
            f.write(z.compress(plain_member("http://x.example/0.html", b"<p>0</p>") +
                               plain_member("http://x.example/1.html", b"<p>1</p>")))
            for _ in range(mib):
                f.write(z.compress(bytes(1 << 20)))
            f.write(z.flush())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.process_time()
        records = recompress_members(src, copy)
        seconds = time.process_time() - start
        kinds = [x.kind for x in iter_warc(copy)]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"{src.stat().st_size / 1e6:.2f} MB file ({mib} MiB of zeros): {records} records in {seconds:.2f} CPU s; "
              f"the copy reads {kinds}; peak RSS {peak / 1024:.0f} MB (before: {before / 1024:.0f} MB)")


def zeros(mib: int) -> None:
    """``iter_warc`` on a per-record .warc.gz whose first member is ``mib`` MiB of zeros: Python's peak allocations."""
    import tracemalloc
    import zlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from test_engine_warc import member

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "zeros.warc.gz"
        z = zlib.compressobj(6, zlib.DEFLATED, 31)
        path.write_bytes(b"".join(z.compress(bytes(1 << 20)) for _ in range(mib)) + z.flush()
                         + member("http://x.example/after.html", "text/html", b"<p>after</p>"))
        tracemalloc.start()
        start = time.process_time()
        kinds = [x.kind for x in iter_warc(path)]
        seconds = time.process_time() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{path.stat().st_size / 1e3:.0f} KB file ({mib} MiB of zeros in its first member): {kinds} in "
              f"{seconds:.2f} CPU s, peak Python allocations {peak / 1e6:.0f} MB")


if __name__ == "__main__":
    args = sys.argv[1:] or ["500"]
    if args[0] == "bomb":
        bomb(int(args[1]))
    elif args[0] == "zeros":
        zeros(int(args[1]))
    else:
        main(int(args[0]))
