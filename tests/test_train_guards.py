"""What a training command refuses or stops on (an audit of `duetgen train` / `duetgen model`): a resume
with another config or another MLLM, a diverged loss, data with nothing to learn, an export over an
existing folder or the run itself, model directories missing their weights or tokenizer."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from typer.testing import CliRunner

from duetgen.cli import app
from duetgen.shapeworld.world import generate
from duetgen.train import stage1, stage2
from duetgen.train.common import TrainDiverged, TrainInputError
from duetgen.train.configs import tiny_stage1, tiny_stage2

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    generate(root / "train", 30, seed=0, split="train", progress=False)
    cfg1 = dataclasses.replace(tiny_stage1(), data=[str(root / "train")], steps=2, warmup_steps=1, sample_every=100)
    mllm_dir = stage1.train(cfg1, root / "stage1", progress=False)
    cfg2 = dataclasses.replace(tiny_stage2(), data=[str(root / "train")], steps=2, warmup_steps=1, sample_every=100,
                               save_every=1)
    stage2.train(cfg2, mllm_dir, root / "stage2", progress=False)
    return root, cfg1, mllm_dir, cfg2


def test_resume_refuses_other_settings_but_takes_more_steps(setup, tmp_path):
    root, cfg1, _, _ = setup
    shutil.copytree(root / "stage1", tmp_path / "s1")
    with pytest.raises(TrainInputError, match=r"other settings \(lr 0.001 -> 0.5\)"):
        stage1.train(dataclasses.replace(cfg1, lr=0.5), tmp_path / "s1", resume_run=True, progress=False)
    with pytest.raises(TrainInputError, match="at step 2, past --steps 1"):
        stage1.train(dataclasses.replace(cfg1, steps=1), tmp_path / "s1", resume_run=True, progress=False)
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["lr"] == cfg1.lr  # not rewritten
    stage1.train(dataclasses.replace(cfg1, steps=3, log_every=1, name="renamed"), tmp_path / "s1", resume_run=True,
                 progress=False)
    rows = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 3


def test_a_short_first_run_resumes_longer_through_the_cli(setup, tmp_path):
    """A review: the CLI shortens the warm-up for a run under it (--steps 1), and the resume with more steps
    then differed in warmup_steps and was refused."""
    root, _, _, _ = setup
    args = ["train", "stage1", "--config", "tiny", "--data", str(root / "train"), "--out", str(tmp_path / "r"), "--quiet"]
    assert runner.invoke(app, args + ["--steps", "1"]).exit_code == 0
    r = runner.invoke(app, args + ["--steps", "3", "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["warmup_steps"] == 1  # the run's own schedule


def test_stage2_is_bound_to_its_mllm(setup, tmp_path):
    root, cfg1, mllm_dir, cfg2 = setup
    other = stage1.train(dataclasses.replace(cfg1, seed=1), tmp_path / "other1", progress=False)
    shutil.copytree(root / "stage2", tmp_path / "s2")
    with pytest.raises(TrainInputError, match="trained on the MLLM at .*holds another one"):
        stage2.train(dataclasses.replace(cfg2, steps=3), other, tmp_path / "s2", resume_run=True, progress=False)
    with pytest.raises(TrainInputError, match="holds another one"):
        stage2.export_checkpoint(tmp_path / "s2" / "checkpoints" / "step-0000002", cfg2, other, tmp_path / "x")
    assert json.loads((root / "stage2" / "mllm.json").read_text())["path"] == str(mllm_dir.resolve())
    # a first attempt that failed before any checkpoint binds nothing: a fresh start records its own MLLM
    with pytest.raises(TrainInputError, match="no records left"):
        stage2.train(dataclasses.replace(cfg2, include_kinds=["nothing"]), other, tmp_path / "s3", progress=False)
    stage2.train(dataclasses.replace(cfg2, steps=1), mllm_dir, tmp_path / "s3", progress=False)
    assert json.loads((tmp_path / "s3" / "mllm.json").read_text())["path"] == str(mllm_dir.resolve())


def test_a_diverged_step_is_never_applied_nor_saved(setup, tmp_path):
    root, cfg1, _, _ = setup
    cfg = dataclasses.replace(cfg1, steps=6, lr=1e8, grad_clip=1e9, save_every=1, keep_last=10)
    with pytest.raises(TrainDiverged, match="training diverged; the step was not applied"):
        stage1.train(cfg, tmp_path / "nan", progress=False)
    from safetensors.torch import load_file

    for ckpt in (tmp_path / "nan" / "checkpoints").glob("step-*"):  # every checkpoint kept holds finite weights
        assert all(t.isfinite().all() for t in load_file(ckpt / "model.safetensors").values())


def test_nothing_to_learn_and_unfinished_stage1_runs_are_refused(setup, tmp_path):
    root, cfg1, _, cfg2 = setup
    shutil.copytree(root / "train", tmp_path / "noasst")
    for shard in (tmp_path / "noasst" / "shards").glob("*.jsonl"):
        recs = [json.loads(x) for x in shard.read_text().splitlines()]
        for r in recs:
            r["messages"] = [m for m in r["messages"] if m["role"] != "assistant"]
        shard.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(TrainInputError, match="no record has an assistant turn"):
        stage1.train(dataclasses.replace(cfg1, data=[str(tmp_path / "noasst")]), tmp_path / "r", progress=False)
    shutil.copytree(root / "stage1", tmp_path / "unfinished")
    shutil.rmtree(tmp_path / "unfinished" / "mllm")
    r = runner.invoke(app, ["train", "stage2", "--config", "tiny", "--stage1", str(tmp_path / "unfinished"),
                            "--data", str(root / "train"), "--steps", "1", "--out", str(tmp_path / "r2"), "--quiet"])
    assert r.exit_code == 2 and "has not finished (no mllm/ yet)" in r.output, r.output


def test_export_step_never_replaces_a_folder_unasked_nor_the_run(setup, tmp_path):
    root, _, mllm_dir, _ = setup
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("thesis")
    args = ["train", "export-step", "--run", str(root / "stage2"), "--step", "2", "--stage1", str(root / "stage1")]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "precious")])
    assert r.exit_code == 2 and "exists; pass --overwrite" in r.output
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "thesis"
    shutil.copytree(root / "stage2", tmp_path / "run")
    for inside in ("", "checkpoints"):  # the run itself; a folder inside it (an audit: all checkpoints went)
        r = runner.invoke(app, ["train", "export-step", "--run", str(tmp_path / "run"), "--step", "2", "--stage1",
                                str(root / "stage1"), "--out", str(tmp_path / "run" / inside), "--overwrite"])
        assert r.exit_code == 2 and "holds or lies inside the run" in r.output
        assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "meta.json").is_file()
    r = runner.invoke(app, args + ["--out", str(tmp_path / "precious"), "--overwrite"])
    assert r.exit_code == 2 and "is not a DuetGen model directory" in r.output  # --overwrite replaces only a model
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "thesis"
    r = runner.invoke(app, args + ["--out", str(tmp_path / "exported")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, args + ["--out", str(tmp_path / "exported"), "--overwrite"])
    assert r.exit_code == 0, r.output


def test_model_check_refuses_directories_missing_weights_or_tokenizer(tmp_path):
    r = runner.invoke(app, ["model", "init", str(tmp_path / "m0"), "--preset", "tiny"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["model", "check", str(tmp_path / "m0")]).exit_code == 0

    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(tmp_path / "m0", d)
        change(d)
        return runner.invoke(app, ["model", "check", str(d)])

    r = broken("noweights", lambda d: (d / "mllm" / "model.safetensors").unlink())
    assert r.exit_code == 2 and "mllm/ holds no *.safetensors weights" in r.output, r.output
    r = broken("cut", lambda d: (d / "dit" / "diffusion_pytorch_model.safetensors").write_bytes(
        (d / "dit" / "diffusion_pytorch_model.safetensors").read_bytes()[:-100]))
    assert r.exit_code == 2 and "not a readable safetensors file" in r.output, r.output
    r = broken("notok", lambda d: (d / "mllm" / "tokenizer.json").unlink())  # generate wrote nothing with it
    assert r.exit_code == 2 and "mllm/ has no tokenizer files" in r.output, r.output
    r = broken("vaelist", lambda d: (d / "vae" / "config.json").write_text("[1, 2]"))
    assert r.exit_code == 2 and "vae/config.json must hold a JSON object" in r.output, r.output

    def huge_image(d):
        saved = json.loads((d / "duetgen.json").read_text())
        saved["settings"]["image_size"] = [10**9, 10**9]
        (d / "duetgen.json").write_text(json.dumps(saved))

    r = broken("huge", huge_image)
    assert r.exit_code == 2 and "two ints in 1..8192" in r.output, r.output


def test_training_reads_a_data_mix_manifest(setup, tmp_path):
    """docs/training.md says stage 2 mixes its data with `duetgen data mix`; training refused the manifest
    ("not a dataset directory") before (an audit)."""
    root, cfg1, _, _ = setup
    r = runner.invoke(app, ["data", "mix", "--dataset", f"sw={root / 'train'}:1", "--num-samples", "40", "--seed", "3",
                            "--out", str(tmp_path / "mix.json")])
    assert r.exit_code == 0, r.output
    from duetgen.train.common import load_records

    items = load_records([str(tmp_path / "mix.json")])
    assert len(items) == 40 and len({rec.id for _, rec in items}) == 30  # 10 records drawn twice
    r = runner.invoke(app, ["train", "stage1", "--config", "tiny", "--data", str(tmp_path / "mix.json"), "--steps", "1",
                            "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output


def test_a_held_out_record_repeated_by_a_mixture_never_trains_nor_breaks_the_sample_pages(setup, tmp_path):
    """A review: a `data mix` manifest whose tail repeats a record made stage 1's sample page write one id
    twice (a crash at every sample step), and its other copies trained on a held-out record."""
    from duetgen.data.dataset import Dataset
    from duetgen.train.common import hold_out

    root, cfg1, _, _ = setup
    ds = Dataset(root / "train")
    recs = list(ds)
    items = [(ds, r) for r in recs[:5]] + [(ds, recs[3]), (ds, recs[5]), (ds, recs[3])]
    train, val = hold_out(items, 2)
    assert [r.id for _, r in val] == [recs[5].id, recs[3].id]
    assert [r.id for _, r in train] == [r.id for r in recs[:3] + [recs[4]]]
    plain = [(ds, r) for r in recs]
    assert hold_out(plain, 4) == (plain[:-4], plain[-4:])  # without repeats: as before


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError
LONG_INT = "1" * 5000  # json.loads: ValueError (Python's 4300-digit limit)


def _aliases(value):
    def change(path):
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(path), metadata={"format": "pt", "aliases": value})
    return change


STEP = "checkpoints/step-0000002/"


@pytest.mark.parametrize("how, name, change, problem", [
    ("export", "config.json", {"steps": "x", "ema_decay": "y"}, "config.json: value.s. of the wrong type: steps='x'"),
    ("export", "mllm.json", "{}", "mllm.json: has no sha256"),
    ("export", "mllm.json", DEEP, "mllm.json: not valid JSON"),
    ("export", STEP + "state.json", "[1]", "state.json: must hold a JSON object"),
    ("export", STEP + "state.json", "{}", "state.json: holds no 'ema' state"),
    ("export", STEP + "state.safetensors", _aliases(DEEP), "state.safetensors: header metadata 'aliases'"),
    ("resume", STEP + "state.safetensors", _aliases(LONG_INT), "state.safetensors: header metadata 'aliases'"),
    ("resume", STEP + "meta.json", "[]", "meta.json: must hold a JSON object"),
    ("resume", STEP + "meta.json", DEEP, "meta.json: not valid JSON"),
    ("resume", "mllm.json", "{}", "mllm.json: has no sha256"),
    ("resume", STEP + "meta.json", {"statefuls": 5}, "meta.json: step / world_size must be ints"),  # (a review:
    ("resume", STEP + "meta.json", {"world_size": "x"}, "meta.json: step / world_size must be ints"),  # TypeErrors)
    ("resume", STEP + "state.json", {"ema": 5}, "state.json: 'ema' holds no saved state"),
], ids=lambda x: x if isinstance(x, str) and len(x) < 40 else None)
def test_malformed_json_in_a_run_folder_is_named(setup, tmp_path, how, name, change, problem):
    """An audit: a run folder whose JSON is nested too deep, holds a 5000-digit number or has the wrong shape
    crashed `train export-step` and --resume with a RecursionError / KeyError / TypeError traceback."""
    import re

    from duetgen.train.checkpoint import CheckpointError

    root, _, mllm_dir, cfg2 = setup
    run = shutil.copytree(root / "stage2", tmp_path / "run")
    if callable(change):
        change(run / name)
    else:
        if isinstance(change, dict):
            change = json.dumps({**json.loads((run / name).read_text()), **change})
        (run / name).write_text(change)
    if how == "export":
        r = runner.invoke(app, ["train", "export-step", "--run", str(run), "--step", "2", "--stage1",
                                str(root / "stage1"), "--out", str(tmp_path / "out")])
        output = r.output.replace("\n", "")  # one error line, however the terminal wraps it
        assert r.exit_code == 2 and str(run / name) in output and re.search(problem, output), r.output
    else:
        with pytest.raises((TrainInputError, CheckpointError), match=problem) as error:
            stage2.train(dataclasses.replace(cfg2, steps=3), mllm_dir, run, resume_run=True, progress=False)
        assert str(run / name) in str(error.value)


def test_a_run_never_writes_into_its_inputs_nor_among_other_files(setup, tmp_path):
    """An audit: `train stage2 --out STAGE1/mllm` wrote the run's config.json over the MLLM's (every later run on
    it failed), and a new run into a dataset or a folder of notes scattered its files among them."""
    root, _, mllm_dir, _ = setup
    mllm_config = (mllm_dir / "config.json").read_text()
    r = runner.invoke(app, ["train", "stage2", "--config", "tiny", "--stage1", str(root / "stage1"), "--data",
                            str(root / "train"), "--steps", "1", "--out", str(mllm_dir), "--quiet"])
    assert r.exit_code == 2 and "lies inside the run's input" in r.output
    assert (mllm_dir / "config.json").read_text() == mllm_config
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("mine")
    r = runner.invoke(app, ["train", "stage1", "--config", "tiny", "--data", str(root / "train"), "--steps", "1",
                            "--out", str(tmp_path / "notes"), "--quiet"])
    assert r.exit_code == 2 and "holds files of something else" in r.output
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["thesis.txt"]


def test_more_packs_per_step_than_an_epoch_holds_is_said(setup, tmp_path, capsys):
    """`--packs-per-rank` far above the data made every step see records twice, silently (session 13's note)."""
    from duetgen.train.common import warn_packs_per_rank

    warn_packs_per_rank(3, 3)
    assert capsys.readouterr().out == ""
    _, cfg1, _, _ = setup
    stage1.train(dataclasses.replace(cfg1, steps=1, packs_per_rank=40), tmp_path / "s1", progress=False)
    assert "--packs-per-rank 40 is more than the" in capsys.readouterr().out
