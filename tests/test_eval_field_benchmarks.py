"""Benchmarks in the layouts the field runs them (issue 16): CoMM's sample folders with origin/,
InterleavedBench's rules, GenEval's output layout and results.jsonl, ImgEdit Basic (with our templates
and with the user's copy of its own prompts.json) and GEdit-Bench, and the HTML report of the three new
ones. Every fixture is built here from the benchmarks' real field names with placeholder text; the judge
is the loopback server (a prose-replying one for ImgEdit's own prompts)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_judge_server import JudgeServer  # noqa: E402

from duetgen.data.record import ImagePart, Record, TextPart  # noqa: E402
from duetgen.eval.adapters import AdapterError, Answer, Model, generate_geneval  # noqa: E402
from duetgen.eval.benchmarks import BenchmarkError  # noqa: E402
from duetgen.eval.benchmarks.readers import ReaderError, read_gedit, read_interleavedbench  # noqa: E402
from duetgen.eval.harness import HarnessError, RunConfig, run_benchmark  # noqa: E402
from duetgen.eval.judge import JudgeConfig  # noqa: E402
from duetgen.eval.metrics import mean_of_means, mean_over_categories  # noqa: E402
from duetgen.eval.report import write_report  # noqa: E402


@pytest.fixture(scope="module")
def server():
    s = JudgeServer().start()
    yield s
    s.stop()


def judge(server) -> JudgeConfig:
    return JudgeConfig(server.url, "judge-test", max_retries=0)


def lines(out: Path) -> dict:
    return {x["id"]: x for x in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def img(path: Path, colour=(200, 30, 30), size=(24, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# ----------------------------------------------------------------------------- CoMM
def comm_sample(root: Path, data_id: str, task: str, results: dict, origin=(), predicted=()) -> None:
    d = root / f"{data_id}_{task}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(results))
    for f in origin:
        img(d / "origin" / f)
    for f in predicted:
        img(d / f, (30, 30, 200))


def comm_folder(root: Path) -> Path:
    """CoMM's four tasks as eval/eval_metric.py reads them (inputs and ground truth under origin/)."""
    comm_sample(root, "a1", "task1", {"model_input": "Steps about X: (1) <IMAGE> (2) <IMAGE> Write the text.",
                                      "model_output": "(1) Step1: ... (2) Step2: ...",
                                      "input_image_list": ["input_1.jpg", "input_2.jpg"],
                                      "output_gt_image_list": [], "prediction_image_list": []},
                origin=["input_1.jpg", "input_2.jpg"])
    comm_sample(root, "a1", "task4", {"model_input": "Can you generate step-by-step instructions with images about X?",
                                      "model_output": "(1) Step1: cut. <IMAGE> (2) Step2: fold. <IMAGE>",
                                      "input_image_list": [], "output_gt_image_list": ["output_gt_1.jpg", "output_gt_2.jpg"],
                                      "prediction_image_list": ["predict_1.jpg", "predict_2.jpg"]},
                origin=["output_gt_1.jpg", "output_gt_2.jpg"], predicted=["predict_1.jpg", "predict_2.jpg"])
    comm_sample(root, "b2", "task4", {"model_input": "Can you generate step-by-step instructions with images about Y?",
                                      "model_output": "(1) Step1: pour. <IMAGE>", "input_image_list": [],
                                      "output_gt_image_list": ["output_gt_1.jpg"], "prediction_image_list": ["predict_1.jpg"]},
                origin=["output_gt_1.jpg"])  # its prediction file is missing
    return root


