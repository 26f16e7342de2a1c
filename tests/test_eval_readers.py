"""Benchmark definitions and the readers for InterleavedBench's JSON and CoMM's results.json layout."""

import json
from pathlib import Path

import pytest
from PIL import Image

from duetgen.data.images import ImageError
from duetgen.data.record import ImagePart, RecordError, TextPart
from duetgen.eval.benchmarks import BenchmarkError, list_benchmarks, load_benchmark
from duetgen.eval.benchmarks.readers import (ReaderError, read_comm_results, read_interleavedbench,
                                             read_predictions)

FIX = Path(__file__).parent / "fixtures" / "eval"


# ----------------------------------------------------------------------------- benchmarks
def test_every_benchmark_loads_with_the_papers_metrics():
    assert set(list_benchmarks()) >= {"cooking", "cooking_text_input", "howto", "comm", "interleavedbench", "shapeworld"}
    for name in ("cooking", "cooking_text_input", "howto"):
        b = load_benchmark(name)
        assert b.metric_names() == ["T-Com", "I-Com", "I-Co", "I-Q", "IT-Co"]
        assert {c.view for c in b.calls} == {"sequence", "image"}
        assert len(b.sha256) == 64
    assert load_benchmark("cooking").input_images == "required"
    assert load_benchmark("cooking_text_input").input_images == "forbidden"
    comm = load_benchmark("comm")
    assert comm.metric_names() == ["Sty.", "Enti.", "Tren.", "Comp.", "ImgQ", "IRS"]
    assert comm.call("irs").view == "hidden_pair" and comm.call("irs").predict_template == "comm_irs_predict"
    ib = load_benchmark("interleavedbench")
    assert ib.metric_names() == ["T-Q", "I-Q", "I-Co", "IT-Co", "Helpfulness", "Avg."]
    assert load_benchmark("shapeworld").kind == "exact"


def _write_bench(tmp_path, **changes):
    d = json.loads((Path(load_benchmark("cooking").path)).read_text())
    d.update(changes)
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(d))
    return p


def test_benchmark_files_are_checked_and_errors_name_the_problem(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")
    with pytest.raises(BenchmarkError, match="lower-case"):
        load_benchmark("../etc/passwd")
    bad_field = [{"name": "T-Com", "call": "sequence", "field": "text_quality"}]
    with pytest.raises(BenchmarkError, match="no score field 'text_quality'"):
        load_benchmark(str(_write_bench(tmp_path, metrics=bad_field)))
    with pytest.raises(BenchmarkError, match="unknown call 'seq'"):
        load_benchmark(str(_write_bench(tmp_path, metrics=[{"name": "X", "call": "seq", "field": "a"}])))
    wrong_view = [{"id": "sequence", "view": "image", "template": "duetgen_sequence"}]
    with pytest.raises(BenchmarkError, match="view 'image' fills"):
        load_benchmark(str(_write_bench(tmp_path, calls=wrong_view, metrics=[])))
    with pytest.raises(BenchmarkError, match="predict_template"):
        load_benchmark(str(_write_bench(tmp_path, calls=[{"id": "i", "view": "hidden_pair", "template": "comm_irs_score"}])))
    with pytest.raises(BenchmarkError, match="unknown key"):
        load_benchmark(str(_write_bench(tmp_path, surprise=1)))


# ----------------------------------------------------------------------------- InterleavedBench
def test_interleavedbench_json_becomes_prompt_records():
    recs, images = read_interleavedbench(FIX / "interleavedbench" / "interleaved_bench.json")
    assert [r.id for r in recs] == ["ib_story_0001", "ib_wikihow_0002", "3"]
    story, wikihow, report = recs
    assert [m.role for m in story.messages] == ["user"] and story.image_parts() == []
    assert story.meta["category"] == "storytelling_generation"
    assert story.meta["reference"]["images"] == ["images/ref_fox_1.png", "images/ref_fox_2.png"]
    parts = wikihow.messages[0].content
    assert [type(p) for p in parts] == [TextPart, ImagePart, TextPart, ImagePart, TextPart]
    assert parts[0].text.startswith("Goal: Plant tomatoes. Step 1") and parts[-1].text.startswith("Generate the next")
    assert [p.path for p in wikihow.image_parts()] == ["images/ctx_tomato_1.png", "images/ctx_tomato_2.png"]
    assert wikihow.meta["reference"]["images"] == ["images/ref_tomato_3.png"]
    assert images.open_image(parts[1].path, wikihow.id).size == (32, 32)
    assert report.meta["category"] == "report_generation" and "reference" not in report.meta


def _ib(tmp_path, samples):
    p = tmp_path / "ib.json"
    p.write_text(json.dumps(samples))
    return p


@pytest.mark.parametrize("sample,match", [
    ({"id": "a", "task_name": "t", "conversations": [{"from": "human", "value": "x <image>"}], "image": []},
     "1 <image> token"),
    ({"id": "a", "task_name": "t", "conversations": [{"from": "human", "value": "x <image> <image>"}], "image": ["i.png"]},
     r"2 <image> token\(s\) in the human turn but 1 image"),
    ({"id": "a", "task_name": "t", "conversations": [{"from": "human", "value": "x <image>"}], "image": ["../up.png"]},
     "leaves the dataset root"),
    ({"id": "a", "task_name": "t", "conversations": [{"from": "human", "value": "x <image>"}], "image": ["/etc/x.png"]},
     "absolute"),
    ({"id": "a", "task_name": "t", "conversations": [{"from": "robot", "value": "x"}], "image": []}, "from: human"),
    ({"id": "a", "conversations": [{"from": "human", "value": "x"}]}, "task_name"),
    ({"id": None, "task_name": "t", "conversations": [{"from": "human", "value": "x"}]}, "'id'"),
])
def test_malformed_interleavedbench_samples_are_refused_by_name(tmp_path, sample, match):
    with pytest.raises(ReaderError, match=match):
        read_interleavedbench(_ib(tmp_path, [sample]))


def test_interleavedbench_repeated_ids_are_keyed_by_index_and_non_list_is_refused(tmp_path):
    s = {"id": "a", "task_name": "t", "conversations": [{"from": "human", "value": "x"}]}
    u = dict(s, id="b")
    recs, _ = read_interleavedbench(_ib(tmp_path, [s, u, s]))  # the real file repeats ids: the file still reads
    assert [r.id for r in recs] == ["a#0", "b", "a#2"]
    assert [r.meta["interleavedbench_id"] for r in recs] == ["a", "b", "a"]
    assert [r.meta["interleavedbench_index"] for r in recs] == [0, 1, 2]
    with pytest.raises(ReaderError, match="JSON list"):
        read_interleavedbench(_ib(tmp_path, {"data": [s]}))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ReaderError, match="malformed JSON"):
        read_interleavedbench(tmp_path / "bad.json")


