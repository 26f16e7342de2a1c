"""Adapters from public image generation / editing formats to records (paper section 3.2).

The annotation fixtures under tests/fixtures/alignment/<format>/ follow each format's released
fields (see duetgen/data/alignment/adapters.py); the images they name are drawn here, each in a
different colour so a test can tell which file ended up where.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
from PIL import Image

from duetgen.data.alignment.adapters import adapt
from duetgen.data.dataset import Dataset
from duetgen.data.record import RecordError

FIX = Path(__file__).parent / "fixtures" / "alignment"


def _color(rel: str) -> tuple[int, int, int]:
    h = hashlib.sha256(rel.encode()).digest()
    return h[0], h[1], h[2]


def draw(root: Path, rels: list[str], size=(64, 64)) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, _color(rel)).save(p)


def colors_of(ds: Dataset, rec, role: str) -> list[tuple[int, int, int]]:
    return [ds.open_image(p.path, rec.id).getpixel((5, 5)) for p in rec.image_parts(role)]


def close(c1, c2, tol=6) -> bool:  # JPEG fixtures shift colours a little
    return all(abs(a - b) <= tol for a, b in zip(c1, c2))


def copy_fixture(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIX / name, dst)
    return dst


def by_key(ds: Dataset) -> dict:
    return {r.meta["source_key"]: r for r in ds}


def test_sharegpt4o_t2i_edit_multiref_and_bad_rows(tmp_path):
    src = copy_fixture("sharegpt4o", tmp_path)
    draw(src, ["text_to_image/0001.png", "text_to_image/0003.png", "text_and_image_to_image/in_0001.png",
               "text_and_image_to_image/out_0001.png", "text_and_image_to_image/cat.png",
               "text_and_image_to_image/sofa.png", "text_and_image_to_image/cat_on_sofa.png"])
    (src / "text_and_image_to_image/not_an_image.png").write_text("plain text pretending to be a PNG")
    (tmp_path / "outside.png").parent.mkdir(exist_ok=True)
    draw(tmp_path, ["outside.png"])  # exists, but outside the root: must still be refused

    report = adapt("sharegpt4o", src, tmp_path / "out", progress=False)
    ds = Dataset(tmp_path / "out")
    recs = by_key(ds)
    assert len(ds) == 4
    t2i = recs["text_to_image.json[0]"]
    assert t2i.source == "sharegpt4o-image" and t2i.meta["task"] == "t2i"
    assert [m.role for m in t2i.messages] == ["user", "assistant"]
    assert t2i.messages[0].text.startswith("A red fox")
    assert colors_of(ds, t2i, "assistant") == [_color("text_to_image/0001.png")]
    assert t2i.meta["output_image_resolution"] == [64, 48]
    edit = recs["text_and_image_to_image.json[0]"]
    assert edit.meta["task"] == "edit"
    assert colors_of(ds, edit, "user") == [_color("text_and_image_to_image/in_0001.png")]
    assert colors_of(ds, edit, "assistant") == [_color("text_and_image_to_image/out_0001.png")]
    multi = recs["text_and_image_to_image.json[1]"]
    assert multi.meta["task"] == "multi_ref"
    assert colors_of(ds, multi, "user") == [_color("text_and_image_to_image/cat.png"),
                                            _color("text_and_image_to_image/sofa.png")]
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert reasons == {"text_to_image.json[1]": "missing_field",
                       "text_and_image_to_image.json[2]": "path_outside_root",
                       "text_and_image_to_image.json[3]": "bad_image"}
    assert list((tmp_path / "out" / "reports").glob("adapt-sharegpt4o-*.json"))


def test_nhr_edit_fields_meta_and_bad_rows(tmp_path):
    src = copy_fixture("nhr-edit", tmp_path)
    draw(src, ["images/00/image_000001_original.jpg", "images/00/image_000001_edited_0.jpg",
               "images/00/image_000002_original.jpg", "images/00/image_000002_edited_0.jpg",
               "images/00/image_000003_original.jpg",  # its edited_1 is missing on purpose
               "images/01/image_000005_original.jpg", "images/01/image_000005_edited_0.jpg"])
    report = adapt("nhr-edit", src, tmp_path / "out", progress=False)
    ds = Dataset(tmp_path / "out")
    recs = by_key(ds)
    assert sorted(recs) == ["000001", "000005"]
    r = recs["000001"]
    assert r.source == "nhr-edit" and r.meta["task"] == "edit"
    assert r.messages[0].text == "Replace the red car with a blue bicycle."
    assert r.meta["augmented_instructions"] == ["Swap the car for a blue bike.", "Change the red car into a blue bicycle."]
    assert r.meta["category"] == "Replace" and r.meta["kind"] == "direct"
    assert close(colors_of(ds, r, "user")[0], _color("images/00/image_000001_original.jpg"))
    assert close(colors_of(ds, r, "assistant")[0], _color("images/00/image_000001_edited_0.jpg"))
    reasons = sorted((s["item"], s["reason"]) for s in report.skipped)
    assert reasons == [("metadata.jsonl:2", "missing_field"), ("metadata.jsonl:3", "missing_image"),
                       ("metadata.jsonl:4", "bad_json")]


def test_omnigen_placeholders_interleave_images(tmp_path):
    src = copy_fixture("omnigen", tmp_path)
    draw(src, ["cat.png", "edit_source_1.png", "edit_target_1.png", "model.png", "clothes.png", "try_on.png"])
    report = adapt("omnigen", src, tmp_path / "out", progress=False)
    ds = Dataset(tmp_path / "out")
    recs = by_key(ds)
    assert len(ds) == 3
    tryon = recs["data.jsonl:3"]
    kinds = [type(p).__name__ for p in tryon.messages[0].content]
    # "<img><|image_1|></img> wears <img><|image_2|></img>." -> image, text, image, text
    assert kinds == ["ImagePart", "TextPart", "ImagePart", "TextPart"]
    assert tryon.messages[0].content[1].text == "wears"
    assert colors_of(ds, tryon, "user") == [_color("model.png"), _color("clothes.png")]
    assert tryon.meta["task"] == "multi_ref" and tryon.meta["task_type"] == "try-on"
    assert recs["data.jsonl:1"].meta["task"] == "t2i"
    assert recs["data.jsonl:2"].messages[0].text == "The umbrella should be red."
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert reasons == {"data.jsonl:4": "bad_placeholder", "data.jsonl:5": "missing_field"}


def test_uniworld_generation_turns_only(tmp_path):
    src = copy_fixture("uniworld", tmp_path)
    draw(src, ["gen/lighthouse.png", "edit/dog.png", "edit/dog_hat.png", "ref/a.png", "ref/b.png", "ref/ab.png"])
    report = adapt("uniworld", src / "data.json", tmp_path / "out", image_root=src, progress=False)
    ds = Dataset(tmp_path / "out")
    recs = by_key(ds)
    assert sorted(r.meta["task"] for r in recs.values()) == ["edit", "multi_ref", "t2i"]
    edit = recs["data.json[1]"]
    assert colors_of(ds, edit, "user") == [_color("edit/dog.png")]
    assert colors_of(ds, edit, "assistant") == [_color("edit/dog_hat.png")]
    assert edit.messages[0].text == "Add a party hat to the dog."
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert reasons == {"data.json[3]": "not_generation", "data.json[4]": "image_count_mismatch"}


def test_echo4o_logical_root_and_multi_reference(tmp_path):
    src = copy_fixture("echo4o", tmp_path)
    draw(src, ["Surrel-Fantasy-Image/images/000001.jpg", "Instruction-Following-Image/images/000002.jpg",
               "Multi-Reference-Image/images/ref_a.jpg", "Multi-Reference-Image/images/ref_b.jpg",
               "Multi-Reference-Image/images/ref_c.jpg", "Multi-Reference-Image/images/out_000003.jpg"])
    report = adapt("echo4o", src, tmp_path / "out", progress=False)
    ds = Dataset(tmp_path / "out")
    recs = by_key(ds)
    assert len(ds) == 3
    multi = recs["data.jsonl:3"]
    assert multi.meta["task"] == "multi_ref" and len(multi.image_parts("user")) == 3
    assert close(colors_of(ds, multi, "assistant")[0], _color("Multi-Reference-Image/images/out_000003.jpg"))
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert reasons == {"data.jsonl:4": "path_outside_root", "data.jsonl:5": "missing_field"}


def test_rerun_appends_nothing_and_keeps_records(tmp_path):
    src = copy_fixture("omnigen", tmp_path)
    draw(src, ["cat.png", "edit_source_1.png", "edit_target_1.png", "model.png", "clothes.png", "try_on.png"])
    adapt("omnigen", src, tmp_path / "out", progress=False)
    ids = [r.id for r in Dataset(tmp_path / "out")]
    report = adapt("omnigen", src, tmp_path / "out", progress=False)
    assert [r.id for r in Dataset(tmp_path / "out")] == ids
    assert report.counts["already_done"] == 3


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        adapt("nhr-edit", tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordError, match="metadata.jsonl"):
        adapt("nhr-edit", tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="unknown format"):
        adapt("laion", tmp_path, tmp_path / "out", progress=False)


def test_cli_adapt(tmp_path):
    from typer.testing import CliRunner

    from duetgen.cli import app

    src = copy_fixture("omnigen", tmp_path)
    draw(src, ["cat.png", "edit_source_1.png", "edit_target_1.png", "model.png", "clothes.png", "try_on.png"])
    res = CliRunner().invoke(app, ["data", "adapt", str(src / "data.jsonl"), "--format", "omnigen", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "wrote 3 records" in res.output and "bad_placeholder" in res.output
    res = CliRunner().invoke(app, ["data", "adapt", str(src), "--format", "laion", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "--format" in res.output


def test_rows_the_os_or_utf8_refuses_are_skipped_not_fatal(tmp_path):
    """An audit: a NUL in an image path (legal JSON) crashed the run with a traceback, a 5,000-character path
    stopped it (ENAMETOOLONG), a JSONL line that is not UTF-8 crashed it: at the same row on every rerun, and
    the rows after it were never converted. Each is now one skipped row."""
    import json

    src = tmp_path / "omni"
    src.mkdir()
    draw(src, ["a.png", "b.png", "c.png", "d.png"])
    rows = [{"task_type": "t2i", "instruction": "first", "input_images": [], "output_image": "a.png"},
            {"task_type": "t2i", "instruction": "nul", "input_images": [], "output_image": "b\u0000.png"},
            {"task_type": "t2i", "instruction": "long", "input_images": [], "output_image": "x" * 5000 + ".png"},
            {"task_type": "t2i", "instruction": "", "input_images": [], "output_image": "c.png"}]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(2, b'{"instruction": "caf\xe9 \xff", "output_image": "d.png"}')  # latin-1, not UTF-8
    last = {"task_type": "t2i", "instruction": "last", "input_images": [], "output_image": "d.png"}
    lines.append(json.dumps(last).encode())
    (src / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = adapt("omnigen", src, tmp_path / "out", progress=False)
    assert sorted(r.messages[0].text for r in Dataset(tmp_path / "out")) == ["first", "last"]
    why = {s["item"]: (s["reason"], s["detail"]) for s in report.skipped}
    assert why["data.jsonl:2"] == ("bad_field", "'b\\x00.png' holds a NUL character")
    assert why["data.jsonl:3"][0] == "bad_json" and "not UTF-8" in why["data.jsonl:3"][1]
    assert why["data.jsonl:4"][0] == "missing_image" and "5,004 characters" in why["data.jsonl:4"][1]
    assert why["data.jsonl:5"] == ("bad_field", "instruction is empty")


def test_a_second_annotation_file_of_one_name_is_refused_and_a_moved_one_resumes(tmp_path):
    """An audit: `edit/data.jsonl` and `t2i/data.jsonl` adapted into one output hashed the same ids (file name +
    row), and the second file's rows counted as already done: silently lost. It is refused by name now; the same
    file moved (a review: a path-based id made a moved file's rows new, doubling the output) resumes."""
    import json

    for sub, text in (("edit", "edit task"), ("t2i", "t2i task")):
        draw(tmp_path / sub, ["p.png"])
        (tmp_path / sub / "data.jsonl").write_text(json.dumps(
            {"task_type": "t2i", "instruction": text, "input_images": [], "output_image": "p.png"}) + "\n")
    out = tmp_path / "out"
    adapt("omnigen", tmp_path / "edit" / "data.jsonl", out, progress=False)
    with pytest.raises(RecordError, match=r"another annotation file named 'data.jsonl'.*another --out"):
        adapt("omnigen", tmp_path / "t2i" / "data.jsonl", out, progress=False)
    shutil.move(tmp_path / "edit", tmp_path / "moved")
    report = adapt("omnigen", tmp_path / "moved" / "data.jsonl", out, progress=False)
    assert report.counts["already_done"] == 1 and len(Dataset(out)) == 1
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")  # a copy elsewhere, the first still there: the same file
    assert adapt("omnigen", tmp_path / "copy" / "data.jsonl", out, progress=False).counts["already_done"] == 1
    assert [r.messages[0].text for r in Dataset(out)] == ["edit task"]


def test_over_long_huge_integer_and_deeply_nested_lines_are_skipped_rows(tmp_path, monkeypatch):
    """A JSONL line was read whole (a 10 GB line exhausted memory), and json's own ValueError for an integer
    of over 4,300 digits, or RecursionError for deep nesting, crashed the run at the same row on every rerun
    (only JSONDecodeError was caught). Each is one skipped row now; the rows after it are converted."""
    import json

    import duetgen.data.alignment.adapters as adapters

    monkeypatch.setattr(adapters, "MAX_RECORD_LINE_BYTES", 8192)
    src = tmp_path / "omni"
    src.mkdir()
    draw(src, ["a.png", "b.png"])
    row = {"task_type": "t2i", "instruction": "first", "input_images": [], "output_image": "a.png"}
    lines = [json.dumps(row).encode(),
             json.dumps({**row, "instruction": "x" * 10_000}).encode(),  # over the (patched) cap
             b'{"instruction": "big", "n": ' + b"9" * 5000 + b"}",
             b"[" * 3000 + b"]" * 3000,
             json.dumps({**row, "instruction": "last", "output_image": "b.png"}).encode()]
    (src / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = adapt("omnigen", src, tmp_path / "out", progress=False)
    assert sorted(r.messages[0].text for r in Dataset(tmp_path / "out")) == ["first", "last"]
    why = {s["item"]: (s["reason"], s["detail"]) for s in report.skipped}
    assert why["data.jsonl:2"] == ("bad_json", "a line over the cap of 8,192 bytes")
    assert why["data.jsonl:3"][0] == "bad_json" and "4300" in why["data.jsonl:3"][1]
    assert why["data.jsonl:4"] == ("bad_json", "nested too deeply")


def test_a_json_list_is_read_one_sample_at_a_time(tmp_path, monkeypatch):
    """A JSON list annotation file was read whole (json.loads of a 50 MB list peaked at 2.8 GB, a nesting bomb
    was a traceback). It is split into samples as it is read: the same samples as json.loads at any buffer size,
    the samples before a broken one are kept, and each problem names the sample."""
    import io
    import json
    import random

    import duetgen.data.alignment.adapters as adapters

    rng = random.Random(0)

    def value(depth=0):
        t = rng.random()
        if depth > 3 or t < 0.3:
            return rng.choice([1, -2.5, 1e300, "caf\u00e9 \"x\"", True, None, "", 12345678901234567890])
        if t < 0.6:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randrange(4))}

    for _ in range(200):
        data = [value() for _ in range(rng.randrange(6))]
        text = json.dumps(data, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
        for chunk in (1, 3, 64):  # every item cut at every place by the buffer's end
            assert list(adapters._json_list_items(io.BytesIO(text.encode()), "x", chunk=chunk)) == data
    bad = {b'{"a": 1}': "expected a JSON list", b'[{"a": 1} {"b": 2}]': r"x\[0\]: expected ',' or '\]'",
           b'[{"a": 1}, {"b": ': r"x\[1\]: not valid JSON", b"[" + b"[" * 5000: r"x\[0\]: unreadable JSON \(nested too deeply",
           b'[{"n": ' + b"9" * 5000 + b"}]": r"x\[0\]: unreadable JSON.*4300", b"[1] 2": "text after the list's end",
           b'["\xff"]': "not valid UTF-8", b'[{"a": "' + b"y" * 9000 + b'"}]': r"x\[0\]: a sample over the cap",
           b'[{"a": }, ' + b", ".join([b'{"b": 1}'] * 2000) + b"]": r"x\[0\]: not valid JSON"}  # (not "over the cap")
    monkeypatch.setattr(adapters, "MAX_RECORD_LINE_BYTES", 8192)
    for raw, message in bad.items():
        with pytest.raises(RecordError, match=message):
            list(adapters._json_list_items(io.BytesIO(raw), "x", chunk=16))

    src = tmp_path / "uni"
    src.mkdir()
    draw(src, ["a.png"])
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "Draw a square."},
                                                {"from": "gpt", "value": "<gen_image>"}]}
    (src / "data.json").write_text(json.dumps([good, {**good, "conversations": [{"from": "human"}]}])[:-3])
    with pytest.raises(RecordError, match=r"data.json'\[1\]: not valid JSON"):
        adapt("uniworld", src / "data.json", tmp_path / "out", image_root=src, progress=False)
    assert len(Dataset(tmp_path / "out")) == 1  # the sample before the break was converted and committed
