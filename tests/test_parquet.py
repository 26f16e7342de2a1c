"""Parquet export/import: HF `datasets` loads it, round trips are exact, untrusted files are checked."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from duetgen.data.parquet import SCHEMA, export_parquet, import_parquet
from duetgen.data.dataset import Dataset, DatasetError, DatasetWriter
from duetgen.data.images import ImageError
from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart


def png(color, size=(10, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (9, 9), color).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def make_dataset(root, n=5, shard_size=2):
    with DatasetWriter(root, shard_size=shard_size, name="src") as w:
        for i in range(n):
            w.write(Record(id=f"r{i}", source="toyworld", meta={"i": i, "note": "ünïcode <b>"}, messages=[
                Message("system", [TextPart("sys")]),
                Message("user", [TextPart(f"q{i}"), ImagePart(png((i * 40, 0, 0)))]),
                Message("assistant", [TextPart("Step 1"), ImagePart(jpeg((0, i * 40, 0))), TextPart("Step 2"),
                                      ImagePart(png((0, 0, i * 40)))]),
            ]))
    return Dataset(root)


def test_export_import_round_trip_is_exact(tmp_path):
    src = make_dataset(tmp_path / "src")
    out = tmp_path / "x.parquet"
    assert export_parquet(src.root, out, rows_per_group=2, progress=False) == 5
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # streamed in row groups, not one table
    assert import_parquet(out, tmp_path / "dst", shard_size=3, progress=False) == 5
    dst = Dataset(tmp_path / "dst")
    a, b = list(src), list(dst)
    assert [r.to_json() for r in a] == [r.to_json() for r in b]  # same content-addressed paths too
    for ra, rb in zip(a, b):
        for pa_, pb in zip(ra.image_parts(), rb.image_parts()):
            assert src.image_path(pa_.path, ra.id).read_bytes() == dst.image_path(pb.path, rb.id).read_bytes()
    assert not list(tmp_path.glob(".*"))  # no tmp file or half-built dataset left behind
    assert dst.name == "src"  # the dataset's name travels in the file's schema metadata


def test_export_never_writes_inside_the_dataset_and_imports_do_not_collide(tmp_path):
    """An audit: export onto ds/manifest.json replaced the manifest (exit 0); a second import into the same
    new folder deleted the first one's build folder (a traceback); a FIFO as input hung import."""
    src = make_dataset(tmp_path / "src", n=2)
    before = (src.root / "manifest.json").read_bytes()
    for inside in ("manifest.json", src.shards[0], "sub/x.parquet"):
        with pytest.raises(DatasetError, match="lies inside the dataset being exported"):
            export_parquet(src.root, src.root / inside, progress=False)
    assert (src.root / "manifest.json").read_bytes() == before and len(list(Dataset(src.root))) == 2
    export_parquet(src.root, tmp_path / "x.parquet", progress=False)
    from duetgen.data.dataset import building_new_dataset

    with building_new_dataset(tmp_path / "dst") as building:  # another import holds dst
        building.mkdir()
        with pytest.raises(DatasetError, match="another process is writing a new dataset at"):
            import_parquet(tmp_path / "x.parquet", tmp_path / "dst", progress=False)
        assert building.is_dir()  # the running import's folder is left alone
    assert import_parquet(tmp_path / "x.parquet", tmp_path / "dst", progress=False) == 2
    assert not [p.name for p in tmp_path.glob(".dst*")]  # neither the build folder nor the lock is left
    (tmp_path / "empty").mkdir()  # an empty folder (a mount point, the shell's "."): built inside it, on its disk
    seen = []
    real_replace = os.replace

    def replace(a, b):
        seen.append((os.path.dirname(os.fspath(a)), os.path.dirname(os.fspath(b))))
        return real_replace(a, b)

    import unittest.mock

    with unittest.mock.patch("os.replace", replace):
        assert import_parquet(tmp_path / "x.parquet", tmp_path / "empty", progress=False) == 2
    assert seen and all(a.startswith(str(tmp_path / "empty")) for a, _ in seen)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["images", "manifest.json", "shards"]
    os.mkfifo(tmp_path / "fifo.parquet")
    with pytest.raises(DatasetError, match="not a regular file"):
        import_parquet(tmp_path / "fifo.parquet", tmp_path / "dst2", progress=False)