def test_comm_reads_its_own_layout_judges_task4_by_default_and_reports_a_missing_image_per_item(server, tmp_path):
    pred = comm_folder(tmp_path / "comm")
    s = run_benchmark(RunConfig("comm", str(pred), str(tmp_path / "run")), judge(server), progress=False)
    res = lines(tmp_path / "run")
    assert list(res) == ["a1_task4", "b2_task4"]  # task 1 is another task: counted, not judged
    assert s["coverage"]["other_tasks_not_judged"] == {"task1": 1} and s["coverage"]["bad_image"] == 1
    assert res["a1_task4"]["metrics"]["IRS"]["state"] == "ok"
    bad = res["b2_task4"]
    assert all(v["state"] == "bad_image" for v in bad["metrics"].values()) and "predict_1.jpg" in bad["error"]
    assert s["metrics"]["Sty."]["n"] == 1 and s["metrics"]["Sty."]["states"]["bad_image"] == 1
    with pytest.raises(BenchmarkError, match=r"task1 is not judged here: CoMM judges task 1 .*task_1\.json"):
        run_benchmark(RunConfig("comm", str(pred), str(tmp_path / "r1"), task="task1"), judge(server), progress=False)
    with pytest.raises(BenchmarkError, match="unknown task 'task9'"):
        run_benchmark(RunConfig("comm", str(pred), str(tmp_path / "r9"), task="task9"), judge(server), progress=False)


def test_comm_folder_in_another_layout_is_refused_naming_the_layout_and_the_path(tmp_path):
    root = comm_folder(tmp_path / "comm")
    (root / "notes").mkdir()
    from duetgen.eval.benchmarks.readers import read_comm_results

    with pytest.raises(ReaderError, match=r"comm/notes: not a CoMM sample folder \(its name does not end in _taskN\); "
                                          r"expected layout: <root>/<data_id>_taskN/results.json"):
        read_comm_results(root)


# ----------------------------------------------------------------------------- InterleavedBench
def test_interleavedbench_skips_text_aspects_on_editing_and_avg_is_the_mean_of_aspect_means(server, tmp_path):
    for f in ("ctx.png", "gt_1.png", "gt_2.png"):
        img(tmp_path / "bench" / f)
    samples = [  # field names of interleaved_bench.json; ground-truth images listed without <image> in the gpt turn
        {"id": "s1", "task_name": "image_editing", "image": ["ctx.png", "gt_1.png"],
         "conversations": [{"from": "human", "value": "<image> Make the sky red."}, {"from": "gpt", "value": "Done."}]},
        {"id": "s1", "task_name": "story", "image": ["gt_1.png", "gt_2.png"],
         "conversations": [{"from": "human", "value": "Tell a story about a fox."}, {"from": "gpt", "value": "Once..."}]},
    ]
    (tmp_path / "bench" / "interleaved_bench.json").write_text(json.dumps(samples))
    recs, _ = read_interleavedbench(tmp_path / "bench" / "interleaved_bench.json")
    assert [r.id for r in recs] == ["s1#0", "s1#1"]
    assert recs[1].meta["reference"] == {"text": "Once...", "images": ["gt_1.png", "gt_2.png"], "images_at_tokens": False}

    from duetgen.eval.adapters import Answer, Model, run_model

    class Painter(Model):
        name = "painter"

        def generate(self, request, item_id):
            return Answer([TextPart("Here it is."), ImagePart(Image.new("RGB", (20, 20), (9, 90, 9)))])

    run_model(Painter(), tmp_path / "bench" / "interleaved_bench.json", tmp_path / "pred", progress=False)
    s = run_benchmark(RunConfig("interleavedbench", str(tmp_path / "pred"), str(tmp_path / "run"),
                                prompts=str(tmp_path / "bench" / "interleaved_bench.json")), judge(server), progress=False)
    res = lines(tmp_path / "run")
    edit = res["s1#0"]["metrics"]
    assert edit["T-Q"]["state"] == edit["IT-Co"]["state"] == "not_applicable" and edit["I-Q"]["state"] == "ok"
    assert s["metrics"]["T-Q"]["n"] == 1 and s["metrics"]["I-Q"]["n"] == 2
    aspects = ["T-Q", "I-Q", "I-Co", "IT-Co", "Helpfulness"]
    assert s["metrics"]["Avg."]["mean"] == pytest.approx(np.mean([s["metrics"][m]["mean"] for m in aspects]))
    lo, hi = s["metrics"]["Avg."]["ci95"]
    assert lo <= s["metrics"]["Avg."]["mean"] <= hi


