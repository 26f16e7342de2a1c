"""The benchmark harness end to end: fake model outputs on disk, a judge server on 127.0.0.1 over real
HTTP, runs through the library and the CLI (also as a subprocess killed mid-run), reports, adapters."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_fakes import answer_parts, prompt_record, write_predictions, write_prompts  # noqa: E402
from eval_judge_server import JudgeServer, expected_score, request_images, request_text  # noqa: E402

from duetgen.cli import app  # noqa: E402
from duetgen.data.dataset import Dataset, DatasetWriter  # noqa: E402
from duetgen.data.record import ImagePart, Message, Record, TextPart  # noqa: E402
from duetgen.eval.adapters import Answer, Model, import_outputs, run_model  # noqa: E402
from duetgen.eval.harness import HarnessError, RunConfig, read_results, run_benchmark  # noqa: E402
from duetgen.eval.judge import JudgeConfig, load_template  # noqa: E402
from duetgen.eval.report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def server():
    s = JudgeServer().start()
    yield s
    s.stop()


def judge(server, **kw) -> JudgeConfig:
    return JudgeConfig(server.url, "judge-test", max_retries=0, **kw)


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def item_of(body: dict) -> str:
    """Which fake item a judge request is about (its ITEM-nnn token)."""
    import re

    return "item-" + re.search(r"ITEM-(\d{3})", request_text(body)).group(1)


def signature(body: dict) -> str:
    return hashlib.sha256((request_text(body) + "".join(request_images(body)) + str(body.get("seed"))).encode()).hexdigest()


def schema_fields(body: dict) -> set:
    return set(body["response_format"]["json_schema"]["schema"]["properties"])


# ----------------------------------------------------------------------------- scores and states
def test_run_scores_what_the_judge_said_and_counts_failures_without_scoring_them(server, tmp_path):
    write_predictions(tmp_path / "pred", 8, markers={1: "JUDGE_REFUSE", 2: "JUDGE_BADJSON", 3: "JUDGE_500"},
                      no_images={4})
    server.reset()
    s = run_benchmark(RunConfig("cooking", str(tmp_path / "pred"), str(tmp_path / "run")), judge(server), progress=False)
    res = {r["id"]: r for r in lines(tmp_path / "run")}
    assert list(res) == [f"item-{i:03d}" for i in range(8)]

    assert res["item-001"]["metrics"]["T-Com"] == {"state": "refusal", "value": None}
    assert res["item-002"]["metrics"]["I-Q"] == {"state": "unparsable", "value": None}
    assert res["item-003"]["metrics"]["IT-Co"] == {"state": "api_error", "value": None}
    assert res["item-004"]["metrics"]["I-Q"] == {"state": "no_image", "value": None}
    assert res["item-004"]["metrics"]["T-Com"]["state"] == "ok"

    # every ok value is exactly what the server answered for that item's request(s)
    bodies = [e["body"] for e in server.log]
    for iid in ("item-000", "item-005", "item-007"):
        seq = [b for b in bodies if item_of(b) == iid and "text_completeness" in schema_fields(b)]
        img = [b for b in bodies if item_of(b) == iid and "image_quality" in schema_fields(b)]
        assert len(seq) == 1 and len(img) == 2
        assert res[iid]["metrics"]["T-Com"]["value"] == expected_score(seq[0], "text_completeness", 1, 5)
        assert res[iid]["metrics"]["I-Q"]["value"] == np.mean([expected_score(b, "image_quality", 1, 5) for b in img])
        unit = res[iid]["calls"]["sequence"][0]
        assert unit["judge"]["template"] == load_template("duetgen_sequence").version_key
        assert unit["judge"]["model"] == "judge-test" and unit["judge"]["preprocess"]

    t = s["metrics"]["T-Com"]
    ok_ids = ["item-000", "item-004", "item-005", "item-006", "item-007"]
    assert t["n"] == 5 and t["mean"] == pytest.approx(np.mean([res[i]["metrics"]["T-Com"]["value"] for i in ok_ids]))
    assert (t["states"]["refusal"], t["states"]["unparsable"], t["states"]["api_error"]) == (1, 1, 1)
    assert t["ci95"][0] <= t["mean"] <= t["ci95"][1]
    iq = s["metrics"]["I-Q"]
    assert iq["n"] == 4 and iq["states"]["no_image"] == 1
    assert s["judge_requests"]["api_error"] == 3 and s["judge_requests"]["refusal"] == 3
    assert set(s["categories"]) == {"soups", "grills"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]["T-Com"] == t


def test_rerun_costs_nothing_but_the_api_errors_and_a_shared_cache_serves_a_new_run(server, tmp_path):
    write_predictions(tmp_path / "pred", 6, markers={3: "JUDGE_500"})
    cfg = RunConfig("cooking", str(tmp_path / "pred"), str(tmp_path / "run"))
    server.reset()
    first = run_benchmark(cfg, judge(server), progress=False)
    assert server.count == 6 * 3
    before = (tmp_path / "run" / "results.jsonl").read_bytes()

    server.reset()
    again = run_benchmark(cfg, judge(server), progress=False)
    assert server.count == 3 and {item_of(e["body"]) for e in server.log} == {"item-003"}
    assert (tmp_path / "run" / "results.jsonl").read_bytes() == before
    assert again["metrics"] == first["metrics"]
    inv = json.loads((tmp_path / "run" / "run.json").read_text())["invocations"]
    assert [i["kept"] for i in inv] == [0, 5] and inv[1]["http_requests"] == 3

    server.reset()
    other = RunConfig("cooking", str(tmp_path / "pred"), str(tmp_path / "run2"), cache=str(tmp_path / "run" / "score_cache.sqlite"))
    third = run_benchmark(other, judge(server), progress=False)
    assert server.count == 3  # everything but the api_error item comes from the shared score cache
    assert third["metrics"] == first["metrics"]


def test_k_three_records_three_samples_per_unit(server, tmp_path):
    write_predictions(tmp_path / "pred", 2)
    server.reset()
    run_benchmark(RunConfig("cooking", str(tmp_path / "pred"), str(tmp_path / "run")), judge(server, k=3), progress=False)
    assert server.count == 2 * 3 * 3
    unit = lines(tmp_path / "run")[0]["calls"]["image"][1]
    assert [s["state"] for s in unit["samples"]] == ["ok"] * 3 and unit["judge"]["k"] == 3
    assert unit["scores"]["image_quality"] == np.median([s["scores"]["image_quality"] for s in unit["samples"]])


def test_a_run_directory_refuses_other_settings(server, tmp_path):
    write_predictions(tmp_path / "pred", 2)
    cfg = RunConfig("cooking", str(tmp_path / "pred"), str(tmp_path / "run"))
    run_benchmark(cfg, judge(server), progress=False)
    with pytest.raises(HarnessError, match="different judge settings"):
        run_benchmark(cfg, judge(server, k=2), progress=False)
    with pytest.raises(HarnessError, match="different benchmark settings"):
        run_benchmark(RunConfig("howto", str(tmp_path / "pred"), str(tmp_path / "run")), judge(server), progress=False)



def test_a_run_directory_refuses_another_models_outputs_and_takes_a_new_name(server, tmp_path):
    write_predictions(tmp_path / "pred1", 2)
    write_predictions(tmp_path / "pred2", 2, salt=3)
    run_benchmark(RunConfig("cooking", str(tmp_path / "pred1"), str(tmp_path / "run"), name="model-a"), judge(server),
                  progress=False)
    with pytest.raises(HarnessError, match="holds a run of other inputs: pred .*pred1.*pred2"):
        run_benchmark(RunConfig("cooking", str(tmp_path / "pred2"), str(tmp_path / "run"), name="model-b"), judge(server),
                      progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["name"] == "model-a"
    s = run_benchmark(RunConfig("cooking", str(tmp_path / "pred1"), str(tmp_path / "run"), name="model-a2"),
                      judge(server), progress=False)
    assert s["name"] == "model-a2" == json.loads((tmp_path / "run" / "run.json").read_text())["name"]


def test_changed_prediction_is_judged_again_and_only_it(server, tmp_path):
    write_predictions(tmp_path / "pred", 3)
    cfg = RunConfig("cooking", str(tmp_path / "pred"), str(tmp_path / "run"))
    run_benchmark(cfg, judge(server), progress=False)
    import shutil

    shutil.rmtree(tmp_path / "pred")
    write_predictions(tmp_path / "pred", 3, salt=5)  # same text, other images
    server.reset()
    run_benchmark(cfg, judge(server), progress=False)
    # the sequence call and both image calls of every item see new images
    assert server.count == 3 * 3


# ----------------------------------------------------------------------------- resume after a real kill
@pytest.mark.slow
def test_resume_after_sigkill_sends_no_duplicate_requests_and_ends_identical(tmp_path):
    srv = JudgeServer(latency_s=0.08).start()
    try:
        n = 12
        write_predictions(tmp_path / "pred", n)
        cmd = [sys.executable, "-m", "duetgen.cli", "eval", "run", "--benchmark", "cooking", "--pred", str(tmp_path / "pred"),
               "--judge-url", srv.url, "--judge-model", "judge-test", "--max-concurrency", "2", "--max-retries", "0",
               "--no-progress"]
        out = tmp_path / "run"
        proc = subprocess.Popen(cmd + ["--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            if (out / "results.jsonl").exists() and len(read_results(out / "results.jsonl")) >= 3:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        finished = set(read_results(out / "results.jsonl"))
        assert 3 <= len(finished) < n, "the run must be killed mid-way"
        with open(out / "results.jsonl", "ab") as f:
            f.write(b'{"id": "item-0')  # a torn last line, as a kill during a write leaves it
        first = [e["body"] for e in srv.log]
        srv.reset()

        done = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        second = [e["body"] for e in srv.log]
        assert not {item_of(b) for b in second} & finished  # finished items cost nothing
        dup = {signature(b) for b in first} & {signature(b) for b in second}
        assert len(dup) <= 2  # at most the requests in flight at the kill (max-concurrency 2)

        srv.reset()
        fresh = subprocess.run(cmd + ["--out", str(tmp_path / "fresh")], cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
        assert fresh.returncode == 0, fresh.stderr
        assert srv.count == n * 3
        assert {signature(b) for b in first} | {signature(b) for b in second} == {signature(e["body"]) for e in srv.log}
        assert (out / "results.jsonl").read_bytes() == (tmp_path / "fresh" / "results.jsonl").read_bytes()
        s1 = json.loads((out / "summary.json").read_text())
        s2 = json.loads((tmp_path / "fresh" / "summary.json").read_text())
        assert s1["metrics"] == s2["metrics"] and s1["categories"] == s2["categories"]

        srv.reset()
        again = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and srv.count == 0
        # the killed invocation is on record (unfinished), before the two that finished
        inv = json.loads((out / "run.json").read_text())["invocations"]
        assert [i["finished"] is None for i in inv] == [True, False, False] and inv[0]["judged"] == n
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- prompts and coverage
def test_prompts_define_the_items_and_missing_predictions_are_counted_not_scored(server, tmp_path):
    write_prompts(tmp_path / "prompts", 5)
    write_predictions(tmp_path / "pred", 5, skip={2})
    s = run_benchmark(RunConfig("cooking", str(tmp_path / "pred"), str(tmp_path / "run"), prompts=str(tmp_path / "prompts")),
                      judge(server), progress=False)
    assert s["n_items"] == 5 and s["coverage"]["missing"] == 1 and s["coverage"]["expected_items"] == 200
    assert all(v["states"]["missing"] == 1 and v["n"] == 4 for v in s["metrics"].values())
    assert lines(tmp_path / "run")[2]["metrics"]["T-Com"] == {"state": "missing", "value": None}


def test_predictions_that_do_not_match_the_benchmark_are_refused(server, tmp_path):
    write_prompts(tmp_path / "prompts", 3)
    write_predictions(tmp_path / "pred", 4)
    with pytest.raises(HarnessError, match=r"not items of the benchmark prompts .*item-003"):
        run_benchmark(RunConfig("cooking", str(tmp_path / "pred"), str(tmp_path / "r1"), prompts=str(tmp_path / "prompts")),
                      judge(server), progress=False)
    with DatasetWriter(tmp_path / "other") as w:
        w.write(Record("item-000", [Message("user", [TextPart("How do I boil an egg?")]),
                                    Message("assistant", [TextPart("Boil it.")])]))
    with pytest.raises(HarnessError, match="answers a different request"):
        run_benchmark(RunConfig("cooking", str(tmp_path / "other"), str(tmp_path / "r2"), prompts=str(tmp_path / "prompts")),
                      judge(server), progress=False)
    with pytest.raises(HarnessError, match="text-only inputs"):
        run_benchmark(RunConfig("cooking_text_input", str(tmp_path / "pred"), str(tmp_path / "r3")), judge(server),
                      progress=False)
    write_predictions(tmp_path / "noimg", 1, input_image=False)
    with pytest.raises(HarnessError, match="requires an input image"):
        run_benchmark(RunConfig("cooking", str(tmp_path / "noimg"), str(tmp_path / "r4")), judge(server), progress=False)
    with pytest.raises(HarnessError, match="give --judge-url"):
        run_benchmark(RunConfig("cooking", str(tmp_path / "pred"), str(tmp_path / "r5")), None, progress=False)


# ----------------------------------------------------------------------------- CoMM and InterleavedBench
def test_comm_irs_is_two_calls_and_the_first_never_sees_an_image(server, tmp_path):
    server.reset()  # task 4 (the default, the paper's Table 2): the task3 folder is counted, not judged
    s = run_benchmark(RunConfig("comm", str(FIX / "comm_results"), str(tmp_path / "run")), judge(server), progress=False)
    predict = [e for e in server.log if "descriptions" in schema_fields(e["body"])]
    pairs = [e for e in server.log if schema_fields(e["body"]) == {"justification", "score"}]
    document = [e for e in server.log if "style_consistency" in schema_fields(e["body"])]
    assert len(predict) == 1 and len(document) == 1 and len(pairs) == 3
    assert s["coverage"]["task"] == "task4" and s["coverage"]["other_tasks_not_judged"] == {"task3": 1}
    assert all(e["n_images"] == 0 for e in predict)
    assert [e["n_images"] for e in document] == [3]
    assert all(e["n_images"] == 1 for e in pairs)
    # each pair call scores an image against the description call 1 predicted for it
    predicted = [d for e in predict for d in json.loads(_reply_of(e["body"]))["descriptions"]]
    assert sorted(d for e in pairs for d in predicted if d in request_text(e["body"])) == sorted(predicted)
    res = {r["id"]: r for r in lines(tmp_path / "run")}
    q = res["howto_0001_task4"]
    assert list(res) == ["howto_0001_task4"] and q["category"] == "task4" and len(q["calls"]["irs"]["pairs"]) == 3
    assert q["metrics"]["IRS"]["value"] == pytest.approx(np.mean([u["scores"]["score"] for u in q["calls"]["irs"]["pairs"]]))
    assert s["metrics"]["IRS"]["n"] == 1 and 0 <= s["metrics"]["IRS"]["mean"] <= 10
    assert set(s["metrics"]) == {"Sty.", "Enti.", "Tren.", "Comp.", "ImgQ", "IRS"}

    server.reset()  # task 3: its context images (from origin/) go to the judge, never to the IRS prediction
    s3 = run_benchmark(RunConfig("comm", str(FIX / "comm_results"), str(tmp_path / "run3"), task="task3"),
                       judge(server), progress=False)
    predict = [e for e in server.log if "descriptions" in schema_fields(e["body"])]
    document = [e for e in server.log if "style_consistency" in schema_fields(e["body"])]
    assert [e["n_images"] for e in predict] == [0] and [e["n_images"] for e in document] == [4]
    assert s3["n_items"] == 1 and s3["coverage"]["task"] == "task3"


def _reply_of(body):
    from eval_judge_server import answer

    return json.dumps(answer(body))


class Illustrator(Model):
    """A tiny deterministic Model: one sentence and one picture per request."""

    name = "illustrator"

    def __init__(self):
        self.calls = 0

    def generate(self, request, item_id):
        self.calls += 1
        text = request[-1].text
        shown = [p.image for m in request for p in m.content if isinstance(p, ImagePart)]
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in shown)
        colour = tuple(hashlib.sha256(text.encode()).digest()[:3])
        return Answer([TextPart(f"Here is my answer to: {text[:40]}"), ImagePart(Image.new("RGB", (40, 40), colour))])


def test_interleavedbench_with_its_json_prompts_and_a_model_run_through_the_adapter(server, tmp_path):
    ib = FIX / "interleavedbench" / "interleaved_bench.json"
    model = Illustrator()
    assert run_model(model, ib, tmp_path / "pred", limit=2, progress=False) == 2
    assert run_model(model, ib, tmp_path / "pred", progress=False) == 1  # resumes: only the third is generated
    assert model.calls == 3
    recs = {r.id: r for r in Dataset(tmp_path / "pred")}
    assert len(recs["ib_wikihow_0002"].image_parts("user")) == 2 and recs["3"].meta["model"] == "illustrator"
    s = run_benchmark(RunConfig("interleavedbench", str(tmp_path / "pred"), str(tmp_path / "run"), prompts=str(ib)),
                      judge(server), progress=False)
    assert s["n_items"] == 3 and s["coverage"]["missing"] == 0
    aspects = ("T-Q", "I-Q", "I-Co", "IT-Co", "Helpfulness")
    for r in lines(tmp_path / "run"):
        five = [r["metrics"][m]["value"] for m in aspects]
        assert "Avg." not in r["metrics"] and all(0 <= v <= 5 for v in five)  # Avg. is a summary of means
    assert s["metrics"]["Avg."]["mean"] == pytest.approx(np.mean([s["metrics"][m]["mean"] for m in aspects]))
    assert set(s["categories"]) == {"storytelling_generation", "wikihow_next_step", "report_generation"}


# ----------------------------------------------------------------------------- ShapeWorld through the harness
class ShapeWorldSolver(Model):
    """A rule-based Model for ShapeWorld: parses the prompt, reads the canvas, draws the answer.
    Every third answer drops its last image, so the scores are not all perfect."""

    name = "solver"

    def __init__(self):
        self.n = 0

    def generate(self, request, item_id):
        from duetgen.shapeworld.judge import parse_prompt

        self.n += 1
        user = request[-1]
        canvas = user.images[0].image if user.images else None
        parts = parse_prompt(user.text, canvas).record("x").messages[1].content
        if self.n % 3 == 0 and any(isinstance(p, ImagePart) for p in parts):
            last = max(i for i, p in enumerate(parts) if isinstance(p, ImagePart))
            parts = parts[:last] + parts[last + 1:]
        return Answer(parts)


def test_shapeworld_benchmark_equals_the_exact_judge(tmp_path):
    from duetgen.shapeworld import judge, world

    world.generate(tmp_path / "truth", 12, seed=3, split="test", kinds=["how-to", "continuation", "understanding",
                                                                           "text-to-image"], progress=False)
    run_model(ShapeWorldSolver(), tmp_path / "truth", tmp_path / "pred", limit=10, progress=False)  # 2 missing
    s = run_benchmark(RunConfig("shapeworld", str(tmp_path / "pred"), str(tmp_path / "run"), truth=str(tmp_path / "truth")),
                      progress=False)
    exact = judge.evaluate(tmp_path / "pred", tmp_path / "truth", progress=False)["summary"]["all"]
    labels = judge.METRIC_LABELS
    for key, label in labels.items():
        if exact[key] is None:
            assert s["metrics"][label]["n"] == 0
        else:
            assert s["metrics"][label]["mean"] == pytest.approx(exact[key])
    assert s["coverage"]["missing"] == 2 == exact["missing"]
    res = lines(tmp_path / "run")
    perfect = [r for i, r in enumerate(res[:10]) if (i + 1) % 3]
    assert all(v["value"] == 1.0 for r in perfect for v in r["metrics"].values() if v["state"] == "ok")
    assert any(v["value"] < 1.0 for r in res for v in r["metrics"].values() if v["state"] == "ok")
    # an answer image that does not decode is that item's bad_image; the rest of the run goes on
    rec = next(r for r in Dataset(tmp_path / "pred") if r.image_parts("assistant"))
    (tmp_path / "pred" / rec.image_parts("assistant")[-1].path).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    s2 = run_benchmark(RunConfig("shapeworld", str(tmp_path / "pred"), str(tmp_path / "run-bad"),
                                 truth=str(tmp_path / "truth")), progress=False)
    bad = [r for r in lines(tmp_path / "run-bad") if "error" in r]
    assert [r["id"] for r in bad] == [rec.id] and "not a readable image" in bad[0]["error"]
    assert all(v["state"] in ("bad_image", "not_applicable") for v in bad[0]["metrics"].values())
    assert sum(row["n"] for row in s2["metrics"].values()) < sum(row["n"] for row in s["metrics"].values())
    with pytest.raises(HarnessError, match="give --truth"):
        run_benchmark(RunConfig("shapeworld", str(tmp_path / "pred"), str(tmp_path / "run2")), progress=False)
    with pytest.raises(HarnessError, match="scored exactly"):
        run_benchmark(RunConfig("shapeworld", str(tmp_path / "pred"), str(tmp_path / "run3"), truth=str(tmp_path / "truth")),
                      JudgeConfig("http://127.0.0.1:9/v1", "j"), progress=False)


# ----------------------------------------------------------------------------- report
def test_report_compares_runs_with_intervals_chart_states_and_gallery(server, tmp_path):
    write_predictions(tmp_path / "a", 6, markers={2: "JUDGE_REFUSE"})
    with DatasetWriter(tmp_path / "b") as w:  # a second model, one answer trying to inject markup
        for i in range(6):
            rec = prompt_record(i)
            parts = answer_parts(i, salt=9)
            if i == 0:
                parts.insert(0, TextPart("<script>alert(1)</script>"))
            rec.messages.append(Message("assistant", parts))
            w.write(rec)
    for name in ("a", "b"):
        run_benchmark(RunConfig("cooking", str(tmp_path / name), str(tmp_path / f"run_{name}"), name=f"model-{name}"),
                      judge(server), progress=False)
    html_path, json_path = write_report([tmp_path / "run_a", tmp_path / "run_b"], tmp_path / "rep" / "report.html",
                                        gallery_items=3)
    page = html_path.read_text()
    assert "model-a" in page and "model-b" in page and "T-Com" in page and "IT-Co" in page
    assert page.count("data:image/png;base64,") == 1  # the bar chart
    assert "refusal 1" in page  # the failure count of model-a
    assert page.count('class="gallery-row"') == 3 and page.count("data:image/jpeg;base64,") >= 3 * (1 + 2 * 2)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "duetgen_sequence@1:" in page and "rgb-max512-bicubic-jpeg90" in page
    summary = json.loads(json_path.read_text())
    assert [r["name"] for r in summary["runs"]] == ["model-a", "model-b"]
    for r, d in zip(summary["runs"], ("run_a", "run_b")):
        assert r["metrics"] == json.loads((tmp_path / d / "summary.json").read_text())["metrics"]
    png = page.split("data:image/png;base64,")[1].split('"')[0]
    import base64
    import io

    with Image.open(io.BytesIO(base64.b64decode(png))) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_report_of_a_benchmark_given_as_a_file_and_of_names_with_dollar_signs(server, tmp_path):
    write_predictions(tmp_path / "p", 2, input_image=False)
    bench = json.loads((ROOT / "duetgen" / "eval" / "benchmarks" / "howto.json").read_text())
    (tmp_path / "mybench.json").write_text(json.dumps(dict(bench, name="mybench", title="My $x$ bench")))
    run_benchmark(RunConfig(str(tmp_path / "mybench.json"), str(tmp_path / "p"), str(tmp_path / "r1"),
                            name=r"cost $\frac{a$ model"), judge(server), progress=False)
    (tmp_path / "mybench.json").unlink()  # the run keeps its benchmark
    run_benchmark(RunConfig(str(tmp_path / "r1" / "benchmark.json"), str(tmp_path / "p"), str(tmp_path / "r2"),
                            name="$other$"), judge(server), progress=False)
    page = write_report([tmp_path / "r1", tmp_path / "r2"], tmp_path / "r.html")[0].read_text()  # mathtext raised
    assert "My $x$ bench" in page and "$other$" in page


def test_report_refuses_mixing_benchmarks(server, tmp_path):
    write_predictions(tmp_path / "p", 1, input_image=False)
    run_benchmark(RunConfig("howto", str(tmp_path / "p"), str(tmp_path / "h")), judge(server), progress=False)
    run_benchmark(RunConfig("cooking_text_input", str(tmp_path / "p"), str(tmp_path / "c")), judge(server), progress=False)
    from duetgen.eval.report import ReportError

    with pytest.raises(ReportError, match="report them separately"):
        write_report([tmp_path / "h", tmp_path / "c"], tmp_path / "r.html")
    # an audit: --out RUN/summary.html replaced the run's own summary.json; --out X.json wrote page and JSON to
    # one path (the page was lost)
    summary = (tmp_path / "h" / "summary.json").read_text()
    with pytest.raises(ReportError, match="lies in the run directory"):
        write_report([tmp_path / "h"], tmp_path / "h" / "summary.html")
    assert (tmp_path / "h" / "summary.json").read_text() == summary
    with pytest.raises(ReportError, match="give the HTML page's path"):
        write_report([tmp_path / "h"], tmp_path / "r.json")


def test_report_of_a_run_folder_handed_in_damaged_is_an_error_naming_it(server, tmp_path, monkeypatch):
    """A run folder someone hands in: run.json of another shape (KeyError / TypeError), a results.jsonl line
    nested too deeply, holding a 4,300-digit number, over the line cap or of another shape, raised tracebacks
    out of `eval report` (an audit, session 13). Bad result lines are dropped like a torn one; a run.json
    that names no benchmark, or names one by path without its copy, is a ReportError."""
    from duetgen.eval.report import ReportError, load_run

    write_predictions(tmp_path / "p", 2, input_image=False)
    run_benchmark(RunConfig("howto", str(tmp_path / "p"), str(tmp_path / "r")), judge(server), progress=False)
    results = tmp_path / "r" / "results.jsonl"
    good = results.read_text()
    import duetgen.eval.harness as harness

    monkeypatch.setattr(harness, "MAX_RECORD_LINE_BYTES", 20_000)
    over = '{"id": "w", "metrics": {}, "pad": "' + "y" * 30_000 + '"}\n'
    first, second = good.splitlines(keepends=True)
    results.write_text(first + over + "[" * 5000 + "]" * 5000 + "\n" + '{"id": "x", "n": ' + "9" * 5000 + "}\n"
                       + '{"id": "y"}\n' + '{"id": "z", "metrics": {"T-Com": 3}}\n' + second)
    assert len(load_run(tmp_path / "r")["results"]) == 2  # the lines around the bad ones
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    for bad in ({"name": "x"}, [1, 2], {"settings": {"benchmark": {"name": 1}}}):
        (tmp_path / "r" / "run.json").write_text(json.dumps(bad))
        with pytest.raises(ReportError, match="does not name its benchmark"):
            load_run(tmp_path / "r")
    run["settings"]["benchmark"]["name"] = str(tmp_path / "elsewhere.json")
    (tmp_path / "r" / "run.json").write_text(json.dumps(run))
    with pytest.raises(ReportError, match="by path without keeping a copy"):
        load_run(tmp_path / "r")
    run["settings"]["benchmark"]["name"] = "howto"
    run["bootstrap"] = [1]
    (tmp_path / "r" / "run.json").write_text(json.dumps(run))
    with pytest.raises(ReportError, match="not what `duetgen eval run` writes"):
        load_run(tmp_path / "r")


# ----------------------------------------------------------------------------- CLI and import
def test_cli_run_report_and_errors(server, tmp_path):
    write_predictions(tmp_path / "pred", 3)
    runner = CliRunner()
    args = ["eval", "run", "--benchmark", "cooking", "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "run"),
            "--judge-url", server.url, "--judge-model", "judge-test", "--no-progress", "--max-retries", "0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "T-Com" in r.output and "summary.json" in r.output
    r = runner.invoke(app, ["eval", "report", str(tmp_path / "run"), "--out", str(tmp_path / "report.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report.html").exists() and (tmp_path / "report.json").exists()

    r = runner.invoke(app, ["eval", "run", "--benchmark", "nope", "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown benchmark 'nope'" in r.output
    r = runner.invoke(app, ["eval", "run", "--benchmark", "cooking", "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--judge-url" in r.output
    r = runner.invoke(app, [a if a != "judge-test" else "another-judge" for a in args])
    assert r.exit_code == 2 and "different judge settings" in r.output
    inside = [a if a != str(tmp_path / "run") else str(tmp_path / "pred") for a in args]  # wrote into the dataset
    r = runner.invoke(app, inside)
    assert r.exit_code == 2 and "lies inside --pred" in r.output and not (tmp_path / "pred" / "run.json").exists()
    r = runner.invoke(app, ["eval", "run", "--benchmark", "cooking", "--pred", str(tmp_path / "missing"),
                            "--out", str(tmp_path / "y"), "--judge-url", server.url, "--judge-model", "j"])
    assert r.exit_code == 2 and "neither a DuetGen dataset" in r.output
    r = runner.invoke(app, ["eval", "report", str(tmp_path / "pred"), "--out", str(tmp_path / "z.html")])
    assert r.exit_code == 2 and "not a run directory" in r.output
    base = ["eval", "run", "--benchmark", "cooking", "--pred", str(tmp_path / "pred"), "--judge-model", "judge-test",
            "--no-progress", "--max-retries", "0"]
    r = runner.invoke(app, base + ["--judge-url", server.url, "--out", str(tmp_path / "t0"), "--timeout", "0"])
    assert r.exit_code == 2 and "--timeout" in r.output
    # every judge request failed: the table says so, a warning says what to do, and the exit status is not 0
    r = runner.invoke(app, base + ["--judge-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "dead"),
                                   "--timeout", "2"])
    assert r.exit_code == 2 and "api_error" in r.output and "rerun the same command" in r.output


def test_import_outputs_from_comm_and_from_a_folder_of_jsonl_records(tmp_path):
    assert import_outputs(FIX / "comm_results", tmp_path / "comm", name="their-model") == 2
    ds = Dataset(tmp_path / "comm")
    recs = {r.id: r for r in ds}
    assert len(recs["howto_0001_task4"].image_parts("assistant")) == 3
    assert recs["howto_0001_task4"].meta["model"] == "their-model"
    assert ds.open_image(recs["howto_0002_task3"].image_parts("user")[0].path).size == (32, 32)

    loose = tmp_path / "loose"
    (loose / "pics").mkdir(parents=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(loose / "pics" / "a.png")
    rec = {"id": "x1", "messages": [{"role": "user", "content": [{"type": "text", "text": "Draw."}]},
                                    {"role": "assistant", "content": [{"type": "image", "image": "pics/a.png"}]}]}
    (loose / "out.jsonl").write_text(json.dumps(rec) + "\n")
    assert import_outputs(loose, tmp_path / "imported") == 1
    assert len(list(Dataset(tmp_path / "imported"))[0].image_parts("assistant")) == 1

    rec["messages"][1]["content"][0]["image"] = "../outside.png"
    (loose / "out.jsonl").write_text(json.dumps(rec) + "\n")
    from duetgen.data.record import RecordError

    with pytest.raises(RecordError, match="leaves the dataset root"):
        import_outputs(loose, tmp_path / "imported2")
    assert not (tmp_path / "imported2").exists()  # all or nothing: no partial dataset a run would take for whole


def test_import_reads_no_file_linked_out_of_its_folder_and_leaves_nothing_when_a_record_fails(tmp_path):
    from duetgen.data.record import RecordError

    outside = tmp_path / "outside"
    outside.mkdir()
    rec = {"id": "s", "messages": [{"role": "user", "content": [{"type": "text", "text": "TOP-SECRET"}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}
    (outside / "secret.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "link.jsonl").symlink_to(outside / "secret.jsonl")
    with pytest.raises(RecordError, match="resolves outside"):
        import_outputs(tmp_path / "h1", tmp_path / "o1")
    (tmp_path / "h2").mkdir()
    (tmp_path / "h2" / "z.jsonl").symlink_to("/dev/zero")  # st_size 0: read forever before
    with pytest.raises(RecordError, match="resolves outside"):
        import_outputs(tmp_path / "h2", tmp_path / "o2")
    (tmp_path / "h3" / "s1_task4").mkdir(parents=True)  # CoMM's layout, its results.json linked out
    (outside / "results.json").write_text(json.dumps({"model_input": "SECRET-COMM", "model_output": "x"}))
    (tmp_path / "h3" / "s1_task4" / "results.json").symlink_to(outside / "results.json")
    with pytest.raises(RecordError, match="resolves outside"):
        import_outputs(tmp_path / "h3", tmp_path / "o3")

    good = tmp_path / "good"
    good.mkdir()
    Image.new("RGB", (8, 8)).save(good / "a.png")
    recs = [{"id": f"q{i}", "messages": [{"role": "user", "content": [{"type": "text", "text": "Draw."}]},
                                         {"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}]}
            for i in range(10)]
    recs[7]["messages"][1]["content"][0]["image"] = "nope.png"
    (good / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(RecordError, match="'nope.png' not found"):
        import_outputs(good, tmp_path / "p4", shard_size=2)
    assert not (tmp_path / "p4").exists() and not list(tmp_path.glob(".p4*"))
    recs[7]["messages"][1]["content"][0]["image"] = "a.png"
    (good / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert import_outputs(good, tmp_path / "p4", shard_size=2) == 10  # the fixed input imports into the same OUT


def test_import_refuses_an_image_file_over_the_byte_cap(tmp_path, monkeypatch):
    """A PNG padded with 400 MB passed the header and pixel checks and was read and stored whole (audit)."""
    import io as _io

    import duetgen.eval.benchmarks.readers as readers
    from duetgen.data.images import ImageError

    monkeypatch.setattr(readers, "DEFAULT_MAX_IMAGE_BYTES", 10_000)
    src = tmp_path / "src"
    src.mkdir()
    png = _io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    (src / "ok.png").write_bytes(png.getvalue())
    (src / "padded.png").write_bytes(png.getvalue() + bytes(20_000))
    rec = {"id": "q", "messages": [{"role": "user", "content": [{"type": "text", "text": "Draw."}]},
                                   {"role": "assistant", "content": [{"type": "image", "image": "padded.png"}]}]}
    (src / "r.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(ImageError, match="'padded.png': over the cap of 10,000 bytes"):
        import_outputs(src, tmp_path / "o")
    (src / "r.jsonl").write_text(json.dumps(rec).replace("padded.png", "ok.png") + "\n")
    assert import_outputs(src, tmp_path / "o") == 1
