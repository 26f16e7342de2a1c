"""HTML view: pagination, inline order, target marking, escaping of untrusted text, image links."""

from __future__ import annotations

import base64
import json
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from duetgen.data.dataset import Dataset, DatasetWriter
from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.data.view import page_html, render_dataset_html, render_record_html

EVIL = '<script>alert("x")</script><img src=x onerror="alert(1)">'


class Tags(HTMLParser):
    """Collects every start tag with its attributes (what a browser would build)."""

    def __init__(self, text):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag):
        return [a for t, a in self.tags if t == tag]


def make(root, n=7, evil=False):
    with DatasetWriter(root, shard_size=3, name="viewtest") as w:
        for i in range(n):
            text = EVIL if evil else f"question {i}"
            w.write(Record(id=f"rec-{i}", source="toyworld", meta={"i": i, "why": EVIL if evil else "ok"}, messages=[
                Message("system", [TextPart("sys prompt")]),
                Message("user", [TextPart(text), ImagePart(Image.new("RGB", (16, 16), (200, i, 0)))]),
                Message("assistant", [TextPart("Step 1: first"), ImagePart(Image.new("RGB", (16, 16), (0, 200, i))),
                                      TextPart("Step 2: second"), ImagePart(Image.new("RGB", (16, 16), (i, 0, 200)))]),
            ]))
    return Dataset(root)


def test_pagination_files_and_links(tmp_path):
    make(tmp_path / "ds")
    out = tmp_path / "out" / "view.html"
    pages = render_dataset_html(tmp_path / "ds", out, per_page=3, progress=False)
    assert pages == [out, out.with_name("view-page-0002.html"), out.with_name("view-page-0003.html")]
    texts = [p.read_text() for p in pages]
    assert [t.count('<article class="record"') for t in texts] == [3, 3, 1]
    assert "rec-0" in texts[0] and "rec-3" in texts[1] and "rec-6" in texts[2] and "rec-3" not in texts[0]
    links = [[a["href"] for a in Tags(t).find("a")] for t in texts]
    assert "view-page-0002.html" in links[0] and "view.html" not in links[0]  # no prev on page 1
    assert {"view.html", "view-page-0003.html"} <= set(links[1])
    assert "view-page-0002.html" in links[2]
    assert [a.get("rel") for a in Tags(texts[1]).find("a") if a.get("rel")][:2] == ["prev", "next"]
    assert len(render_dataset_html(tmp_path / "ds", out, per_page=3, limit=4, progress=False)) == 2
    assert not out.with_name("view-page-0003.html").exists()  # stale page from the longer render removed


def test_single_page_has_no_nav_and_empty_dataset(tmp_path):
    make(tmp_path / "ds", n=2)
    [page] = render_dataset_html(tmp_path / "ds", tmp_path / "one.html", progress=False)
    assert "<nav" not in page.read_text()
    with DatasetWriter(tmp_path / "empty"):
        pass
    [page] = render_dataset_html(tmp_path / "empty", tmp_path / "e.html", progress=False)
    assert "no records" in page.read_text()


def test_untrusted_text_is_inert(tmp_path):
    make(tmp_path / "ds", n=1, evil=True)
    [page] = render_dataset_html(tmp_path / "ds", tmp_path / "p.html", progress=False)
    text = page.read_text()
    tags = Tags(text)
    assert tags.find("script") == []
    assert all(not k.startswith("on") for _, attrs in tags.tags for k in attrs)
    assert [a["src"] for a in tags.find("img") if a["src"] == "x"] == []
    assert text.count("&lt;script&gt;alert(") == 2  # shown as text: in the user turn and in meta
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text


def test_a_model_written_answer_marks_its_images_as_generated_not_as_targets(tmp_path):
    """A record a model wrote (meta.generation: duetgen generate, the demo) shows its answer's images as generated
    images (they were labelled "generation target", the training data's red frame)."""
    from duetgen.data.view import render_record_html

    rec = next(iter(make(tmp_path / "ds", n=1)))
    rec.meta["generation"] = {"seed": 0}
    text = render_record_html(rec, lambda path: "x.png")
    assert [f["class"] for f in Tags(text).find("figure")] == ["input", "generated", "generated"]
    assert "generation target" not in text and text.count("generated image</figcaption>") == 2