def test_schema_and_row_shape(tmp_path):
    src = make_dataset(tmp_path / "src", n=1)
    out = tmp_path / "x.parquet"
    export_parquet(src.root, out, progress=False)
    table = pq.read_table(out)
    assert table.schema.equals(SCHEMA) and table.schema.metadata[b"huggingface"] == SCHEMA.metadata[b"huggingface"]
    row = table.to_pylist()[0]
    messages = json.loads(row["messages"])
    assert messages[2]["content"][1] == {"type": "image", "index": 1}
    assert [im["path"] for im in row["images"]] == [p.path for p in next(iter(src)).image_parts()]
    assert json.loads(row["meta"]) == {"i": 0, "note": "ünïcode <b>"}


def test_hf_datasets_loads_images_as_pil(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hfcache"))
    datasets = pytest.importorskip("datasets")
    src = make_dataset(tmp_path / "src", n=3)
    out = tmp_path / "x.parquet"
    export_parquet(src.root, out, progress=False)
    hf = datasets.Dataset.from_parquet(str(out), cache_dir=str(tmp_path / "hfcache"))
    assert len(hf) == 3 and hf.column_names == ["id", "source", "messages", "images", "meta"]
    row = hf[1]
    assert row["id"] == "r1" and len(row["images"]) == 3
    assert all(isinstance(im, Image.Image) for im in row["images"])
    assert row["images"][0].convert("RGB").getpixel((0, 0)) == (40, 0, 0)
    assert row["images"][0].size == (10, 8)
    assert json.loads(row["messages"])[1]["content"][1] == {"type": "image", "index": 0}


def write_rows(path, rows, schema=SCHEMA):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def row(rid="a", images=None, messages=None):
    images = [{"bytes": png((1, 2, 3)), "path": "images/aa/x.png"}] if images is None else images
    messages = messages or [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "index": 0}]}]
    return {"id": rid, "source": "t", "messages": json.dumps(messages), "images": images, "meta": "{}"}


def test_import_never_opens_paths_from_the_file(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png((7, 7, 7)))
    f = tmp_path / "evil.parquet"
    write_rows(f, [row(images=[{"bytes": None, "path": str(secret)}])])
    with pytest.raises(RecordError, match=r"evil\.parquet row 0 \(record 'a'\): image 0 has no embedded bytes"):
        import_parquet(f, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()  # all or nothing


def test_import_applies_pixel_cap(tmp_path):
    f = tmp_path / "big.parquet"
    write_rows(f, [row("ok"), row("big", images=[{"bytes": png((0, 0, 0), size=(50, 50)), "path": None}])])
    with pytest.raises(ImageError, match=r"big\.parquet row 1: record 'big'.*over the cap of 1,000"):
        import_parquet(f, tmp_path / "dst", max_pixels=1000, progress=False)
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst*"))


def test_import_rejects_bad_rows(tmp_path):
    cases = {
        "badindex": (row("badindex", messages=[{"role": "user", "content": [{"type": "image", "index": 3}]}]),
                     r"not an index into its 1 image"),
        "notimage": (row("notimage", images=[{"bytes": b"plain text", "path": None}]), r"not a readable image"),
        "badrole": (row("badrole", messages=[{"role": "robot", "content": [{"type": "text", "text": "x"}]}]),
                    r"unknown role 'robot'"),
        "badjson": ({**row("badjson"), "messages": "[{"}, r"not valid JSON"),
    }
    for rid, (r, why) in cases.items():
        f = tmp_path / f"{rid}.parquet"
        write_rows(f, [r])
        with pytest.raises(RecordError, match=rf"{rid}\.parquet row 0.*{why}"):
            import_parquet(f, tmp_path / f"dst-{rid}", progress=False)


def test_import_rejects_duplicate_ids_and_wrong_schema(tmp_path):
    f = tmp_path / "dup.parquet"
    write_rows(f, [row("a"), row("a")])
    with pytest.raises(RecordError, match=r"row 1: record 'a': duplicate id"):
        import_parquet(f, tmp_path / "dst", progress=False)
    g = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"id": ["a"], "messages": ["[]"]}), g)
    with pytest.raises(DatasetError, match=r"wrong\.parquet: missing column 'source'"):
        import_parquet(g, tmp_path / "dst2", progress=False)
    h = tmp_path / "junk.parquet"
    h.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"junk\.parquet: not a readable parquet file"):
        import_parquet(h, tmp_path / "dst3", progress=False)


