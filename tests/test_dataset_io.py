"""DatasetWriter / Dataset: layout, content addressing, atomicity (real SIGKILL), every bad input."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zlib
import struct
from pathlib import Path

import pytest
from PIL import Image

from duetgen.data.dataset import Dataset, DatasetError, DatasetWriter
from duetgen.data.images import ImageError
from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart

REPO = Path(__file__).resolve().parents[1]
STORED_RE = re.compile(r"^images/([0-9a-f]{2})/([0-9a-f]{64})\.(png|jpg|webp|gif)$")


def solid(color, size=(12, 10), mode="RGB"):
    return Image.new(mode, size, color)


def encoded(im, fmt):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _part(p):
    """str -> text, ImagePart as given (a stored path), anything else -> an in-memory image."""
    return TextPart(p) if isinstance(p, str) else p if isinstance(p, ImagePart) else ImagePart(p)


def rec(rid, *user_parts, answer=("ok",), source="test", meta=None):
    user = [_part(p) for p in user_parts] or [TextPart("q")]
    asst = [_part(p) for p in answer]
    return Record(id=rid, source=source, meta=meta or {},
                  messages=[Message("system", [TextPart("be brief")]), Message("user", user), Message("assistant", asst)])


def write_shard_lines(root: Path, lines: list[str], name="part-00000.jsonl"):
    """Hand-craft a dataset whose single shard holds ``lines`` (for reader bad-input tests)."""
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "shards" / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    manifest = {"format": "duetgen-interleaved", "format_version": 1, "name": None, "created": "x", "updated": "x",
                "num_records": len(lines), "shards": [{"path": f"shards/{name}", "num_records": len(lines)}]}
    (root / "manifest.json").write_text(json.dumps(manifest))


def line(rid, image_path=None, role="user", part_type="text"):
    content = [{"type": part_type, "text": "hello"}]
    if image_path is not None:
        content.append({"type": "image", "image": image_path})
    return json.dumps({"id": rid, "source": "t", "messages": [{"role": role, "content": content}], "meta": {}})


# --------------------------------------------------------------------------------- round trip
def test_round_trip_layout_and_manifest(tmp_path):
    root = tmp_path / "ds"
    red, blue = solid((255, 0, 0)), solid((0, 0, 255), size=(8, 8))
    jpeg = encoded(blue, "JPEG")
    records = [rec(f"r{i}", f"question {i}", red, answer=(f"step {i}", jpeg, "done"), meta={"i": i}) for i in range(7)]
    with DatasetWriter(root, shard_size=3, name="toy") as w:
        for r in records:
            w.write(r)
    assert sorted(p.name for p in (root / "shards").iterdir()) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    m = json.loads((root / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["name"] == "toy" and m["num_records"] == 7
    assert [s["num_records"] for s in m["shards"]] == [3, 3, 1]
    assert m["created"] and m["updated"]

    ds = Dataset(root)
    assert len(ds) == 7 and ds.name == "toy"
    back = list(ds)
    assert [r.id for r in back] == [f"r{i}" for i in range(7)]
    for r, orig in zip(back, records):
        assert r.to_json() == orig.to_json()  # writer replaced in-memory images by their paths
        user_img, asst_img = r.image_parts()
        assert STORED_RE.match(user_img.path).group(3) == "png"  # PIL -> lossless PNG
        assert STORED_RE.match(asst_img.path).group(3) == "jpg"  # bytes keep their format
        assert asst_img.path == r.image_parts("assistant")[0].path
    im = ds.open_image(back[0].image_parts()[0].path, record_id="r0")
    assert im.mode == "RGB" and im.size == (12, 10) and im.getpixel((3, 3)) == (255, 0, 0)
    assert ds.image_path(back[0].image_parts()[1].path, record_id="r0").read_bytes() == jpeg


def test_content_addressing_stores_same_bytes_once(tmp_path):
    root = tmp_path / "ds"
    green = solid((0, 200, 0))
    gif = encoded(solid((1, 2, 3)), "GIF")
    with DatasetWriter(root) as w:
        a = w.add_image(green)
        b = w.add_image(solid((0, 200, 0)))  # equal pixels, different object
        c = w.add_image(encoded(green, "PNG"))  # same PNG bytes handed in directly
        w.write(rec("x", green, gif, answer=("a", gif)))
        w.write(rec("y", green))
    assert a == b == c
    m = STORED_RE.match(a)
    assert m.group(1) == m.group(2)[:2]
    import hashlib
    assert hashlib.sha256((root / a).read_bytes()).hexdigest() == m.group(2)
    files = [p for p in (root / "images").rglob("*") if p.is_file()]
    assert len(files) == 2  # one PNG, one GIF
    assert sorted(p.suffix for p in files) == [".gif", ".png"]


def test_existing_relative_path_is_kept(tmp_path):
    root = tmp_path / "ds"
    with DatasetWriter(root) as w:
        rel = w.add_image(encoded(solid((9, 9, 9)), "WEBP"))
        assert rel.endswith(".webp")
        w.write(rec("a", ImagePart(rel)))
    assert list(Dataset(root))[0].image_parts()[0].path == rel


def test_shard_is_invisible_until_committed(tmp_path):
    root = tmp_path / "ds"
    w = DatasetWriter(root, shard_size=2)
    w.write(rec("a"))
    assert len(Dataset(root)) == 0 and list(Dataset(root)) == []  # the open shard is a tmp file
    assert list((root / "shards").glob(".part-00000.jsonl.tmp"))
    w.write(rec("b"))
    assert [r.id for r in Dataset(root)] == ["a", "b"]
    w.close()
    assert not list((root / "shards").glob(".*.tmp"))


def test_append_continues_with_new_shard_numbers(tmp_path):
    root = tmp_path / "ds"
    with DatasetWriter(root, shard_size=2) as w:
        for i in range(3):
            w.write(rec(f"a{i}"))
    with pytest.raises(DatasetError, match="append=True"):
        DatasetWriter(root)
    with DatasetWriter(root, shard_size=2, append=True, name="renamed") as w:
        for i in range(2):
            w.write(rec(f"b{i}"))
    ds = Dataset(root)
    assert ds.shards == ["shards/part-00000.jsonl", "shards/part-00001.jsonl", "shards/part-00002.jsonl"]
    assert [r.id for r in ds] == ["a0", "a1", "a2", "b0", "b1"] and len(ds) == 5 and ds.name == "renamed"


def test_second_concurrent_writer_is_refused(tmp_path):
    with DatasetWriter(tmp_path / "ds"):
        with pytest.raises(DatasetError, match="another DatasetWriter"):
            DatasetWriter(tmp_path / "ds", append=True)


# --------------------------------------------------------------------------------- atomicity
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from PIL import Image
    from duetgen.data.dataset import DatasetWriter
    from duetgen.data.record import ImagePart, Message, Record, TextPart
    root, signal_file = Path(sys.argv[1]), Path(sys.argv[2])
    with DatasetWriter(root, shard_size=10) as w:
        for i in range(1000):
            im = Image.new("RGB", (8, 8), (i % 256, 0, 0))
            w.write(Record(id=f"r{i}", messages=[Message("user", [TextPart("x" * 4000)]),
                                                 Message("assistant", [TextPart("y"), ImagePart(im)])]))
            if i == 14:  # 5 records into the second shard, > 8 KiB of it already handed to the OS
                signal_file.write_text("mid-shard")
                time.sleep(60)
""")


