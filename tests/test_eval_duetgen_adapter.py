"""A DuetGen checkpoint on a benchmark: `duetgen eval generate` then `duetgen eval run`, with the tiny
generation model (tests/generation_model.py: its MLLM writes <BOV> by itself, its DiT is random).

The scores are whatever that model earns; the tests check that the pipeline ran, the records were
written and judged, a rerun generates nothing, answers depend only on (seed, item id), and the
truth answers of ShapeWorld never reach the model."""

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from generation_model import trained_tiny_dir

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_fakes import write_prompts  # noqa: E402
from eval_judge_server import JudgeServer  # noqa: E402

from duetgen.cli import app  # noqa: E402
from duetgen.data.dataset import Dataset, DatasetWriter  # noqa: E402
from duetgen.data.record import ImagePart, Message, Record, TextPart  # noqa: E402
from duetgen.shapeworld import world  # noqa: E402
from duetgen.shapeworld import judge  # noqa: E402
from duetgen.eval.adapters import (AdapterError, DuetGenModel, generate_benchmark, item_seed,  # noqa: E402
                                   model_fingerprint)

torch.set_num_threads(1)
runner = CliRunner()
FAST = ["--steps", "2", "--max-new-tokens", "150"]  # the tiny model's answers end well before 150 tokens


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """Four ShapeWorld test-split continuation items (a canvas in, step text and pictures out)."""
    root = tmp_path_factory.mktemp("sw") / "truth"
    world.generate(root, 4, seed=3, split="test", kinds=["continuation"], progress=False)
    return root


def generate_args(truth, out, *extra):
    return ["eval", "generate", "--benchmark", "shapeworld", "--model", str(trained_tiny_dir()), "--truth", str(truth),
            "--out", str(out), *FAST, "--no-progress", *extra]


@pytest.fixture(scope="module")
def cli_pred(truth, tmp_path_factory):
    """Predictions written by the CLI in two calls: --limit 2, then the rest (a resume)."""
    out = tmp_path_factory.mktemp("pred") / "pred"
    first = runner.invoke(app, generate_args(truth, out, "--limit", "2"))
    assert first.exit_code == 0, first.output
    assert "generated 2 answer(s)" in first.output
    second = runner.invoke(app, generate_args(truth, out))
    assert second.exit_code == 0, second.output
    assert "generated 2 answer(s)" in second.output  # only the two not answered yet
    return out


def answers(root) -> dict:
    """id -> the assistant's parts, images as their bytes."""
    ds = Dataset(root)
    return {r.id: [p.text if isinstance(p, TextPart) else ds.image_path(p.path, r.id).read_bytes()
                   for m in r.messages if m.role == "assistant" for p in m.content] for r in ds}


def files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("generation.json", ".writer.lock")}


# ----------------------------------------------------------------------------- end to end
def test_checkpoint_to_judged_shapeworld_run_in_two_commands_and_a_rerun_generates_nothing(truth, cli_pred, tmp_path):
    truth_ds, pred_ds = Dataset(truth), Dataset(cli_pred)
    truth_recs, preds = {r.id: r for r in truth_ds}, {r.id: r for r in pred_ds}
    assert list(preds) == list(truth_recs)
    model_dir = trained_tiny_dir()
    for rid, rec in preds.items():
        user, answer = rec.messages
        truth_user = truth_recs[rid].messages[0]
        assert user.role == "user" and user.text == truth_user.text
        assert [pred_ds.image_path(p.path, rid).read_bytes() for p in user.images] == \
            [truth_ds.image_path(p.path, rid).read_bytes() for p in truth_user.images]
        assert answer.role == "assistant" and answer.content
        assert rec.meta["model"] == model_dir.name and rec.source == model_dir.name
        gen = rec.meta["generator"]
        assert gen["generation"]["seed"] == item_seed(0, rid) and gen["generation"]["num_steps"] == 2
        assert gen["finish_reason"] in ("end_of_turn", "max_tokens", "max_images")
    assert len({p.meta["generator"]["generation"]["seed"] for p in preds.values()}) == 4
    # the fitted MLLM writes <BOV> by itself on some of these canvases: the DiT ran and its pictures were stored
    drawn = sum(len(r.image_parts("assistant")) for r in preds.values())
    assert drawn >= 1

    run_file = json.loads((cli_pred / "generation.json").read_text())
    assert run_file["benchmark"] == {"name": "shapeworld", "version": "1"}
    assert run_file["model"] == {"fingerprint": model_fingerprint(model_dir), "preset": "tiny"}
    g = run_file["generation"]
    assert g["sampler"]["num_steps"] == 2 and g["temperature"] == 0.0 and g["max_new_tokens"] == 150 and g["seed"] == 0
    assert isinstance(g["guidance_scale"], float) and len(g["image_size"]) == 2  # the model's defaults, resolved
    assert [i["generated"] for i in run_file["invocations"]] == [2, 2] and run_file["invocations"][0]["limit"] == 2

    # command 2: the exact judge scores them; its results equal the ShapeWorld judge run on its own
    run = tmp_path / "run"
    judged = runner.invoke(app, ["eval", "run", "--benchmark", "shapeworld", "--pred", str(cli_pred), "--truth", str(truth),
                                 "--out", str(run), "--no-progress"])
    assert judged.exit_code == 0, judged.output
    lines = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == list(truth_recs) and not any(x["missing"] for x in lines)
    exact = {r["id"]: r for r in judge.evaluate(cli_pred, truth, progress=False)["records"]}
    for line in lines:
        for label, key in ((lab, k) for k, lab in judge.METRIC_LABELS.items()):
            v = line["metrics"][label]
            assert v["value"] == (None if exact[line["id"]][key] is None else pytest.approx(exact[line["id"]][key]))
    icom = {x["id"]: x["metrics"]["I-Com"]["value"] for x in lines}
    assert any(icom[rid] > 0 for rid in preds if preds[rid].image_parts("assistant"))  # pictures were read back
    summary = json.loads((run / "summary.json").read_text())
    assert summary["coverage"]["missing"] == 0 and summary["n_items"] == 4

    # a rerun of command 1 generates nothing and leaves the dataset as it was
    before = files(cli_pred)
    again = runner.invoke(app, generate_args(truth, cli_pred))
    assert again.exit_code == 0, again.output
    assert "generated 0 answer(s)" in again.output
    assert files(cli_pred) == before
    assert [i["generated"] for i in json.loads((cli_pred / "generation.json").read_text())["invocations"]] == [2, 2, 0]