def test_import_row_group_cap_checked_from_footer(tmp_path):
    f = tmp_path / "x.parquet"
    write_rows(f, [row("a")])
    with pytest.raises(DatasetError, match=r"row group 0 holds .* bytes, over the cap of 10"):
        import_parquet(f, tmp_path / "dst", max_row_group_bytes=10, progress=False)


def test_import_refuses_existing_dataset(tmp_path):
    make_dataset(tmp_path / "src", n=1)
    f = tmp_path / "x.parquet"
    export_parquet(tmp_path / "src", f, progress=False)
    with pytest.raises(DatasetError, match="not an empty folder"):
        import_parquet(f, tmp_path / "src", progress=False)
    (tmp_path / "empty").mkdir()
    assert import_parquet(f, tmp_path / "empty", progress=False) == 1
    assert len(Dataset(tmp_path / "empty")) == 1


def test_export_of_missing_image_names_record(tmp_path):
    src = make_dataset(tmp_path / "src", n=2)
    victim = next(iter(src)).image_parts()[1].path
    os.remove(src.root / victim)
    with pytest.raises(ImageError, match=rf"record 'r0': image '{victim}' not found"):
        export_parquet(src.root, tmp_path / "x.parquet", progress=False)
    assert not (tmp_path / "x.parquet").exists() and not list(tmp_path.glob(".x.parquet*"))


def test_cli_export_import(tmp_path):
    from typer.testing import CliRunner

    from duetgen.cli import app

    src = make_dataset(tmp_path / "src", n=3)
    runner = CliRunner()
    res = runner.invoke(app, ["data", "export-parquet", str(src.root), str(tmp_path / "x.parquet")])
    assert res.exit_code == 0, res.output
    assert "wrote 3 records" in res.stdout
    res = runner.invoke(app, ["data", "import-parquet", str(tmp_path / "x.parquet"), str(tmp_path / "dst")])
    assert res.exit_code == 0, res.output
    assert [r.to_json() for r in Dataset(tmp_path / "dst")] == [r.to_json() for r in src]
    res = runner.invoke(app, ["data", "export-parquet", str(tmp_path / "nope"), str(tmp_path / "y.parquet")])
    assert res.exit_code == 2 and "no such directory" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["data", "import-parquet", str(tmp_path / "x.parquet"), str(tmp_path / "dst")])
    assert res.exit_code == 2 and "not an empty folder" in res.output


def test_export_of_a_truncated_image_fails_at_export(tmp_path):
    """Issue 15 item 9: a truncated PNG was exported with exit code 0, then import-parquet refused it."""
    import subprocess
    from pathlib import Path

    src = make_dataset(tmp_path / "src", n=2)
    victim = next(iter(src)).image_parts()[0].path
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
    (src.root / victim).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header reads; the pixels do not
    exe = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "duetgen"
    r = subprocess.run([str(exe), "data", "export-parquet", str(src.root), str(tmp_path / "x.parquet")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout
    assert f"record 'r0': image '{victim}'" in r.stderr and "not a readable image" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "BytesIO" not in r.stderr
    assert not (tmp_path / "x.parquet").exists() and not list(tmp_path.glob(".x.parquet*"))


def test_import_names_the_file_when_its_data_does_not_decode_and_imports_into_the_current_folder(tmp_path,
                                                                                                  monkeypatch):
    """An audit: a string column that is not UTF-8 (or a corrupt page) raised UnicodeDecodeError / ArrowInvalid out
    of the import (a traceback); importing into "." raised on the empty name of its build folder."""
    b = io.BytesIO()
    Image.new("RGB", (8, 8)).save(b, "PNG")
    row = {"id": "x", "source": "s", "meta": "{}", "images": [{"bytes": b.getvalue(), "path": "a.png"}],
           "messages": json.dumps([{"role": "user", "content": [{"type": "text", "text": "QQQQ"}]}])}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), path, compression="none", use_dictionary=False,
                   write_statistics=False)
    good = path.read_bytes()
    path.write_bytes(good.replace(b"QQQQ", b"\xff\xfe\xfd\xfc"))
    with pytest.raises(DatasetError, match=r"bad.parquet: the rows from 0 on do not decode \(UnicodeDecodeError"):
        import_parquet(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    path.write_bytes(good)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert import_parquet(path, ".", progress=False) == 1 and len(Dataset(".")) == 1
    assert sorted(os.listdir(".")) == ["images", "manifest.json", "shards"]  # this folder filled, not replaced