@pytest.mark.slow
def test_sigkill_mid_shard_leaves_only_complete_shards(tmp_path):
    root, signal_file = tmp_path / "ds", tmp_path / "signal"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(signal_file)], env=env)
    try:
        deadline = time.time() + 20
        while not signal_file.exists():
            assert child.poll() is None, "child writer exited early"
            assert time.time() < deadline, "child never reached the middle of a shard"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    tmp = root / "shards" / ".part-00001.jsonl.tmp"
    assert tmp.exists() and tmp.stat().st_size > 0  # a half shard really was on disk
    assert sorted(p.name for p in (root / "shards").glob("part-*")) == ["part-00000.jsonl"]

    ds = Dataset(root)
    assert len(ds) == 10 and ds.shards == ["shards/part-00000.jsonl"]
    committed = list(ds)
    assert [r.id for r in committed] == [f"r{i}" for i in range(10)]
    for r in committed:  # every committed record's image is complete
        ds.open_image(r.image_parts()[0].path, record_id=r.id)

    with DatasetWriter(root, shard_size=10, append=True) as w:
        assert not tmp.exists()  # the stray tmp is cleaned on append
        w.write(rec("r10"))  # id of a lost record: it was never committed, so it can be written again
    ds = Dataset(root)
    assert [r.id for r in ds] == [f"r{i}" for i in range(11)]
    assert ds.shards == ["shards/part-00000.jsonl", "shards/part-00001.jsonl"]
    assert [r.to_json() for r in list(ds)[:10]] == [r.to_json() for r in committed]