def test_an_answer_depends_only_on_the_seed_and_the_item_id(truth, cli_pred, tmp_path):
    """One uninterrupted run, items in another order, writes what the limited-then-resumed CLI run wrote."""
    model = DuetGenModel.from_pretrained(trained_tiny_dir(), num_steps=2, max_new_tokens=150)
    with DatasetWriter(tmp_path / "reversed") as w:  # same items, reversed order
        for r in reversed(list(Dataset(truth))):
            w.write(Record(r.id, [Message(m.role, [ImagePart(Dataset(truth).image_path(p.path, r.id).read_bytes())
                                                  if isinstance(p, ImagePart) else TextPart(p.text) for p in m.content])
                                  for m in r.messages], r.source, r.meta))
    assert generate_benchmark(model, "shapeworld", tmp_path / "once", truth=tmp_path / "reversed", progress=False) == 4
    assert answers(tmp_path / "once") == answers(cli_pred)

    other = DuetGenModel.from_pretrained(trained_tiny_dir(), num_steps=2, max_new_tokens=150, seed=1)
    generate_benchmark(other, "shapeworld", tmp_path / "seed1", truth=truth, progress=False)
    a, b = answers(cli_pred), answers(tmp_path / "seed1")
    drawn = [rid for rid in a if any(isinstance(x, bytes) for x in a[rid])]
    assert drawn and all(a[rid] != b[rid] for rid in drawn)  # another base seed draws other noise


# ----------------------------------------------------------------------------- the truth stays hidden
def tampered_copy(truth: Path, out: Path) -> None:
    """The same user turns with other assistant turns (a marker text and a black picture)."""
    ds = Dataset(truth)
    with DatasetWriter(out) as w:
        for r in ds:
            user = Message("user", [ImagePart(ds.image_path(p.path, r.id).read_bytes()) if isinstance(p, ImagePart)
                                    else TextPart(p.text) for p in r.messages[0].content])
            fake = Message("assistant", [TextPart("SECRET-TRUTH-MARKER"), ImagePart(Image.new("RGB", (64, 64)))])
            w.write(Record(r.id, [user, fake], r.source, r.meta))


def test_the_model_never_sees_the_truth_answer(truth, tmp_path):
    model = DuetGenModel.from_pretrained(trained_tiny_dir(), num_steps=2, max_new_tokens=150)
    seen = []
    real_run = model.pipe.engine.run

    def spy(messages, config):  # records what reaches the decode loop, then runs it
        seen.append(messages)
        return real_run(messages, config)

    model.pipe.engine.run = spy
    generate_benchmark(model, "shapeworld", tmp_path / "a", truth=truth, progress=False)
    truth_texts = [p.text for r in Dataset(truth) for p in r.messages[1].content if isinstance(p, TextPart)]
    assert len(seen) == 4 and len(truth_texts) > 4
    for messages in seen:
        assert [m.role for m in messages] == ["user"]
        shown = " ".join(p.text for m in messages for p in m.content if isinstance(p, TextPart))
        assert not any(t in shown for t in truth_texts)

    # other truth answers behind the same user turns: the same predictions, the marker nowhere
    tampered_copy(truth, tmp_path / "tampered")
    seen.clear()
    generate_benchmark(model, "shapeworld", tmp_path / "b", truth=tmp_path / "tampered", progress=False)
    assert all("SECRET-TRUTH-MARKER" not in m.text for messages in seen for m in messages)
    assert answers(tmp_path / "b") == answers(tmp_path / "a")


