"""How the WARC reader reads a gzip member cut short before good ones (session 7, issue 18): N fresh warcio
members of a test page (new record ids and dates each time, so new compressed bytes), each cut at CUT bytes and
followed by two good pages; counts the sequences of item kinds `iter_warc` yields.

    python scripts/probes/warc_cut_members.py 400 300          # expected: every one ('corrupt', 'page', 'page')
    PYTHONPATH=/path/to/older/checkout python scripts/probes/warc_cut_members.py 400 300   # an older reader

Before 6f5be73, 37 of 400 read as ('skip',) (the cut member swallowed the pages after it) or
('skip', 'corrupt', 'page', 'page') (a skipped response that was not there): 33 and 4 in one run.
"""
import collections
import sys
import tempfile
from pathlib import Path

root = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(root / "tests"), str(root / "tests" / "fixtures" / "engine")]
from howto_site import PAGES_DIR  # noqa: E402
from test_engine_warc import member  # noqa: E402

from duetgen.data.engine.warc import iter_warc  # noqa: E402

n, cut = int(sys.argv[1]), int(sys.argv[2])
page = (PAGES_DIR / "bathe-a-cat.html").read_bytes()
kinds = collections.Counter()
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "cut.warc.gz"
    for _ in range(n):
        good = member("https://x.example/ok.html", "text/html", b"<p>ok</p>")
        path.write_bytes(member("https://x.example/cut.html", "text/html", page)[:cut] + good + good)
        kinds[tuple(x.kind for x in iter_warc(path))] += 1
for sequence, count in kinds.most_common():
    print(f"{count:5d}  {sequence}")