def test_hostile_benchmark_files_are_refused_by_name(tmp_path):
    """An audit: deep nesting and a 5,000-digit id were tracebacks or unnamed errors; a FIFO hung the reader;
    the key given to a repeated id could be another sample's id; ImgEdit keys "a" and "./a" shared a file."""
    import os

    from duetgen.eval.benchmarks.readers import read_geneval_results, read_imgedit

    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ReaderError, match="deep.json: unreadable JSON \\(nested too deeply\\)"):
        read_interleavedbench(tmp_path / "deep.json")
    (tmp_path / "big.json").write_text('[{"id": ' + "9" * 5000 + "}]")
    with pytest.raises(ReaderError, match="big.json: unreadable JSON"):
        read_interleavedbench(tmp_path / "big.json")
    (tmp_path / "deep.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ReaderError, match="deep.jsonl:1: unreadable JSON"):
        read_geneval_results(tmp_path / "deep.jsonl")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ReaderError, match="not a regular file"):
        read_imgedit(tmp_path / "fifo.json")
    s = {"id": "5", "task_name": "t", "conversations": [{"from": "human", "value": "x"}]}
    with pytest.raises(ReaderError, match="the key '5#1' given to this repeated id is another sample's id"):
        read_interleavedbench(_ib(tmp_path, [s, s, dict(s, id="5#1")]))
    edit = {"id": "a.png", "prompt": "p", "edit_type": "adjust"}
    (tmp_path / "edits.json").write_text(json.dumps({"a": edit, "./a": edit}))
    with pytest.raises(ReaderError, match="edit './a': a key must be a plain file name"):
        read_imgedit(tmp_path / "edits.json")


# ----------------------------------------------------------------------------- CoMM
def test_comm_results_layout_becomes_records():
    recs, images = read_comm_results(FIX / "comm_results")
    assert [r.id for r in recs] == ["howto_0001_task4", "howto_0002_task3"]
    q, cont = recs
    assert q.meta["category"] == "task4" and cont.meta["category"] == "task3"
    assert q.image_parts("user") == [] and len(q.image_parts("assistant")) == 3
    assert [p.path for p in cont.image_parts("user")] == ["howto_0002_task3/origin/input_1.jpg",
                                                           "howto_0002_task3/origin/input_2.jpg"]
    assert [p.path for p in cont.image_parts("assistant")] == ["howto_0002_task3/predict_3.jpg",
                                                                "howto_0002_task3/predict_4.jpg"]
    assert q.meta["gt_images"][0] == "howto_0001_task4/origin/output_gt_1.jpg"
    first = q.messages[1].content
    assert isinstance(first[0], TextPart) and first[0].text.startswith("(1) Step1: Water")
    assert images.open_image(q.image_parts("assistant")[0].path, q.id).size == (32, 32)
    recs2, _, fmt = read_predictions(FIX / "comm_results")
    assert fmt == "comm_results" and [r.id for r in recs2] == [r.id for r in recs]


def _comm(tmp_path, **results):
    d = tmp_path / "comm" / "s_task4"
    d.mkdir(parents=True)
    base = {"model_input": "Q?", "model_output": "(1) a <IMAGE>", "input_image_list": [], "output_gt_image_list": [],
            "prediction_image_list": ["p.jpg"]}
    base.update(results)
    (d / "results.json").write_text(json.dumps(base))
    Image.new("RGB", (8, 8)).save(d / "p.jpg")
    return tmp_path / "comm"


def test_comm_mismatches_and_escapes_are_refused(tmp_path):
    with pytest.raises(ReaderError, match=r"model_output: 2 <IMAGE> token\(s\) but 1 image"):
        read_comm_results(_comm(tmp_path / "a", model_output="a <IMAGE> b <IMAGE>"))
    with pytest.raises(ReaderError, match="leaves the dataset root"):
        read_comm_results(_comm(tmp_path / "b", prediction_image_list=["../../secret.jpg"]))
    with pytest.raises(ReaderError, match="'model_input' must be a string"):
        read_comm_results(_comm(tmp_path / "c", model_input=None))
    root = _comm(tmp_path / "d")
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(secret)
    (root / "s_task4" / "p.jpg").unlink()
    (root / "s_task4" / "p.jpg").symlink_to(secret)  # a symlink out of the root is refused when opened
    recs, images = read_comm_results(root)
    with pytest.raises(ImageError, match="outside"):
        images.open_image(recs[0].image_parts("assistant")[0].path, recs[0].id)


def test_read_predictions_refuses_what_it_does_not_know(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReaderError, match="neither a DuetGen dataset"):
        read_predictions(tmp_path / "empty")
    assert issubclass(ReaderError, RecordError)