def test_orphan_shard_not_in_manifest_is_ignored_and_cleaned(tmp_path):
    """A kill between the shard rename and the manifest commit leaves an unlisted part file."""
    root = tmp_path / "ds"
    with DatasetWriter(root, shard_size=2) as w:
        w.write(rec("a"))
        w.write(rec("b"))
    orphan = root / "shards" / "part-00001.jsonl"
    orphan.write_text(rec("ghost").to_jsonl_line() + "\n")
    assert [r.id for r in Dataset(root)] == ["a", "b"]
    with DatasetWriter(root, append=True) as w:
        assert not orphan.exists()
        w.write(rec("c"))
    assert [r.id for r in Dataset(root)] == ["a", "b", "c"]


# --------------------------------------------------------------------------------- write errors
def test_write_rejects_non_image_bytes_naming_record(tmp_path):
    with DatasetWriter(tmp_path / "ds") as w:
        with pytest.raises(RecordError, match=r"record 'bad'.*not a readable image"):
            w.write(rec("bad", b"this is not an image"))


def test_write_rejects_truncated_image_bytes(tmp_path):
    data = encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with DatasetWriter(tmp_path / "ds") as w:
        with pytest.raises(ImageError, match=r"record 'cut'"):
            w.write(rec("cut", data[: len(data) // 2]))


def test_write_rejects_unsupported_format(tmp_path):
    with DatasetWriter(tmp_path / "ds") as w:
        with pytest.raises(ImageError, match=r"record 'bmp'.*unsupported image format 'BMP'"):
            w.write(rec("bmp", encoded(solid((1, 1, 1)), "BMP")))


def test_write_rejects_duplicate_id(tmp_path):
    with DatasetWriter(tmp_path / "ds") as w:
        w.write(rec("same"))
        with pytest.raises(RecordError, match=r"record 'same': duplicate id"):
            w.write(rec("same"))
    assert len(Dataset(tmp_path / "ds")) == 1


def test_write_rejects_invalid_record_naming_it(tmp_path):
    bad = rec("badrole")
    bad.messages[1].role = "narrator"
    with DatasetWriter(tmp_path / "ds") as w:
        with pytest.raises(RecordError, match=r"record 'badrole'.*unknown role 'narrator'"):
            w.write(bad)


@pytest.mark.parametrize("path, why", [
    ("../outside.png", "leaves the dataset root"),
    ("/etc/passwd", "absolute"),
    ("https://example.com/a.png", "URL"),
    ("images/aa/missing.png", "not found"),
])
def test_write_rejects_bad_stored_paths(tmp_path, path, why):
    with DatasetWriter(tmp_path / "ds") as w:
        with pytest.raises(RecordError, match=rf"record 'p'.*{why}"):
            w.write(rec("p", ImagePart(path)))


def test_write_rejects_image_over_pixel_cap(tmp_path):
    with DatasetWriter(tmp_path / "ds", max_pixels=100) as w:
        with pytest.raises(ImageError, match=r"record 'big'.*over the cap of 100"):
            w.write(rec("big", solid((0, 0, 0), size=(11, 10))))
        with pytest.raises(ImageError, match=r"record 'bigbytes'.*over the cap"):
            w.write(rec("bigbytes", encoded(solid((0, 0, 0), size=(11, 10)), "PNG")))
        w.write(rec("ok", solid((0, 0, 0), size=(10, 10))))


def test_not_a_dataset_and_bad_manifest(tmp_path):
    with pytest.raises(DatasetError, match="no such directory"):
        Dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no manifest.json"):
        Dataset(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="unreadable manifest"):
        Dataset(bad)
    (bad / "manifest.json").write_text('{"format": "duetgen-interleaved", "format_version": ' + "9" * 5000 + "}")
    with pytest.raises(DatasetError, match="unreadable manifest.*4300"):  # (json's int cap: a ValueError)
        Dataset(bad)
    (bad / "manifest.json").write_text(json.dumps({"format": "duetgen-interleaved", "format_version": 99}))
    with pytest.raises(DatasetError, match="unsupported format_version 99"):
        Dataset(bad)
    (bad / "manifest.json").write_text(json.dumps({"format": "duetgen-interleaved", "format_version": 1, "num_records": 1,
                                                   "shards": [{"path": "../../etc/passwd", "num_records": 1}]}))
    with pytest.raises(DatasetError, match=r"shards\[0\]"):
        Dataset(bad)


# --------------------------------------------------------------------------------- read errors
def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    write_shard_lines(tmp_path, [line("a"), '{"id": "b", "messages": [', line("c")])
    it = iter(Dataset(tmp_path))
    assert next(it).id == "a"
    with pytest.raises(DatasetError, match=r"part-00000\.jsonl:2: malformed JSON"):
        next(it)


def test_unknown_role_and_part_type_name_record_and_line(tmp_path):
    write_shard_lines(tmp_path, [line("a"), line("b", role="robot")])
    with pytest.raises(RecordError, match=r"part-00000\.jsonl:2: record 'b'.*unknown role 'robot'"):
        list(Dataset(tmp_path))
    write_shard_lines(tmp_path, [line("z", part_type="video")])
    with pytest.raises(RecordError, match=r"part-00000\.jsonl:1: record 'z'.*unknown part type 'video'"):
        list(Dataset(tmp_path))


@pytest.mark.parametrize("path, why", [
    ("/etc/hosts", "absolute"),
    ("file:///etc/hosts", "URL"),
    ("images/../../secret.png", "leaves the dataset root"),
])
def test_reader_refuses_escaping_paths_in_shards(tmp_path, path, why):
    write_shard_lines(tmp_path, [line("esc", image_path=path)])
    with pytest.raises(RecordError, match=rf":1: record 'esc'.*{why}"):
        list(Dataset(tmp_path))


def test_missing_image_names_record_and_path(tmp_path):
    write_shard_lines(tmp_path, [line("m", image_path="images/ab/gone.png")])
    ds = Dataset(tmp_path)
    r = next(iter(ds))
    with pytest.raises(ImageError, match=r"record 'm': image 'images/ab/gone.png' not found"):
        ds.open_image(r.image_parts()[0].path, record_id=r.id)


def test_unreadable_image_names_record_and_path(tmp_path):
    (tmp_path / "images" / "ab").mkdir(parents=True)
    (tmp_path / "images" / "ab" / "junk.png").write_bytes(b"\x89PNG garbage")
    write_shard_lines(tmp_path, [line("j", image_path="images/ab/junk.png")])
    ds = Dataset(tmp_path)
    with pytest.raises(ImageError, match=r"record 'j': image 'images/ab/junk.png': not a readable image"):
        ds.open_image("images/ab/junk.png", record_id="j")


def test_symlink_leaving_root_is_refused(tmp_path):
    secret = tmp_path / "secret.png"
    solid((5, 5, 5)).save(secret)
    root = tmp_path / "ds"
    (root / "images" / "ab").mkdir(parents=True)
    os.symlink(secret, root / "images" / "ab" / "link.png")
    os.symlink(tmp_path, root / "images" / "up")  # a directory link, too
    write_shard_lines(root, [line("s", image_path="images/ab/link.png")])
    ds = Dataset(root)
    assert next(iter(ds)).id == "s"  # the path string itself is fine; resolving it is not
    for p in ("images/ab/link.png", "images/up/secret.png"):
        with pytest.raises(ImageError, match=rf"record 's': image path '{p}' resolves outside the dataset root"):
            ds.open_image(p, record_id="s")
        with pytest.raises(ImageError, match="resolves outside"):
            ds.image_path(p, record_id="s")
    with DatasetWriter(root, append=True) as w:  # the writer applies the same check to stored paths
        with pytest.raises(ImageError, match="resolves outside"):
            w.write(rec("s2", ImagePart("images/ab/link.png")))


def png_header_only(width, height):
    """A PNG whose header claims ``width`` x ``height`` but that holds no pixel data at all."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_pixel_cap_is_checked_on_header_before_decoding(tmp_path):
    (tmp_path / "images" / "ab").mkdir(parents=True)
    (tmp_path / "images" / "ab" / "huge.png").write_bytes(png_header_only(8000, 6000))  # 48 MP > 40 MP default
    write_shard_lines(tmp_path, [line("huge", image_path="images/ab/huge.png")])
    ds = Dataset(tmp_path)
    # Decoding would fail with "not readable" (there is no pixel data); the cap fires first.
    with pytest.raises(ImageError, match=r"record 'huge'.*8000x6000 = 48,000,000 pixels, over the cap of 40,000,000"):
        ds.open_image("images/ab/huge.png", record_id="huge")
    small = Dataset(tmp_path, max_pixels=50_000_000)  # configurable: now it gets to decoding, and fails there
    with pytest.raises(ImageError, match=r"record 'huge'.*not a readable image"):
        small.open_image("images/ab/huge.png", record_id="huge")


def test_decompression_bomb_error_is_guarded(tmp_path):
    (tmp_path / "images" / "ab").mkdir(parents=True)
    (tmp_path / "images" / "ab" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    write_shard_lines(tmp_path, [line("bomb", image_path="images/ab/bomb.png")])
    ds = Dataset(tmp_path, max_pixels=10**12)  # our cap lifted: PIL's own bomb check must still be turned into ours
    with pytest.raises(ImageError, match=r"record 'bomb'.*decompression bomb"):
        ds.open_image("images/ab/bomb.png", record_id="bomb")


def test_shard_count_mismatch_and_missing_shard(tmp_path):
    write_shard_lines(tmp_path, [line("a"), line("b")])
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["num_records"] = 3
    m["num_records"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="holds 2 records but the manifest says 3"):
        list(Dataset(tmp_path))
    (tmp_path / "shards" / "part-00000.jsonl").unlink()
    with pytest.raises(DatasetError, match="part-00000.jsonl: shard listed in the manifest cannot be opened"):
        list(Dataset(tmp_path))


def test_open_image_composites_transparency_on_white(tmp_path):
    with DatasetWriter(tmp_path / "ds") as w:
        r = rec("t", solid((255, 0, 0, 0), mode="RGBA"))
        w.write(r)
    im = Dataset(tmp_path / "ds").open_image(r.image_parts()[0].path, record_id="t")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)


def test_exception_in_with_block_keeps_written_records(tmp_path):
    with pytest.raises(KeyError):
        with DatasetWriter(tmp_path / "ds", shard_size=10) as w:
            w.write(rec("a"))
            w.write(rec("b"))
            raise KeyError("pipeline bug")
    assert [r.id for r in Dataset(tmp_path / "ds")] == ["a", "b"]  # both were validated before the failure
    with pytest.raises(RuntimeError, match="closed"):
        w.write(rec("c"))


def test_image_file_over_byte_cap_is_refused_before_reading(tmp_path):
    with DatasetWriter(tmp_path / "ds") as w:
        r = rec("b", solid((1, 2, 3)))
        w.write(r)
    path = r.image_parts()[0].path
    ds = Dataset(tmp_path / "ds", max_image_bytes=10)
    with pytest.raises(ImageError, match=r"record 'b': image '.*': file is \d+ bytes, over the cap of 10"):
        ds.read_image_bytes(path, record_id="b")
    assert Dataset(tmp_path / "ds").read_image_bytes(path, record_id="b") == (tmp_path / "ds" / path).read_bytes()


# --------------------------------------------------------------------------------- issue 15: hostile datasets
def _duetgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / ".venv" / "bin" / "duetgen"), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_shard_or_manifest_symlinked_out_of_the_root_is_refused_by_every_reader(tmp_path):
    """Issue 15 item 4: export-parquet, data view and eval toyworld read a shard that was a symlink out."""
    from duetgen.shapeworld import world

    world.generate(tmp_path / "truth", 2, split="test", progress=False)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("shard-out", "manifest-out"):
        ds = tmp_path / name
        subprocess.run(["cp", "-r", str(tmp_path / "truth"), str(ds)], check=True)
        rel = "manifest.json" if name == "manifest-out" else Dataset(ds).shards[0]
        moved = outside / f"{name}-{Path(rel).name}"
        os.replace(ds / rel, moved)
        os.symlink(moved, ds / rel)  # the file itself is fine; only where it lives is wrong
        with pytest.raises(DatasetError, match="resolves outside the dataset root"):
            list(Dataset(ds))
        runs = {"export-parquet": _duetgen("data", "export-parquet", str(ds), str(tmp_path / f"{name}.parquet")),
                "data view": _duetgen("data", "view", str(ds), "--out", str(tmp_path / f"{name}.html")),
                "eval toyworld": _duetgen("eval", "toyworld", "--pred", str(ds), "--truth", str(tmp_path / "truth"))}
        for cmd, r in runs.items():
            assert r.returncode == 2, (cmd, r.stdout[-500:], r.stderr[-1000:])
            assert "resolves outside the dataset root" in r.stderr and rel in r.stderr, (cmd, r.stderr)
            assert "Traceback" not in r.stderr
        assert not (tmp_path / f"{name}.parquet").exists() and not (tmp_path / f"{name}.html").exists()


def test_unreadable_bytes_error_names_the_record_not_a_buffer(tmp_path):
    """Issue 15 item 9: PIL's message was `cannot identify image file <_io.BytesIO object at 0x...>`."""
    with DatasetWriter(tmp_path / "ds") as w:
        with pytest.raises(ImageError) as e:
            w.write(rec("junk-7", b"GIF89 but not really an image at all"))
    assert "record 'junk-7'" in str(e.value) and "BytesIO" not in str(e.value) and "0x" not in str(e.value)


# --------------------------------------------------------------------------------- bytes decoded once (issue 18)
def noisy_jpeg(size=(96, 64), quality=90, progressive=False):
    return encoded_jpeg(Image.effect_noise(size, 60).convert("RGB"), quality, progressive)


def encoded_jpeg(im, quality=90, progressive=False):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, progressive=progressive)
    return buf.getvalue()


def test_verified_bytes_are_stored_as_they_are_without_a_second_decode(tmp_path, monkeypatch):
    from duetgen.data import dataset
    from duetgen.data.images import VerifiedImageBytes, decode_image_bytes

    data = noisy_jpeg()
    verified, rgb = decode_image_bytes(data, "photo")
    assert isinstance(verified, VerifiedImageBytes) and verified == data
    assert (verified.format, verified.size, rgb.mode, rgb.size) == ("JPEG", (96, 64), "RGB", (96, 64))

    def no_decode(*a, **k):
        raise AssertionError("the writer decoded verified bytes again")

    monkeypatch.setattr(dataset, "inspect_image", no_decode)
    with DatasetWriter(tmp_path / "ds") as w:
        w.write(rec("v", verified))
        with pytest.raises(AssertionError, match="decoded verified bytes again"):  # plain bytes: still decoded
            w.write(rec("plain", noisy_jpeg(quality=80)))
    monkeypatch.undo()
    ds = Dataset(tmp_path / "ds")
    (part,) = next(iter(ds)).image_parts("user")
    assert STORED_RE.match(part.path).group(3) == "jpg"
    assert ds.read_image_bytes(part.path, "v", decode=True) == data  # byte-identical, and it decodes


def test_verified_bytes_still_meet_the_writers_own_pixel_cap(tmp_path):
    from duetgen.data.images import decode_image_bytes

    verified, _ = decode_image_bytes(noisy_jpeg((11, 10)), "photo")
    with DatasetWriter(tmp_path / "ds", max_pixels=100) as w:
        with pytest.raises(ImageError, match=r"record 'big'.*over the cap of 100"):
            w.write(rec("big", verified))


@pytest.mark.parametrize("progressive", [False, True])
def test_decode_image_bytes_refuses_what_the_writer_refuses(progressive):
    """Only a full decode makes VerifiedImageBytes: a cut JPEG, a bomb, a BMP never become one."""
    from duetgen.data.images import decode_image_bytes

    data = noisy_jpeg((200, 150), progressive=progressive)
    for cut in (len(data) // 3, len(data) // 2, len(data) - 200):
        with pytest.raises(ImageError, match=r"cut.jpg: not a readable image") as e:
            decode_image_bytes(data[:cut], "cut.jpg")
        assert e.value.reason == "corrupt_image"
    with pytest.raises(ImageError, match="over the cap of 100") as e:
        decode_image_bytes(data, "big.jpg", max_pixels=100)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(ImageError, match="unsupported image format 'BMP'") as e:
        decode_image_bytes(encoded(solid((1, 1, 1)), "BMP"), "x.bmp")
    assert e.value.reason == "unsupported_format"


def test_verified_bytes_survive_pickling():
    import pickle

    from duetgen.data.images import decode_image_bytes

    verified, _ = decode_image_bytes(noisy_jpeg(), "photo")
    back = pickle.loads(pickle.dumps(verified))
    assert back == verified and (back.format, back.size) == ("JPEG", (96, 64))


def test_a_full_disk_leaves_no_half_file_and_names_the_file(tmp_path):
    """A real write failure (the kernel's file size limit, EFBIG, standing in for a full disk): the temporary
    file is removed and the error names the file being written, for the atomic writer and for a shard."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from duetgen.data.dataset import ShardFileWriter, atomic_write_bytes
        from duetgen.data.record import Message, Record, TextPart
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() returns EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        root = Path({str(tmp_path)!r})
        try:
            atomic_write_bytes(root / "big.bin", b"x" * 10000)
        except OSError as e:
            print("atomic:", e.filename)
        w = ShardFileWriter(root / "ds", 0)
        try:
            for i in range(100):
                w.write(Record(id=f"r{{i}}", messages=[Message("user", [TextPart("x" * 200)])]))
            w.commit()
        except OSError as e:
            print("shard:", e.filename)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"atomic: {tmp_path / 'big.bin'}" in out.stdout
    assert "shard: " in out.stdout and "part-00000.jsonl" in out.stdout
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [] and not (tmp_path / "big.bin").exists()


def test_the_writer_and_the_reader_apply_one_record_line_cap(tmp_path, monkeypatch):
    """A review: the writer counted characters without the newline, the reader with it, so a line at the
    cap was written and could never be read back."""
    import duetgen.data.dataset as dataset

    def rec(n):
        return Record(id="r", messages=[Message("user", [TextPart("é" * n)])])

    size = len(rec(0).to_jsonl_line().encode())
    monkeypatch.setattr(dataset, "MAX_RECORD_LINE_BYTES", size + 40)  # 20 two-byte characters more
    with DatasetWriter(tmp_path / "ok") as w:
        w.write(rec(20))  # exactly at the cap
    assert [r.id for r in Dataset(tmp_path / "ok")] == ["r"]
    with DatasetWriter(tmp_path / "over") as w:
        with pytest.raises(RecordError, match="over the cap"):
            w.write(rec(21))


def test_a_failed_write_never_commits_half_a_record_and_the_dataset_stays_readable(tmp_path, monkeypatch):
    """An audit: a full disk (or `ulimit -f`) mid-record left half a line in the open shard, and leaving the
    `with` block committed it: every reader then refused the dataset, and an append kept the broken shard."""
    import errno

    def rec(i):
        return Record(id=f"r{i}", messages=[Message("user", [TextPart(f"text {i} " + "x" * 200)])])

    with DatasetWriter(tmp_path / "d", shard_size=3) as w:
        for i in range(3):
            w.write(rec(i))  # one committed shard
    class FullDisk:  # writes half of the fifth line, then the disk is full
        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, s):
            self.lines += 1
            if self.lines == 2:
                self.f.write(s[: len(s) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(s)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_open_shard = DatasetWriter._open_shard

    def open_shard(self):
        real_open_shard(self)
        self._shard_file = FullDisk(self._shard_file)

    monkeypatch.setattr(DatasetWriter, "_open_shard", open_shard)
    with pytest.raises(OSError, match="the open shard's records were not committed") as err:
        with DatasetWriter(tmp_path / "d", shard_size=3, append=True) as w:
            for i in range(3, 6):
                w.write(rec(i))
    assert ".part-" in err.value.filename  # the error names the shard
    monkeypatch.undo()
    assert [r.id for r in Dataset(tmp_path / "d")] == ["r0", "r1", "r2"]  # readable, the open shard dropped
    with DatasetWriter(tmp_path / "d", shard_size=3, append=True) as w:  # and the writer's rerun succeeds
        for i in range(3, 6):
            w.write(rec(i))
    assert len(list(Dataset(tmp_path / "d"))) == 6


def test_hostile_manifest_counts_shard_numbers_past_99999_surrogates_and_a_shards_link(tmp_path):
    import duetgen.data.dataset as dataset

    with DatasetWriter(tmp_path / "d") as w:
        w.write(Record(id="a", messages=[Message("user", [TextPart("hi")])]))
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    m["shards"][0]["num_records"] = m["num_records"] = 10 ** 20  # an OverflowError in `data view`, `data mix`
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=r"num_records must be an integer in 0\.\.100,000,000"):
        Dataset(tmp_path / "d")
    w = DatasetWriter(tmp_path / "big")  # shard 100,000 is named part-100000: the reader took only 5 digits
    w._next_shard = 99_999
    for i in range(2):
        w.write(Record(id=f"r{i}", messages=[Message("user", [TextPart("hi")])]))
        w._commit_shard()
    w.close()
    assert Dataset(tmp_path / "big").shards == ["shards/part-99999.jsonl", "shards/part-100000.jsonl"]
    with DatasetWriter(tmp_path / "s") as w:
        with pytest.raises(RecordError, match="not valid Unicode"):
            w.write(Record(id="u", messages=[Message("user", [TextPart("bad \ud800 text")])]))
    with DatasetWriter(tmp_path / "victim", shard_size=1) as w:
        for i in range(2):
            w.write(Record(id=f"v{i}", messages=[Message("user", [TextPart("hi")])]))
    with DatasetWriter(tmp_path / "mine") as w:
        w.write(Record(id="m", messages=[Message("user", [TextPart("hi")])]))
    import shutil

    shutil.rmtree(tmp_path / "mine" / "shards")
    (tmp_path / "mine" / "shards").symlink_to(tmp_path / "victim" / "shards")
    with pytest.raises(DatasetError, match="resolves outside the dataset root"):  # its cleanup deleted victim's
        DatasetWriter(tmp_path / "mine", append=True)
    assert len(list(Dataset(tmp_path / "victim"))) == 2
    assert dataset.MAX_SHARD_RECORDS == 100_000_000


def test_a_commit_that_fails_after_the_shard_closed_names_the_error_and_keeps_the_dataset(tmp_path, monkeypatch):
    """A review: a manifest write that failed left the closed shard file in the writer, and leaving the block
    raised 'I/O operation on closed file' (a ValueError) instead of the disk's error."""
    import errno

    import duetgen.data.dataset as dataset

    def rec(i):
        return Record(id=f"r{i}", messages=[Message("user", [TextPart(f"text {i}")])])

    with DatasetWriter(tmp_path / "d", shard_size=2) as w:
        for i in range(2):
            w.write(rec(i))
    real = dataset.atomic_write_bytes

    def full(path, data):
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(dataset, "atomic_write_bytes", full)
    with pytest.raises(OSError, match="the open shard's records were not committed"):
        with DatasetWriter(tmp_path / "d", shard_size=2, append=True) as w:
            for i in range(2, 4):
                w.write(rec(i))
    monkeypatch.undo()
    assert [r.id for r in Dataset(tmp_path / "d")] == ["r0", "r1"]
    with DatasetWriter(tmp_path / "d", shard_size=2, append=True) as w:  # the unlisted shard file is cleaned up
        w.write(rec(2))
    assert [r.id for r in Dataset(tmp_path / "d")] == ["r0", "r1", "r2"]
    shard = tmp_path / "d" / "shards" / "part-00000.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text(lines[0].replace('"r0"', '"r0","n":' + "9" * 5000) + "\n" + lines[1] + "\n")
    with pytest.raises(DatasetError, match=r"part-00000.jsonl:1: unreadable JSON"):  # a 5,000-digit number
        list(Dataset(tmp_path / "d"))
