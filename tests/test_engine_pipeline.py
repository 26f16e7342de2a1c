"""Data engine end to end without an LLM: fixture pages over real HTTP -> dataset + funnel; resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "engine"))
from howto_site import PAGES_DIR, Site, photo  # noqa: E402

from duetgen.data.engine import EngineConfig, EngineError, LocalExecutor, run_engine  # noqa: E402
from duetgen.data.engine import runner as runner_mod  # noqa: E402
from duetgen.data.engine.fetch import FetchConfig  # noqa: E402
from duetgen.data.engine.neardup import NearDupPageConfig  # noqa: E402
from duetgen.data.dataset import Dataset  # noqa: E402
from duetgen.data.record import ImagePart, TextPart  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.0/8",)


@pytest.fixture(scope="module")
def site():
    with Site(slow_s=5.0) as s:
        yield s


def config(**kw) -> EngineConfig:
    kw.setdefault("shard_pages", 2)
    # 2 s per image is far above a loopback fetch, and the slow endpoint (5 s) still times out.
    return EngineConfig(fetch=FetchConfig(allow_networks=LOOPBACK, timeout_s=2.0, max_bytes=5_000_000), **kw)


def write_jsonl(path: Path, site: Site, extra_lines=()) -> Path:
    with open(path, "w") as f:
        for p in sorted(PAGES_DIR.glob("*.html")):
            if "cp1252" not in p.name:
                f.write(json.dumps({"url": site.page_url(p.name), "html": p.read_text()}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def records_by_title(out: Path) -> dict:
    return {r.meta["title"]: r for r in Dataset(out)}


def stage(funnel: dict, name: str) -> dict:
    return next(s for s in funnel["stages"] if s["name"] == name)


def all_drops(funnel: dict, kind: str) -> dict:
    out: dict = {}
    for s in funnel["stages"]:
        for k, v in s[kind].items():
            out[k] = out.get(k, 0) + v
    return out


def test_rules_only_run_builds_clean_records_and_a_funnel(site, tmp_path):
    deep = "<html><body>" + "<div>" * 5000 + "<img src='/img/step1.jpg'>" + "</div>" * 5000 + "</body></html>"
    huge = "<html><body><p>" + "a" * (50 * 1024 * 1024) + "</p></body></html>"  # a 50 MB page
    hostile_pages = [json.dumps({"url": site.page_url("deep.html"), "html": deep}),
                     json.dumps({"url": site.page_url("huge.html"), "html": huge})]
    inp = write_jsonl(tmp_path / "pages.jsonl", site, ["{not json", '["a list"]', "", *hostile_pages])
    out = tmp_path / "ds"
    funnel = run_engine(inp, out, config(), progress=False)

    recs = records_by_title(out)
    assert sorted(recs) == ["How to Bathe a Cat", "How to Clean a Cast Iron Pan", "Repot a Houseplant"]

    # --- the wikiHow-like page: question from the title, each step photo after its step text
    cat = recs["How to Bathe a Cat"]
    assert [m.role for m in cat.messages] == ["user", "assistant"]
    assert cat.messages[0].content == [TextPart("How do I bathe a cat?")]
    parts = cat.messages[1].content
    images = [p for p in parts if isinstance(p, ImagePart)]
    ds = Dataset(out)
    got = [ds.read_image_bytes(p.image, cat.id) for p in images]
    assert got == [photo(i) for i in (1, 2, 3, 4, 5, 6)]  # ad, near-duplicate, QR code, spacer gone
    for i, p in enumerate(parts):
        if isinstance(p, ImagePart):
            assert isinstance(parts[i - 1], TextPart)  # every image follows text
    text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
    first_image_at = next(i for i, p in enumerate(parts) if isinstance(p, ImagePart))
    assert "Step 1: Trim your cat's claws" in parts[first_image_at - 1].text  # moved after its text
    assert "Step 2: Gather the supplies" in text and "Step 7: Wrap your cat" in text
    for junk in ("http", "www.", "Advertisement", "Was this article helpful", "©", "!!!", "Share on", "Visit"):
        assert junk not in text, junk
    assert cat.meta["url"] == site.page_url("bathe-a-cat.html") and cat.meta["engine"]["dialogue"] == "template"

    # --- hostile page: every bad image dropped with its reason, the page itself survives
    pan = recs["How to Clean a Cast Iron Pan"]
    pan_imgs = [ds.read_image_bytes(p.image, pan.id) for p in pan.image_parts()]
    assert pan_imgs == [photo(1), photo(12)]

    # --- funnel: counts chain from stage to stage, every drop has its reason
    names = [s["name"] for s in funnel["stages"]]
    assert names == ["extract", "page_filter", "language", "dedup_pages", "fetch_images", "image_rules",
                     "dedup_images", "require_images", "clean_text", "reorder", "dialogue", "write"]
    for a, b in zip(funnel["stages"], funnel["stages"][1:]):
        assert a["pages_out"] == b["pages_in"], (a["name"], b["name"])
        assert a["images_out"] == b["images_in"], (a["name"], b["name"])
    for s in funnel["stages"]:
        assert s["pages_in"] - s["pages_out"] == sum(s["page_drops"].values()), s["name"]
    assert stage(funnel, "extract")["pages_in"] == 9  # 5 pages + 2 malformed lines + 2 hostile pages (blank line skipped)
    assert all_drops(funnel, "page_drops") == {"bad_input": 2, "text_only": 1, "too_short": 1,
                                               "too_deeply_nested": 1, "page_too_large": 1}
    image_drops = all_drops(funnel, "image_drops")
    assert image_drops == {
        "unsupported_scheme": 3,  # file:, data:, javascript:
        "blocked_address": 3,  # metadata address, redirect to 10.x, redirect to metadata
        "too_many_pixels": 1, "corrupt_image": 2, "bad_content_type": 1, "too_large": 1, "timeout": 1,
        "too_many_redirects": 1, "http_error": 2,  # missing-photo.jpg, relative-but-fine.jpg (404)
        "banner_ad": 1, "qr_code": 1, "near_uniform": 2, "near_duplicate": 1,
    }, image_drops
    assert funnel["summary"]["records_out"] == 3 and funnel["llm"] == {}
    html = (out / "funnel.html").read_text()
    assert "near_duplicate" in html and "bad_input" in html and "<script" not in html
    assert "None" not in html and "llm_model: null" in html  # the summary as the JSON shows it, not Python's repr
    assert json.loads((out / "funnel.json").read_text()) == funnel
    ex = stage(funnel, "image_rules")["examples"]["image:qr_code"][0]
    assert ex["src"] == "/img/get-app-qr.png" and ex["thumb"].startswith("data:image/jpeg;base64,")

    # a second run of the same command is a no-op that reports the same funnel
    again = run_engine(inp, out, config(), progress=False)
    assert again["summary"]["shards_run_now"] == 0 and again["stages"] == funnel["stages"]
    assert len(Dataset(out)) == 3


def test_duplicate_url_is_written_once(site, tmp_path):
    line = json.dumps({"url": site.page_url("repot-a-plant.html"), "html": (PAGES_DIR / "repot-a-plant.html").read_text()})
    inp = tmp_path / "pages.jsonl"
    inp.write_text("\n".join([line, line, line]) + "\n")
    funnel = run_engine(inp, tmp_path / "ds", config(shard_pages=2), progress=False)
    assert len(Dataset(tmp_path / "ds")) == 1
    assert stage(funnel, "dedup_pages")["page_drops"] == {"duplicate_id": 2}  # decided before any image is fetched
    assert stage(funnel, "fetch_images")["pages_in"] == 1


def test_directory_input_with_legacy_encoding_and_base_href(site, tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    for name in ("creme-brulee-cp1252.html", "bathe-a-cat.html"):
        raw = (PAGES_DIR / name).read_bytes()
        raw = raw.replace(b"<head>", f'<head><base href="{site.url}/pages/">'.encode(), 1)
        (pages / name).write_bytes(raw)
    (pages / "notes.txt").write_text("not a page")
    out = tmp_path / "ds"
    funnel = run_engine(pages, out, config(), progress=False)
    recs = records_by_title(out)
    assert sorted(recs) == ["How to Bathe a Cat", "How to Make Crème Brûlée"]
    creme = recs["How to Make Crème Brûlée"]
    assert creme.messages[0].content[0].text == "How do I make crème brûlée?"
    body = creme.messages[1].text
    assert "It’s easier than it looks – you need 4 egg yolks" in body and "80°C" in body
    assert creme.meta["encoding"] == "cp1252" and creme.meta["engine"]["input"] == "creme-brulee-cp1252.html"
    assert len(creme.image_parts()) == 3 and funnel["summary"]["pages_in"] == 2


def saved_page(title: str, *srcs: str) -> str:
    steps = "".join(f"<li><p>Step text number {i}: " + "do the careful thing well. " * 8 + f"</p><img src='{src}'></li>"
                    for i, src in enumerate(srcs))
    return f"<html><head><title>{title}</title></head><body><article><h1>{title}</h1><ol>{steps}</ol></article></body></html>"


def test_folder_of_saved_pages_reads_images_beside_each_page(tmp_path):
    """Issue 15 item 1: `--input DIR` of saved pages with img/ next to them (was: every image unresolvable_url)."""
    pages = tmp_path / "pages"
    (pages / "img").mkdir(parents=True)
    (pages / "guides").mkdir()
    for i in (1, 2, 3):
        (pages / "img" / f"step {i}.jpg").write_bytes(photo(i))
    (pages / "bathe.html").write_text(saved_page("How to Bathe a Cat", "img/step%201.jpg", "./img/step 2.jpg"))
    (pages / "guides" / "plant.html").write_text(saved_page("How to Repot a Plant", "../img/step%203.jpg"))
    out = tmp_path / "ds"
    cmd = [str(REPO / ".venv" / "bin" / "duetgen"), "data", "engine", "--input", str(pages), "--out", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = records_by_title(out)
    assert sorted(recs) == ["How to Bathe a Cat", "How to Repot a Plant"]
    ds = Dataset(out)
    bathe = recs["How to Bathe a Cat"]
    assert [ds.read_image_bytes(p.path) for p in bathe.image_parts()] == [photo(1), photo(2)]
    assert [im["file"] for im in bathe.meta["images"]] == ["img/step 1.jpg", "img/step 2.jpg"]
    assert [ds.read_image_bytes(p.path) for p in recs["How to Repot a Plant"].image_parts()] == [photo(3)]


def test_an_image_a_header_rule_drops_is_never_decoded(tmp_path, monkeypatch):
    """Size, shape and named kinds need only the header: such images are dropped by the image rules without a
    decode (a banner whose pixels are cut short is a banner_ad, not a corrupt_image); the rest decode once."""
    import io

    from PIL import Image

    from duetgen.data import images as images_mod
    from duetgen.data.engine import document as document_mod

    pages = tmp_path / "pages"
    (pages / "img").mkdir(parents=True)
    for i in (1, 2):
        (pages / "img" / f"step{i}.jpg").write_bytes(photo(i))
    banner = io.BytesIO()
    Image.new("RGB", (728, 90), (200, 30, 30)).save(banner, format="PNG")
    (pages / "img" / "sale.png").write_bytes(banner.getvalue()[:-40])  # the header says 728x90; the pixels are cut
    tiny = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 90, 0)).save(tiny, format="PNG")
    (pages / "img" / "tiny.png").write_bytes(tiny.getvalue())
    (pages / "p.html").write_text(saved_page("How to Do a Thing", "img/step1.jpg", "img/sale.png", "img/tiny.png",
                                             "img/step2.jpg"))
    decoded = []
    real = images_mod.decode_image_bytes
    monkeypatch.setattr(images_mod, "decode_image_bytes",
                        lambda data, where, *a, **k: decoded.append(where) or real(data, where, *a, **k))
    with monkeypatch.context() as m:  # no funnel examples: their thumbnails decode a dropped image
        m.setattr(document_mod, "MAX_EXAMPLES_PER_REASON", 0)
        funnel = run_engine(pages, tmp_path / "bare", config(), progress=False)
    assert all_drops(funnel, "image_drops") == {"banner_ad": 1, "too_small": 1}  # was corrupt_image + too_small
    assert sorted(decoded) == ["img/step1.jpg", "img/step2.jpg"]  # the kept photos, once each; was all four
    funnel = run_engine(pages, tmp_path / "ds", config(), progress=False)
    examples = stage(funnel, "image_rules")["examples"]
    assert examples["image:too_small"][0]["thumb"].startswith("data:image/jpeg")  # decoded for its example only
    assert examples["image:banner_ad"][0]["thumb"] is None  # cut short: no thumbnail, and no failure
    (rec,) = Dataset(tmp_path / "ds")
    assert len(rec.image_parts()) == 2


def test_saved_page_images_never_come_from_outside_the_input_folder(tmp_path):
    pages = tmp_path / "pages"
    (pages / "img").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(photo(5))  # outside the input folder: must never be read
    (pages / "img" / "ok.jpg").write_bytes(photo(1))
    (pages / "img" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    os.mkfifo(pages / "img" / "fifo.jpg")  # would block a plain open() forever
    srcs = ["img/ok.jpg", "../secret.jpg", str(tmp_path / "secret.jpg"), "img/link.jpg", "img/fifo.jpg",
            "img/missing.jpg", "img/%2e%2e/%2e%2e/secret.jpg"]
    (pages / "p.html").write_text(saved_page("How to Do a Thing", *srcs))
    out = tmp_path / "ds"
    t0 = time.perf_counter()
    funnel = run_engine(pages, out, config(), progress=False)
    assert time.perf_counter() - t0 < 30
    drops = all_drops(funnel, "image_drops")
    assert drops == {"outside_input": 4, "unreadable_file": 1, "missing_file": 1}, drops
    examples = stage(funnel, "fetch_images")["examples"]["image:outside_input"]
    assert any("absolute path" in e["detail"] for e in examples)
    assert any("resolves outside the input folder" in e["detail"] and "p.html" in e["detail"] for e in examples)
    (rec,) = Dataset(out)
    assert [Dataset(out).read_image_bytes(p.path) for p in rec.image_parts()] == [photo(1)]


def test_restart_with_other_input_or_config_is_refused(site, tmp_path):
    inp = write_jsonl(tmp_path / "pages.jsonl", site)
    out = tmp_path / "ds"
    run_engine(inp, out, config(), progress=False)
    with pytest.raises(EngineError, match="different input or config"):
        run_engine(inp, out, config(shard_pages=3), progress=False)
    with open(inp, "a") as f:
        f.write(json.dumps({"url": "https://x.example/a", "html": "<p>x</p>"}) + "\n")
    with pytest.raises(EngineError, match="different input or config"):
        run_engine(inp, out, config(), progress=False)
    with pytest.raises(EngineError, match="does not exist"):
        run_engine(tmp_path / "nope.jsonl", tmp_path / "ds2", config(), progress=False)
    with pytest.raises(EngineError, match="matches no file"):
        run_engine(tmp_path / "crawl" / "*.warc.gz", tmp_path / "ds3", config(), progress=False)
    assert not (tmp_path / "ds2").exists() and not (tmp_path / "ds3").exists()  # refused before OUT is made


def test_a_plan_written_by_a_newer_engine_is_refused_by_name(site, tmp_path):
    """plan.json carries its format: a later one (a downgrade) is refused with the versions, not a TypeError on
    fields this code does not know (how the engine before session 11 met a session-10 plan)."""
    inp = write_jsonl(tmp_path / "pages.jsonl", site)
    out = tmp_path / "ds"
    run_engine(inp, out, config(), progress=False)
    plan_path = out / "_engine" / "plan.json"
    plan = json.loads(plan_path.read_text())
    assert plan["format"] == 2
    plan["format"] = 3
    plan["shards"][0]["a_later_field"] = 1
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(EngineError, match="newer duetgen.*plan format 3.*up to 2"):
        run_engine(inp, out, config(), progress=False)


def test_crash_between_commit_and_marker_neither_loses_nor_duplicates(site, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "pages.jsonl", site)
    out = tmp_path / "ds"
    real_replace = os.replace

    def crash_on_second_marker(src, dst):
        if str(dst).endswith("done/shard-00001.json"):
            raise KeyboardInterrupt("simulated kill right after shard 1's worker put its shard file in place")
        return real_replace(src, dst)

    monkeypatch.setattr(runner_mod.os, "replace", crash_on_second_marker)
    with pytest.raises(KeyboardInterrupt):
        run_engine(inp, out, config(), progress=False)
    monkeypatch.setattr(runner_mod.os, "replace", real_replace)
    assert (out / "shards" / "part-00001.jsonl").exists()  # written by the worker, never listed
    assert not (out / "_engine" / "done" / "shard-00001.json").exists()
    listed = [s["path"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    assert "shards/part-00001.jsonl" not in listed
    funnel = run_engine(inp, out, config(), progress=False)
    ids = [r.id for r in Dataset(out)]
    assert len(ids) == len(set(ids)) == 3
    assert stage(funnel, "extract")["pages_in"] == 5  # shard 1's counters were kept, not recounted or lost
    assert funnel["summary"]["shards_run_now"] == 2  # shard 1 again (its marker was missing), and shard 2


def test_two_workers_write_the_same_records_as_one(site, tmp_path):
    inp = write_jsonl(tmp_path / "pages.jsonl", site)
    run_engine(inp, tmp_path / "a", config(shard_pages=1), LocalExecutor(1), progress=False)
    run_engine(inp, tmp_path / "b", config(shard_pages=1), LocalExecutor(2), progress=False)
    a = [r.to_json() for r in Dataset(tmp_path / "a")]
    b = [r.to_json() for r in Dataset(tmp_path / "b")]
    assert a == b and len(a) == 3


def _clean_run_ids(inp: Path, out: Path) -> list:
    run_engine(inp, out, config(shard_pages=1, neardup=NearDupPageConfig(enabled=False)), progress=False)
    return [r.to_json() for r in Dataset(out)]


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_loses_and_duplicates_nothing(tmp_path):
    with Site(slow_s=0.5, image_latency_s=0.03) as site:
        lines = []
        for i in range(10):
            for name in ("bathe-a-cat.html", "repot-a-plant.html"):
                lines.append(json.dumps({"url": site.page_url(name) + f"?copy={i}", "html": (PAGES_DIR / name).read_text()}))
        inp = tmp_path / "pages.jsonl"
        inp.write_text("\n".join(lines) + "\n")
        expected = _clean_run_ids(inp, tmp_path / "clean")
        assert len(expected) == 20

        out = tmp_path / "killed"
        cmd = [str(REPO / ".venv" / "bin" / "duetgen"), "data", "engine", "--input", str(inp), "--out", str(out),
               "--shard-pages", "1", "--allow-network", "127.0.0.0/8", "--no-progress",
               "--no-dedup"]  # the 20 pages are 10 copies of 2: all of them must come through
        kills = 0
        for wait_for in (3, 9):  # kill twice, at different points
            proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            deadline = time.time() + 60
            while time.time() < deadline and len(list((out / "_engine" / "done").glob("*.json"))) < wait_for:
                if proc.poll() is not None:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            os.killpg(proc.pid, signal.SIGKILL)  # the whole run, mid-flight
            proc.wait()
            kills += 1
        done_at_kill = len(list((out / "_engine" / "done").glob("*.json")))
        assert 9 <= done_at_kill < 20 and kills == 2
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "wrote 20 records from 20 pages" in proc.stdout
        got = [r.to_json() for r in Dataset(out)]
        assert got == expected  # same records, same order, none lost, none twice
        funnel = json.loads((out / "funnel.json").read_text())
        assert funnel["stages"][0]["pages_in"] == 20


def _pool_workers(parent: int) -> list[int]:
    """Pids of the multiprocessing spawn workers whose parent is ``parent`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat, cmd = (d / "stat").read_text(), (d / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmd:
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_pool_workers_die_with_a_sigkilled_driver(tmp_path):
    """Issue 15 item 3: after SIGKILL of `duetgen data engine --workers 2` its workers lived on under PID 1."""
    with Site(slow_s=0.5, image_latency_s=0.2) as site:
        lines = [json.dumps({"url": site.page_url("bathe-a-cat.html") + f"?copy={i}",
                             "html": (PAGES_DIR / "bathe-a-cat.html").read_text()}) for i in range(20)]
        inp = tmp_path / "pages.jsonl"
        inp.write_text("\n".join(lines) + "\n")
        cmd = [str(REPO / ".venv" / "bin" / "duetgen"), "data", "engine", "--input", str(inp), "--out",
               str(tmp_path / "out"), "--shard-pages", "1", "--workers", "2", "--allow-network", "127.0.0.0/8",
               "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        workers: list[int] = []
        try:
            deadline = time.time() + 60
            while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
                workers = _pool_workers(proc.pid)
                time.sleep(0.05)
            assert len(workers) == 2 and proc.poll() is None
            os.kill(proc.pid, signal.SIGKILL)  # the driver only, as the OOM killer or `kill -9 PID` would
            proc.wait()
            t0 = time.time()
            while time.time() - t0 < 5 and any(_alive(w) for w in workers):
                time.sleep(0.05)
            assert not [w for w in workers if _alive(w)], "pool workers outlived their driver"
        finally:
            for w in workers:  # never leave one behind, whatever failed above
                if _alive(w):
                    os.kill(w, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()


def test_a_jsonl_url_with_a_lone_surrogate_is_bad_input_not_a_crash(tmp_path):
    """A JSON "\\ud800" escape makes a string no UTF-8 can hold: the page's id is made from its URL, which raised
    UnicodeEncodeError and stopped the whole run (an audit, session 9)."""
    inp = tmp_path / "pages.jsonl"
    inp.write_text('{"url": "https://example.com/a\\ud800b", "id": "x\\ud800", "html": "<p>hi</p>"}\n')
    funnel = run_engine(inp, tmp_path / "ds", config(), progress=False)
    assert all_drops(funnel, "page_drops") == {"bad_input": 1}
    (example,) = stage(funnel, "extract")["examples"]["page:bad_input"]
    assert "pages.jsonl:1" in example["detail"] and "surrogate" in example["detail"]


def test_a_jsonl_page_nested_too_deeply_is_bad_input_not_a_crash(tmp_path):
    """json raises RecursionError (not a ValueError) for nesting past Python's stack: one such line stopped the
    whole run, again on every rerun (an audit, session 13)."""
    inp = tmp_path / "pages.jsonl"
    inp.write_text('{"url": "https://example.com/a", "html": "<p>hi</p>"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    funnel = run_engine(inp, tmp_path / "ds", config(), progress=False)
    assert all_drops(funnel, "page_drops")["bad_input"] == 1
    (example,) = stage(funnel, "extract")["examples"]["page:bad_input"]
    assert "pages.jsonl:2" in example["detail"] and "nested too deeply" in example["detail"]


def test_cli_reports_bad_input_cleanly(tmp_path):
    exe = str(REPO / ".venv" / "bin" / "duetgen")
    r = subprocess.run([exe, "data", "engine", "--input", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([exe, "data", "engine", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--llm", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--llm and --model together" in r.stderr


def test_a_resume_lists_the_shards_in_input_order(site, tmp_path):
    """An audit: shards finished by a resume were appended after the ones done before (part-00000, 00002, 00001)."""
    inp = write_jsonl(tmp_path / "pages.jsonl", site)
    out = tmp_path / "ds"
    run_engine(inp, out, config(shard_pages=1), progress=False)
    listed = [s["path"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    assert len(listed) >= 3
    index = int(listed[1].rsplit("-", 1)[1].split(".")[0])
    (out / "_engine" / "done" / f"shard-{index:05d}.json").unlink()  # as a kill leaves it: that shard not done
    (out / listed[1]).unlink()
    stale = out / "shards" / f".part-{index:05d}.4242-0badf00d.jsonl.tmp"  # a killed writer's half file
    stale.write_text('{"id": "half')
    run_engine(inp, out, config(shard_pages=1), progress=False)
    assert not stale.exists() and not list((out / "shards").glob(".part-*.tmp"))
    assert [s["path"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == listed
    assert len(list(Dataset(out))) == sum(s["num_records"] for s in json.loads((out / "manifest.json").read_text())["shards"])


def _dies_on_task(task: tuple[int, str, int]) -> int:
    """Dies (SIGKILL, as the OOM killer kills) the first ``deaths`` times it runs task ``n``; else returns n."""
    n, marks, deaths = task
    if n == 2:
        tries = Path(marks) / "tries"
        count = len(tries.read_text()) if tries.exists() else 0
        tries.write_text("x" * (count + 1))
        if count < deaths:
            os.kill(os.getpid(), signal.SIGKILL)
    return n


def test_a_worker_killed_mid_task_runs_its_tasks_again_and_twice_stops_the_run_by_name(tmp_path):
    """Session 14 audit: one worker killed (the OOM killer) broke the process pool and ended the whole run with a
    74-line BrokenProcessPool traceback. Now the unfinished tasks run again in a fresh pool, in order; a task in
    flight at two deaths in a row stops the run with an EngineError that says how to resume."""
    (tmp_path / "once").mkdir()
    tasks = [(n, str(tmp_path / "once"), 1) for n in range(6)]
    assert list(LocalExecutor(2).map_ordered(_dies_on_task, tasks)) == list(range(6))
    (tmp_path / "always").mkdir()
    tasks = [(n, str(tmp_path / "always"), 99) for n in range(6)]
    with pytest.raises(EngineError, match=r"died twice with shard task [1-3] of 6 unfinished.*rerun the same command"):
        list(LocalExecutor(2).map_ordered(_dies_on_task, tasks))