def test_a_truth_item_with_an_earlier_assistant_turn_is_refused_before_any_generation(truth, tmp_path):
    ds = Dataset(truth)
    r = next(iter(ds))
    user = Message("user", [TextPart(r.messages[0].text)])
    with DatasetWriter(tmp_path / "multi") as w:
        w.write(Record("two-turns", [user, Message("assistant", [TextPart("the truth")]), user,
                                     Message("assistant", [TextPart("more truth")])], r.source, r.meta))
    model = DuetGenModel.from_pretrained(trained_tiny_dir(), num_steps=2, max_new_tokens=150)
    with pytest.raises(AdapterError, match="assistant turn before its last user turn"):
        generate_benchmark(model, "shapeworld", tmp_path / "p", truth=tmp_path / "multi", progress=False)
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- a judged benchmark
def test_judged_benchmark_prompts_to_generated_answers_to_judge(tmp_path):
    """Cooking prompts (an image each) -> the tiny model -> the MLLM judge on 127.0.0.1."""
    write_prompts(tmp_path / "prompts", 2)
    out = tmp_path / "pred"
    result = runner.invoke(app, ["eval", "generate", "--benchmark", "cooking", "--model", str(trained_tiny_dir()),
                                 "--prompts", str(tmp_path / "prompts"), "--out", str(out), *FAST, "--no-progress",
                                 "--name", "tiny-duetgen"])
    assert result.exit_code == 0, result.output
    preds = list(Dataset(out))
    assert [p.meta["model"] for p in preds] == ["tiny-duetgen"] * 2 and all(len(p.image_parts("user")) == 1 for p in preds)
    server = JudgeServer().start()
    try:
        judged = runner.invoke(app, ["eval", "run", "--benchmark", "cooking", "--pred", str(out), "--prompts",
                                     str(tmp_path / "prompts"), "--judge-url", server.url, "--judge-model", "j",
                                     "--max-retries", "0", "--out", str(tmp_path / "run"), "--no-progress"])
        assert judged.exit_code == 0, judged.output
        assert server.count >= 2  # at least the sequence call per answer
    finally:
        server.stop()
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["name"] == "pred" and s["coverage"]["missing"] == 0 and s["metrics"]["T-Com"]["n"] == 2


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["--benchmark", "shapeworld", "--model", "{tmp}/nope", "--truth", "{truth}"], "no such model directory"),
    (["--benchmark", "shapeworld", "--model", "{tmp}/half", "--truth", "{truth}"], "not a complete DuetGen directory"),
    (["--benchmark", "shapeworld", "--model", "{model}", "--prompts", "{truth}"], "give --truth"),
    (["--benchmark", "shapeworld", "--model", "{model}"], "give --truth"),
    (["--benchmark", "cooking", "--model", "{model}", "--truth", "{truth}"], "--truth is for exact benchmarks"),
    (["--benchmark", "cooking", "--model", "{model}"], "give --prompts"),
    (["--benchmark", "comm", "--model", "{model}", "--prompts", "{truth}"], "no prompts to generate from"),
    (["--benchmark", "cooking", "--model", "{model}", "--prompts", "{text_only}"], "requires an input image"),
    (["--benchmark", "nope", "--model", "{model}", "--truth", "{truth}"], "unknown benchmark"),
    (["--benchmark", "shapeworld", "--model", "{model}", "--truth", "{tmp}/missing"], "missing': no such file or directory"),
    (["--benchmark", "shapeworld", "--model", "{model}", "--truth", "{truth}", "--top-p", "0"], "top_p"),
])
def test_bad_input_exits_2_naming_it_and_writes_nothing(args, message, truth, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "duetgen.json").write_text("{}")
    write_prompts(tmp_path / "text_only", 1, input_image=False)  # a cooking prompt needs a dish image
    args = [a.format(tmp=tmp_path, truth=truth, model=trained_tiny_dir(), text_only=tmp_path / "text_only") for a in args]
    result = runner.invoke(app, ["eval", "generate", *args, "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_resuming_with_other_settings_or_over_a_foreign_dataset_is_refused(truth, tmp_path):
    out = tmp_path / "pred"
    first = runner.invoke(app, generate_args(truth, out, "--limit", "1"))
    assert first.exit_code == 0, first.output
    other = runner.invoke(app, generate_args(truth, out, "--steps", "3"))
    assert other.exit_code == 2 and "different generation settings" in other.output
    assert len(list(Dataset(out))) == 1
    over_truth = runner.invoke(app, generate_args(truth, truth))  # --out pointed at the truth set itself
    assert over_truth.exit_code == 2 and "did not write" in over_truth.output
    assert all(len(r.messages) == 2 for r in Dataset(truth))