def test_images_inline_in_order_with_targets_marked(tmp_path):
    ds = make(tmp_path / "ds", n=1)
    rec = next(iter(ds))
    out = tmp_path / "deep" / "er" / "p.html"
    [page] = render_dataset_html(tmp_path / "ds", out, progress=False)
    text = page.read_text()
    figures = Tags(text).find("figure")
    assert [f["class"] for f in figures] == ["input", "target", "target"]
    order = [text.index(s) for s in ("sys prompt", "question 0", 'class="input"', "Step 1: first",
                                      'class="target"', "Step 2: second")]
    assert order == sorted(order)
    assert text.count("generation target</figcaption>") == 2
    srcs = [a["src"] for a in Tags(text).find("img")]
    assert [s.startswith("../../ds/images/") for s in srcs] == [True] * 3  # relative to the page's folder
    for src, part in zip(srcs, rec.image_parts()):
        assert Path(os.path.normpath(out.parent / unquote(src))) == (tmp_path / "ds" / part.path)
    assert 'class="msg system"' in text and 'class="msg user"' in text and 'class="msg assistant"' in text


def test_embed_inlines_data_uris(tmp_path):
    ds = make(tmp_path / "ds", n=1)
    rec = next(iter(ds))
    [page] = render_dataset_html(tmp_path / "ds", tmp_path / "p.html", embed=True, progress=False)
    srcs = [a["src"] for a in Tags(page.read_text()).find("img")]
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for src, part in zip(srcs, rec.image_parts()):
        assert base64.b64decode(src.split(",", 1)[1]) == ds.image_path(part.path).read_bytes()


def test_meta_is_collapsible_pretty_json(tmp_path):
    make(tmp_path / "ds", n=1)
    [page] = render_dataset_html(tmp_path / "ds", tmp_path / "p.html", progress=False)
    text = page.read_text()
    assert '<details class="meta"><summary>meta</summary><pre>' in text
    assert json.dumps({"i": 0, "why": "ok"}, indent=2, sort_keys=True).replace('"', "&quot;") in text


def test_missing_and_escaping_images_are_shown_as_errors(tmp_path):
    ds = make(tmp_path / "ds", n=1)
    rec = next(iter(ds))
    first, second = rec.image_parts()[0].path, rec.image_parts()[1].path
    os.remove(ds.root / first)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    os.remove(ds.root / second)
    os.symlink(secret, ds.root / second)
    [page] = render_dataset_html(tmp_path / "ds", tmp_path / "p.html", progress=False)
    text = page.read_text()
    assert text.count('class="broken"') == 2
    assert "not found" in text and "resolves outside the dataset root" in text
    assert len(Tags(text).find("img")) == 1  # only the intact image


def test_record_fragment_and_page_reusable(tmp_path):
    rec = Record(id="gen-1", source="generation", messages=[
        Message("user", [TextPart("Draw a purple square at the bottom.")]),
        Message("assistant", [TextPart("Here it is."), ImagePart("images/ab/out.png")])])
    fragment = render_record_html(rec, image_src=lambda p: "https://cdn.example/" + p, index=3)
    assert fragment.startswith('<article class="record" id="rec-gen-1">') and "#3" in fragment
    assert '<img src="https://cdn.example/images/ab/out.png"' in fragment
    page = page_html("Generations <v1>", fragment)
    assert page.startswith("<!DOCTYPE html>") and "<title>Generations &lt;v1&gt;</title>" in page
    assert "<style>" in page and "http" not in page.split("<main>")[0]  # no external assets


def test_bad_arguments(tmp_path):
    make(tmp_path / "ds", n=1)
    with pytest.raises(ValueError, match="per_page"):
        render_dataset_html(tmp_path / "ds", tmp_path / "p.html", per_page=0)


