"""What copying a one-stream ``.warc.gz`` as one gzip member per record costs (issue 18; docs/data-engine.md).

    python scripts/probes/warc_recompress.py 500       # pages of benchmarks/data_engine.py's WARC

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

from duetgen.data.engine.warc import iter_warc, one_gzip_stream, recompress_members  # noqa: E402


def main(n: int) -> None:
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


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
