"""Text work per page on real web pages: trafilatura (the WARC benchmark's reference) against pass 1 (issue 18).

    pip download newspaper4k==0.9.6 --no-binary :all: --no-deps -d /tmp/np   # 30 real pages in its test data
    tar xzf /tmp/np/newspaper4k-0.9.6.tar.gz -C /tmp/np
    OMP_NUM_THREADS=1 python scripts/probes/real_pages_text_cost.py /tmp/np/newspaper4k-0.9.6/tests/data/html

The WARC benchmark's pages are the bathe-a-cat fixture plus 1,000 words (~11 KB of HTML, ~80 elements); pages
a crawl holds are larger and carry a site's chrome (newspaper4k's 30 test pages: median ~107 KB). This times,
per page and in CPU ms (best of 3), trafilatura as datatrove's ``Trafilatura(favour_precision=True)`` calls it
(in this process: the benchmark's reference also pays a sandbox child process and its pipe) against the engine's
pass-1 stages on the same bytes (extract, page filter, language ID, MinHash; the page filter may drop a page
early, e.g. a site's front page, which then costs less). Needs the reference installed
(``pip install trafilatura``); reads only the folder given.
"""
import statistics
import sys
import time
from pathlib import Path

import trafilatura

from duetgen.data.engine import EngineConfig
from duetgen.data.engine.document import Doc
from duetgen.data.engine.extract import decode_html
from duetgen.data.engine.language import detect
from duetgen.data.engine.neardup import PageSketcher
from duetgen.data.engine.stages import page_stages, run_stages


def best_of(n: int, fn) -> float:
    spent = []
    for _ in range(n):
        t = time.process_time()
        fn()
        spent.append(time.process_time() - t)
    return min(spent) * 1000


def main(folder: str) -> None:
    cfg = EngineConfig()
    stages, sketcher = page_stages(cfg), PageSketcher(cfg.neardup)
    detect("warm up the language models once, as every worker does", 0.5)

    def ours(raw: bytes) -> None:
        docs, _ = run_stages(stages, [Doc(id="p", url="https://news.example/a", html=raw)])
        for d in docs:
            sketcher(d.clean_text)

    rows = []
    for path in sorted(Path(folder).glob("*.html")):
        raw = path.read_bytes()
        html = decode_html(raw)[0]
        ref = best_of(3, lambda: trafilatura.extract(html, favor_precision=True, include_comments=False,
                                                     deduplicate=True))
        rows.append((len(raw), ref, best_of(3, lambda: ours(raw)), path.name))
    for size, ref, own, name in sorted(rows):
        print(f"{size:>9,} B  trafilatura {ref:6.1f} ms  pass 1 {own:6.1f} ms  {name}")
    print(f"{len(rows)} pages, median {statistics.median(r[0] for r in rows):,.0f} B: trafilatura median "
          f"{statistics.median(r[1] for r in rows):.1f} CPU ms a page, pass 1 median "
          f"{statistics.median(r[2] for r in rows):.1f}; in all, trafilatura / pass 1 = "
          f"{sum(r[1] for r in rows) / sum(r[2] for r in rows):.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