def test_cli_view(tmp_path):
    from typer.testing import CliRunner

    from duetgen.cli import app

    make(tmp_path / "ds", n=5)
    runner = CliRunner()
    res = runner.invoke(app, ["data", "view", str(tmp_path / "ds"), "--out", str(tmp_path / "v.html"),
                              "--per-page", "2", "--limit", "3", "--embed"])
    assert res.exit_code == 0, res.output
    printed = [line for line in res.stdout.splitlines() if line.endswith(".html")]
    assert printed == [str(tmp_path / "v.html"), str(tmp_path / "v-page-0002.html")]
    assert "data:image/png;base64," in (tmp_path / "v.html").read_text()
    (tmp_path / "notds").mkdir()
    res = runner.invoke(app, ["data", "view", str(tmp_path / "notds"), "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "no manifest.json" in res.output and "Traceback" not in res.output
    (tmp_path / "notds" / "manifest.json").write_text("[1, 2")
    res = runner.invoke(app, ["data", "view", str(tmp_path / "notds"), "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "unreadable manifest" in res.output
    # an audit: --out ds/manifest.json wrote the page over the manifest (every later command failed)
    manifest = (tmp_path / "ds" / "manifest.json").read_text()
    for inside in ("manifest.json", "images/x.html", "shards/part-00009.jsonl"):
        res = runner.invoke(app, ["data", "view", str(tmp_path / "ds"), "--out", str(tmp_path / "ds" / inside)])
        assert res.exit_code == 2 and "one of the dataset's own files" in res.output, inside
    assert (tmp_path / "ds" / "manifest.json").read_text() == manifest
    res = runner.invoke(app, ["data", "view", str(tmp_path / "ds"), "--out", str(tmp_path / "notds")])
    assert res.exit_code == 2 and "is a folder; give the page's file name" in res.output
    res = runner.invoke(app, ["data", "view", str(tmp_path / "ds"), "--out", str(tmp_path / "ds" / "index.html")])
    assert res.exit_code == 0, res.output  # beside the dataset's files is fine (stage 1 writes its pages there)


def test_broken_image_is_named_by_its_record(tmp_path):
    """Issue 15 item 9: `data view` said record '?' for the record whose image was broken."""
    ds = make(tmp_path / "ds", n=2)
    second = list(ds)[1]
    os.remove(ds.root / second.image_parts()[0].path)
    for embed in (False, True):
        [page] = render_dataset_html(tmp_path / "ds", tmp_path / f"p{embed}.html", embed=embed, progress=False)
        text = page.read_text()
        assert "record &#x27;rec-1&#x27;: image" in text and "not found" in text
        assert "&#x27;?&#x27;" not in text


def test_hostile_datasets_render_with_the_damage_shown_in_place(tmp_path):
    """An audit: --embed inlined one image per reference without bound (11 MB on disk, 280 MB of page); the
    link mode handed the browser any file; a megabyte text part took Chromium minutes; one bad line, a
    deeply nested one or a FIFO shard stopped (or hung) the whole view."""
    ds = make(tmp_path / "ds", n=5)
    rec = next(iter(ds))
    img = rec.image_parts()[0].path
    shard = ds.root / ds.shards[0]
    lines = shard.read_text().splitlines()
    many = json.loads(lines[0])
    many["id"] = "many"
    many["messages"][2]["content"] = [{"type": "image", "image": img}] * 30
    lines[1] = json.dumps(many)
    lines[2] = '{"id": "deep", "meta": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"  # RecursionError before
    shard.write_text("\n".join(lines) + "\n")
    more = (ds.root / ds.shards[1]).read_bytes().split(b"\n")  # a byte that is not UTF-8 stopped the page
    more[0] = more[0].replace(b"question", b"qu\xffstion")
    (ds.root / ds.shards[1]).write_bytes(b"\n".join(more))
    Image.new("1", (9000, 9000)).save(ds.root / "images" / "bomb.png")  # 81 MP, over the 40 MP cap
    long_text = "A" * 50_000
    with DatasetWriter(tmp_path / "ds2") as w:
        w.write(Record("long", [Message("user", [TextPart(long_text)]),
                                Message("assistant", [ImagePart(Image.new("RGB", (8, 8)))])]))
    bomb = json.loads(lines[0])
    bomb["id"] = "bomb"
    bomb["messages"][2]["content"].append({"type": "image", "image": "images/bomb.png"})
    lines[0] = json.dumps(bomb)
    shard.write_text("\n".join(lines) + "\n")

    from duetgen.data.images import ImageError
    from duetgen.data.view import dataset_image_src

    src = dataset_image_src(Dataset(ds.root), tmp_path, embed=True, embed_budget=10 * (ds.root / img).stat().st_size)
    for _ in range(10):
        src(img, "many")
    with pytest.raises(ImageError, match="not embedded: the page's images would pass"):
        src(img, "many")
    for embed in (False, True):
        [page] = render_dataset_html(ds.root, tmp_path / f"p{embed}.html", embed=embed, progress=False)
        text = page.read_text()
        assert "#3: record cannot be shown" in text and "JSON nested too deeply" in text
        assert "#4: record cannot be shown" in text and "part-00001.jsonl:1: not valid UTF-8" in text
        assert "rec-4" in text and "many" in text  # the records around them render
        assert "too many pixels" in text or "over the cap" in text  # the bomb is a red box, never an <img>
        assert not any("bomb" in a["src"] for a in Tags(text).find("img"))
    [page] = render_dataset_html(tmp_path / "ds2", tmp_path / "long.html", progress=False)
    text = page.read_text()
    assert "A" * 20_000 in text and "A" * 20_001 not in text and "30,000 more characters not shown" in text

    fifo_ds = make(tmp_path / "fifo", n=1)
    fifo = fifo_ds.root / fifo_ds.shards[0]
    fifo.unlink()
    os.mkfifo(fifo)
    from duetgen.data.dataset import DatasetError

    with pytest.raises(DatasetError, match="not a regular file"):  # it blocked forever before
        list(Dataset(fifo_ds.root))
