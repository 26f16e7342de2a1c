"""`duetgen train shapeworld`: the whole recipe in one command (tiny recipe: seconds), resumable after SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train_resume import _env, _kill_after_first_checkpoint


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "duetgen.cli", "train", "shapeworld", "--recipe", "tiny", "--out", str(out), "--quiet",
            *extra]


def _weights(out: Path) -> dict:
    return load_file(out / "model" / "dit" / "diffusion_pytorch_model.safetensors") | \
        load_file(out / "model" / "connector.safetensors")


@pytest.mark.slow
def test_recipe_runs_every_phase_refuses_a_used_dir_and_resumes_a_killed_run_to_the_same_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(full), env=_env(), check=True, capture_output=True)
    phases = json.loads((full / "phases.json").read_text())["phases"]
    assert list(phases) == ["data/train", "data/test", "stage1/stage1-read-first", "stage1/stage1", "stage2/stage2",
                            "eval/eval-test", "export"]
    assert all(p["seconds"] > 0 and p["runs"] == 1 for p in phases.values())
    report = json.loads((full / "eval-test" / "report.json").read_text())
    assert report["summary"]["all"]["n"] == 4 and "DuetGenPipeline" in report["run"]["loop"]

    again = subprocess.run(_cmd(full), env=_env(), capture_output=True, text=True)
    assert again.returncode != 0 and "already holds a run; pass --resume" in again.stderr + again.stdout

    # SIGKILL inside stage 2 (after its first checkpoint), then --resume: same exported weights
    _kill_after_first_checkpoint(_cmd(killed), killed / "stage2", timeout_s=300)
    assert not (killed / "model").exists()
    resumed = subprocess.run(_cmd(killed, "--resume"), env=_env(), check=True, capture_output=True, text=True)
    assert "[stage1/stage1] done before, skipped" in resumed.stdout
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