def test_mean_of_means_and_mean_over_categories_with_their_intervals():
    x = np.array([[1.0, np.nan], [3.0, 4.0], [5.0, 2.0]])
    r = mean_of_means(x, n_boot=300)
    assert r["mean"] == pytest.approx((3.0 + 3.0) / 2) and r["ci95"][0] <= r["mean"] <= r["ci95"][1]
    r = mean_over_categories({"a": [1.0, 1.0, 1.0, 1.0], "b": [0.0]}, n_boot=300)
    assert r["mean"] == pytest.approx(0.5) and r["n"] == 5 and r["ci95"] == [pytest.approx(0.5), pytest.approx(0.5)]


# ----------------------------------------------------------------------------- GenEval
class OneImageModel(Model):
    name = "one-image"
    structure = "one_image"

    def generate(self, request, item_id):
        colour = tuple(int(c) for c in np.frombuffer(item_id.encode().ljust(3, b"x")[-3:], dtype=np.uint8))
        return Answer([ImagePart(Image.new("RGB", (16, 16), colour))])


def test_geneval_writes_its_own_layout_and_reads_its_scorers_results(tmp_path):
    meta = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
            {"tag": "counting", "include": [{"class": "cow", "count": 2}], "prompt": "a photo of two cows"},
            {"tag": "counting", "include": [{"class": "cat", "count": 3}], "prompt": "a photo of three cats"}]
    (tmp_path / "evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    out = tmp_path / "geneval"
    assert generate_geneval(OneImageModel(), tmp_path / "evaluation_metadata.jsonl", out, samples=2, progress=False) == 6
    assert generate_geneval(OneImageModel(), tmp_path / "evaluation_metadata.jsonl", out, samples=2, progress=False) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002", "generation.json"]  # (GenEval's
    # scorer reads only the digit folders)
    with pytest.raises(AdapterError, match="different generation settings"):  # 2 samples a prompt, not 3
        generate_geneval(OneImageModel(), tmp_path / "evaluation_metadata.jsonl", out, samples=3, progress=False)
    (tmp_path / "other.jsonl").write_text((tmp_path / "evaluation_metadata.jsonl").read_text())
    with pytest.raises(AdapterError, match="different inputs settings"):  # another prompts file
        generate_geneval(OneImageModel(), tmp_path / "other.jsonl", out, samples=2, progress=False)
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == meta[1]
    assert sorted(p.name for p in (out / "00001" / "samples").iterdir()) == ["00000.png", "00001.png"]

    # what GenEval's evaluate_images.py writes: one line per image
    correct = {("00000", 0): True, ("00000", 1): True, ("00001", 0): True, ("00001", 1): False,
               ("00002", 0): False, ("00002", 1): False}
    rows = [{"filename": str(out / i / "samples" / f"{j:05d}.png"), "tag": meta[int(i)]["tag"],
             "prompt": meta[int(i)]["prompt"], "correct": c, "reason": "", "metadata": json.dumps(meta[int(i)])}
            for (i, j), c in correct.items()]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_benchmark(RunConfig("geneval", str(tmp_path / "results.jsonl"), str(tmp_path / "run")), progress=False)
    assert s["metrics"]["Single Obj."]["mean"] == 1.0 and s["metrics"]["Counting"]["mean"] == 0.25
    assert s["metrics"]["Counting"]["states"]["not_applicable"] == 1 and s["metrics"]["Colors"]["n"] == 0
    assert s["metrics"]["Overall"]["mean"] == pytest.approx((1.0 + 0.25) / 2)  # mean of the tasks, not of images
    assert s["metrics"]["Overall"]["ci95"][0] <= 0.625 <= s["metrics"]["Overall"]["ci95"][1]
    html, _ = write_report([tmp_path / "run"], tmp_path / "report.html")
    assert "Overall" in html.read_text() and "No gallery" in html.read_text()
    # a tag of no task (a typo) would enter Overall unseen; a line given twice would count twice
    typo = [dict(r, tag="colour") if r["filename"].endswith(("00002/samples/00000.png", "00002/samples/00001.png"))
            else r for r in rows]
    (tmp_path / "typo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in typo))
    with pytest.raises(HarnessError, match="prompt folder 00002 has tag 'colour', not a task of 'geneval'"):
        run_benchmark(RunConfig("geneval", str(tmp_path / "typo.jsonl"), str(tmp_path / "run-typo")), progress=False)
    (tmp_path / "twice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:1]))
    with pytest.raises(ReaderError, match="has a result line already"):
        run_benchmark(RunConfig("geneval", str(tmp_path / "twice.jsonl"), str(tmp_path / "run-twice")), progress=False)
    rows[0]["filename"] = "somewhere/else.png"
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ReaderError, match="is not <index>/samples/<n>.png"):
        run_benchmark(RunConfig("geneval", str(tmp_path / "bad.jsonl"), str(tmp_path / "run2")), progress=False)


# ----------------------------------------------------------------------------- ImgEdit
def test_imgedit_judges_each_edit_type_with_its_template_and_the_cap_rule(server, tmp_path):
    edits = {"1082": {"id": "animal/000342021.jpg", "prompt": "Change the shell to a smooth surface.", "edit_type": "adjust"},
             "673": {"id": "style/000278574.jpg", "prompt": "Make it an ukiyo-e print.", "edit_type": "style"},
             "12": {"id": "animal/000000012.jpg", "prompt": "Add a hat to the dog.", "edit_type": "add"},
             "13": {"id": "animal/000000013.jpg", "prompt": "Remove the cup.", "edit_type": "remove"}}
    (tmp_path / "basic_edit.json").write_text(json.dumps(edits))
    for e in edits.values():
        img(tmp_path / "original_images" / e["id"])
    for key in ("1082", "673", "12"):  # the official layout: <key>.png; edit 13 was never produced
        img(tmp_path / "edited" / f"{key}.png", (10, 200, 10))
    server.reset()
    s = run_benchmark(RunConfig("imgedit", str(tmp_path / "edited"), str(tmp_path / "run"),
                                prompts=str(tmp_path / "basic_edit.json"), images=str(tmp_path / "original_images")),
                      judge(server), progress=False)
    res = lines(tmp_path / "run")
    assert res["13"]["metrics"]["Score"]["state"] == "missing" and s["coverage"]["missing"] == 1
    templates = sorted(e["body"]["messages"][0]["content"].split("requested is ")[1].split(".")[0] for e in server.log)
    assert templates == ["a style transfer", "an attribute change", "an object addition"]
    assert all(e["n_images"] == 2 for e in server.log)  # before and after
    for key in ("1082", "673", "12"):
        unit = res[key]["calls"]["edit"][0]
        if unit["state"] == "ok":
            sc = unit["scores"]
            assert sc["criterion_2"] <= sc["criterion_1"] and sc["criterion_3"] <= sc["criterion_1"]
            assert res[key]["metrics"]["Score"]["value"] == pytest.approx(np.mean(list(sc.values())))
        else:  # a reply above the first criterion is never clipped into a score
            assert unit["state"] == "unparsable" and "may not exceed the first" in unit["error"]
    assert res["673"]["metrics"]["Add"]["state"] == "not_applicable"
    ok_types = {res[k]["category"]: res[k]["metrics"]["Score"]["value"] for k in ("1082", "673", "12")
                if res[k]["metrics"]["Score"]["state"] == "ok"}
    if ok_types:
        assert s["metrics"]["Overall"]["mean"] == pytest.approx(np.mean(list(ok_types.values())))
    html, _ = write_report([tmp_path / "run"], tmp_path / "report.html")
    assert "Overall" in html.read_text()


# ----------------------------------------------------------------------------- GEdit-Bench
def gedit_parquet(path: Path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(colour, size):
        b = io.BytesIO()
        Image.new("RGB", size, colour).save(b, format="PNG")
        return {"bytes": b.getvalue(), "path": None}

    rows = [("background_change", "k1", "Change the background to a beach.", "en", (32, 24)),
            ("background_change", "k1", "把背景换成海滩。", "cn", (32, 24)),
            ("subject-add", "k2", "Add a red ball.", "en", (20, 20)),
            ("color_alter", "k3", "Make the car blue.", "en", (20, 20))]
    table = pa.table({"task_type": [r[0] for r in rows], "key": [r[1] for r in rows],
                      "instruction": [r[2] for r in rows], "instruction_language": [r[3] for r in rows],
                      "input_image": [png((120, 120, 120), r[4]) for r in rows],
                      "Intersection_exist": [True, True, False, True]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2)


def test_a_corrupt_gedit_page_is_named_by_file_and_row_group(tmp_path):
    path = tmp_path / "g" / "train.parquet"
    gedit_parquet(path)
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(1).column(0)  # the second row group's first column chunk
    data = bytearray(path.read_bytes())
    start = meta.data_page_offset
    data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(ReaderError, match=r"train.parquet#1: row group 1 does not decode"):
        read_gedit(tmp_path / "g")


def test_gedit_reads_a_parquet_copy_english_by_default_and_scores_viescore(server, tmp_path):
    gedit_parquet(tmp_path / "GEdit-Bench" / "data" / "train-00000-of-00001.parquet")
    recs, images = read_gedit(tmp_path / "GEdit-Bench")
    assert [r.id for r in recs] == ["background_change/en/k1", "subject-add/en/k2", "color_alter/en/k3"]
    assert images.open_image(recs[0].image_parts("user")[0].path, recs[0].id).size == (32, 24)
    with pytest.raises(ReaderError, match=r"no row with instruction_language 'de' \(found: \['cn', 'en'\]\)"):
        read_gedit(tmp_path / "GEdit-Bench", "de")
    for rid, size in (("background_change/en/k1", (64, 48)), ("subject-add/en/k2", (20, 20))):
        img(tmp_path / "method" / "fullset" / f"{rid}.png", (0, 0, 250), size)  # the official layout; k3 missing
    server.reset()
    s = run_benchmark(RunConfig("gedit", str(tmp_path / "method"), str(tmp_path / "run"),
                                prompts=str(tmp_path / "GEdit-Bench")), judge(server), progress=False)
    res = lines(tmp_path / "run")
    assert res["color_alter/en/k3"]["metrics"]["G_SC"]["state"] == "missing"
    assert sorted(e["n_images"] for e in server.log) == [1, 1, 2, 2]  # PQ sees the edit alone, SC both images
    beach = [e["image_sizes"] for e in server.log if "beach" in json.dumps(e["body"])]
    assert beach == [[("JPEG", (32, 24)), ("JPEG", (32, 24))]]  # the 64x48 edit resized to the source first
    for rid in ("background_change/en/k1", "subject-add/en/k2"):
        line = res[rid]
        sc, pq = line["calls"]["sc"][0]["scores"], line["calls"]["pq"][0]["scores"]
        assert line["metrics"]["G_SC"]["value"] == min(sc["editing_success"], sc["no_overediting"])
        assert line["metrics"]["G_PQ"]["value"] == min(pq["naturalness"], pq["no_artifacts"])
        assert line["metrics"]["G_O"]["value"] == pytest.approx(np.sqrt(line["metrics"]["G_SC"]["value"]
                                                                        * line["metrics"]["G_PQ"]["value"]))
    groups = [res[r]["metrics"]["G_O"]["value"] for r in ("background_change/en/k1", "subject-add/en/k2")]
    assert s["metrics"]["G_O"]["mean"] == pytest.approx(np.mean(groups)) and s["coverage"]["language"] == "en"
    html, _ = write_report([tmp_path / "run"], tmp_path / "report.html")
    assert html.read_text().count("data:image/jpeg") >= 4  # source and edited image side by side in the gallery


# ----------------------------------------------------------------------------- ImgEdit's official prompts
def official_prompts(path: Path, **override) -> Path:
    """The user's copy of ImgEdit's prompts.json in its real layout ({edit_type: prompt with <edit_prompt>}),
    placeholder text instead of the benchmark's."""
    types = ("replace", "add", "adjust", "remove", "style", "action", "extract", "background", "compose")
    data = {t: f"\nPLACEHOLDER rater prompt for {t} edits: three scores, one 'Name: N' line each.\n"
               "editing instruction is : <edit_prompt>.\n\nBelow are the images before and after editing:\n"
            for t in types}
    data.update(override)
    path.write_text(json.dumps(data, indent=2))
    return path


class ProseJudge:
    """An OpenAI-compatible judge that answers in ImgEdit's reply format (prose, one 'Name: N' line per score).
    'CAPBREAK' in the instruction: the second score above the first; 'TWOLINES': only two score lines."""

    def __init__(self):
        self.log = []

    def __enter__(self):
        from duetgen.llm.testing import LocalHandler, serve_in_thread

        judge = self

        class Handler(LocalHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                judge.log.append(body)
                text = body["messages"][0]["content"][0]["text"]
                scores = [2, 4, 1] if "CAPBREAK" in text else [4, 3, 3][:2 if "TWOLINES" in text else 3]
                names = ["Prompt Compliance", "Visual Naturalness", "Physical & Detail Coherence"]
                reply = "Brief reasoning: placeholder reasoning.\n" + "\n".join(f"{n}: {v}" for n, v in zip(names, scores))
                self.send_json(200, {"id": "j", "object": "chat.completion", "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": reply}}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

        self.httpd = serve_in_thread(Handler, "prose-judge")
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        from duetgen.llm.testing import stop_server

        stop_server(self.httpd)


def imgedit_fixture(root: Path) -> None:
    edits = {"1082": {"id": "animal/000000001.jpg", "prompt": "Placeholder adjust edit.", "edit_type": "adjust"},
             "673": {"id": "style/000000002.jpg", "prompt": "Placeholder style edit CAPBREAK.", "edit_type": "style"},
             "12": {"id": "animal/000000003.jpg", "prompt": "Placeholder add edit TWOLINES.", "edit_type": "add"},
             "13": {"id": "animal/000000004.jpg", "prompt": "Placeholder remove edit.", "edit_type": "remove"}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "basic_edit.json").write_text(json.dumps(edits))
    for key, e in edits.items():
        img(root / "original_images" / e["id"])
        img(root / "edited" / f"{key}.png", (10, 200, 10))


def test_imgedit_with_the_users_official_prompt_file_sends_it_as_basic_bench_does_and_reads_prose(tmp_path):
    from typer.testing import CliRunner

    from duetgen.cli import app

    imgedit_fixture(tmp_path)
    prompts = official_prompts(tmp_path / "prompts.json")
    args = ["eval", "run", "--benchmark", "imgedit", "--pred", str(tmp_path / "edited"), "--prompts",
            str(tmp_path / "basic_edit.json"), "--images", str(tmp_path / "original_images"), "--judge-model", "j",
            "--max-retries", "0", "--no-progress"]
    with ProseJudge() as judge_server:
        r = CliRunner().invoke(app, [*args, "--judge-url", judge_server.url, "--out", str(tmp_path / "run"),
                                     "--judge-prompts", str(prompts)])
        assert r.exit_code == 0, r.output
        # basic_bench.py's request: one user message, the prompt with the instruction in place, then both images
        sent = {b["messages"][0]["content"][0]["text"].split("instruction is : ")[1].split(".")[0]: b
                for b in judge_server.log}
        assert sorted(sent) == ["Placeholder add edit TWOLINES", "Placeholder adjust edit",
                                "Placeholder remove edit", "Placeholder style edit CAPBREAK"]
        for b in judge_server.log:
            assert [m["role"] for m in b["messages"]] == ["user"] and "response_format" not in b
            assert [p["type"] for p in b["messages"][0]["content"]] == ["text", "image_url", "image_url"]
            assert "<edit_prompt>" not in b["messages"][0]["content"][0]["text"]
        assert "PLACEHOLDER rater prompt for adjust" in sent["Placeholder adjust edit"]["messages"][0]["content"][0]["text"]
        # the same run directory with the project's templates is another run
        again = CliRunner().invoke(app, [*args, "--judge-url", judge_server.url, "--out", str(tmp_path / "run")])
        assert again.exit_code == 2 and "different templates settings" in again.output
    res = lines(tmp_path / "run")
    assert res["1082"]["metrics"]["Score"] == {"state": "ok", "value": pytest.approx(10 / 3)}
    assert res["1082"]["calls"]["edit"][0]["justification"] == "placeholder reasoning."
    assert res["1082"]["calls"]["edit"][0]["judge"]["template"].startswith("imgedit_official_adjust@user-file:")
    cap, two = res["673"]["calls"]["edit"][0], res["12"]["calls"]["edit"][0]
    assert cap["state"] == "unparsable" and "may not exceed the first" in cap["error"]
    assert two["state"] == "unparsable" and "2 'Name: N' score line(s) in the reply, expected 3" in two["samples"][0]["error"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    src = run["settings"]["prompt_source"]
    assert src["source"] == "official prompt file" and src["path"] == str(prompts.resolve())
    assert src["reply"] == {"rule": "line_scores", "fields": ["criterion_1", "criterion_2", "criterion_3"], "range": [1, 5]}
    assert sorted(run["settings"]["templates"]) == [f"imgedit_official_{t}" for t in sorted(
        ("replace", "add", "adjust", "remove", "style", "action", "extract", "background", "compose"))]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["prompt_source"]["sha256"] == src["sha256"]
    # request states: the two-line reply did not parse; the cap breach parsed and is refused per unit
    assert summary["judge_requests"]["unparsable"] == 1 and summary["judge_requests"]["ok"] == 3
    html, _ = write_report([tmp_path / "run"], tmp_path / "report.html")
    assert "judge prompts: the benchmark&#x27;s official prompt file" in html.read_text()


@pytest.mark.parametrize("content, message", [
    ([], r"expected a JSON object of prompts, got list; layout: ImgEdit's judge prompt file"),
    ({"stylize": "x <edit_prompt>"}, r"key 'stylize' is not an ImgEdit Basic edit type; layout: ImgEdit's judge prompt"),
    ({"add": "no placeholder here"}, r"key 'add': must be a prompt string containing <edit_prompt>; layout"),
    ({"add": ["a list <edit_prompt>"]}, r"key 'add': must be a prompt string containing <edit_prompt>"),
    ({"remove": "uses {braces} <edit_prompt>"}, r"key 'remove': holds \{braces\}, which our templates would read"),
    ({"compose": None}, r"key 'compose': must be a prompt string"),
])
def test_an_official_prompt_file_in_another_layout_is_refused_naming_the_layout_and_the_key(content, message, tmp_path):
    from duetgen.eval.benchmarks.readers import read_imgedit_judge_prompts

    path = tmp_path / "prompts.json"
    if isinstance(content, dict):
        official_prompts(path, **content)
    else:
        path.write_text(json.dumps(content))
    with pytest.raises(ReaderError, match=message):
        read_imgedit_judge_prompts(path)


def test_an_official_prompt_file_missing_an_edit_type_or_given_to_another_benchmark_is_refused(tmp_path):
    from duetgen.eval.benchmarks.readers import read_imgedit_judge_prompts
    from duetgen.eval.harness import HarnessError

    path = official_prompts(tmp_path / "prompts.json")
    data = json.loads(path.read_text())
    del data["extract"]
    path.write_text(json.dumps(data))
    with pytest.raises(ReaderError, match=r"no prompt for edit type 'extract'; layout"):
        read_imgedit_judge_prompts(path)
    gedit_parquet(tmp_path / "g" / "data.parquet")
    with pytest.raises(HarnessError, match="--judge-prompts reads ImgEdit's official prompt file"):
        run_benchmark(RunConfig("gedit", str(tmp_path / "m"), str(tmp_path / "run"), prompts=str(tmp_path / "g"),
                                judge_prompts=str(path)), JudgeConfig("http://127.0.0.1:9/v1", "j"), progress=False)


# ----------------------------------------------------------------------------- the HTML report of the three
def gallery_rows(html: str) -> list[list[tuple[str, list[tuple]]]]:
    """Each gallery row as its cells: (heading, [mean RGB of every embedded image])."""
    import base64
    import io
    import re

    rows = []
    for row in html.split('<div class="gallery-row"')[1:]:
        cells = []
        for cell in re.split(r"<div><h4>", row)[1:]:
            head = cell.split("</h4>")[0]
            colours = []
            for b64 in re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", cell):
                with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
                    colours.append(tuple(round(c) for c in np.asarray(im.convert("RGB"), dtype=float).mean((0, 1))))
            cells.append((head, colours))
        rows.append(cells)
    return rows


def close(colour, target, tol=12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(colour, target))


def test_report_of_each_new_benchmark_has_intervals_and_a_side_by_side_gallery(server, tmp_path):
    red, green = (200, 30, 30), (10, 200, 10)
    # ImgEdit: the source (red) left, the edited image (green) right, per edit
    imgedit_fixture(tmp_path / "imgedit")
    run_benchmark(RunConfig("imgedit", str(tmp_path / "imgedit" / "edited"), str(tmp_path / "r-imgedit"),
                            prompts=str(tmp_path / "imgedit" / "basic_edit.json"),
                            images=str(tmp_path / "imgedit" / "original_images")), judge(server), progress=False)
    # GEdit-Bench: sources (grey) come out of the Parquet table, edits (blue) from the official layout
    gedit_parquet(tmp_path / "gedit" / "data.parquet")
    for rid in ("background_change/en/k1", "subject-add/en/k2", "color_alter/en/k3"):
        img(tmp_path / "method" / "fullset" / f"{rid}.png", (0, 0, 250))
    run_benchmark(RunConfig("gedit", str(tmp_path / "method"), str(tmp_path / "r-gedit"),
                            prompts=str(tmp_path / "gedit")), judge(server), progress=False)
    for run, name, n_items, source, edited in (("r-imgedit", "edited", 4, red, green),
                                               ("r-gedit", "method", 3, (120, 120, 120), (0, 0, 250))):
        html = write_report([tmp_path / run], tmp_path / f"{run}.html")[0].read_text()
        s = json.loads((tmp_path / run / "summary.json").read_text())
        scored = [m for m, row in s["metrics"].items() if row["n"]]
        for m in scored:  # every scored metric with its mean, interval and n in the table
            lo, hi = s["metrics"][m]["ci95"]
            assert f'{s["metrics"][m]["mean"]:.2f}<span class="ci">[{lo:.2f}, {hi:.2f}] n={s["metrics"][m]["n"]}' in html
        rows = gallery_rows(html)
        assert len(rows) == n_items
        for cells in rows:
            assert [c[0] for c in cells] == ["input", name]  # input, then the run's output, side by side
            (_, src), (_, out) = cells
            assert len(src) == 1 and close(src[0], source) and len(out) == 1 and close(out[0], edited)

    # GenEval: with --images (the generation folder), the prompt beside its images; without, a note
    meta = [{"tag": "single_object", "include": [{"class": "placeholder", "count": 1}], "prompt": "placeholder prompt one"},
            {"tag": "colors", "include": [{"class": "placeholder", "count": 1}], "prompt": "placeholder prompt two"}]
    (tmp_path / "evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    generate_geneval(OneImageModel(), tmp_path / "evaluation_metadata.jsonl", tmp_path / "gen", samples=2, progress=False)
    rows = [{"filename": f"gen/{i:05d}/samples/{j:05d}.png", "tag": m["tag"], "prompt": m["prompt"], "correct": j == 0}
            for i, m in enumerate(meta) for j in range(2)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_benchmark(RunConfig("geneval", str(tmp_path / "results.jsonl"), str(tmp_path / "r-geneval"),
                            images=str(tmp_path / "gen")), progress=False)
    html = write_report([tmp_path / "r-geneval"], tmp_path / "geneval.html")[0].read_text()
    assert '0.50<span class="ci">[0.50, 0.50] n=2' in html  # Overall: the mean of the two tasks' 0.5
    g = gallery_rows(html)
    assert len(g) == 2 and all(len(cells[1][1]) == 2 for cells in g)  # both samples of each prompt
    assert "placeholder prompt one" in html and "placeholder prompt two" in html
    run_benchmark(RunConfig("geneval", str(tmp_path / "results.jsonl"), str(tmp_path / "r-noimages")), progress=False)
    assert "No gallery" in write_report([tmp_path / "r-noimages"], tmp_path / "n.html")[0].read_text()
    from duetgen.eval.harness import HarnessError

    with pytest.raises(HarnessError, match=r"00000/metadata.jsonl not found; expected GenEval's layout <out>/<5-digit"):
        run_benchmark(RunConfig("geneval", str(tmp_path / "results.jsonl"), str(tmp_path / "r-bad"),
                                images=str(tmp_path / "imgedit")), progress=False)
