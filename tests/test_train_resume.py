"""SIGKILL a training run after a checkpoint, resume it: the per-step losses equal an uninterrupted run's.

Both stages, tiny configs, real subprocesses of the `duetgen train` CLI killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duetgen.shapeworld.world import generate

STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    generate(root / "train", 40, seed=0, split="train", progress=False)
    return root / "train"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "duetgen.cli", "train", *args, "--config", "tiny", "--steps", str(STEPS), "--quiet"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for r in rows:
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice in {run_dir}"
            out[r["step"]] = r["loss"]
    return out


def _kill_after_first_checkpoint(cmd: list[str], run_dir: Path, timeout_s: float = 120) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``run_dir`` holds a checkpoint (also used by test_shapeworld_recipe)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout_s
    while not latest.is_file():
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint within {timeout_s:.0f} s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; the test proves nothing"


def _check_same_curve(cmd_fresh, cmd_resume, full_dir: Path, killed_dir: Path) -> None:
    subprocess.run(cmd_fresh(full_dir), env=_env(), check=True, capture_output=True)
    _kill_after_first_checkpoint(cmd_fresh(killed_dir), killed_dir)
    partial = _losses(killed_dir)
    assert len(partial) < STEPS
    subprocess.run(cmd_resume(killed_dir), env=_env(), check=True, capture_output=True)
    full, resumed = _losses(full_dir), _losses(killed_dir)
    assert sorted(full) == list(range(1, STEPS + 1))
    assert resumed == full  # bitwise equal: same data, same draws, same optimiser state


@pytest.mark.slow
def test_stage1_sigkill_and_resume_gives_the_same_loss_curve(data, tmp_path):
    def fresh(d):
        return _cli("stage1", "--data", str(data), "--out", str(d))

    _check_same_curve(fresh, lambda d: fresh(d) + ["--resume"], tmp_path / "full", tmp_path / "killed")


@pytest.mark.slow
def test_stage2_sigkill_and_resume_gives_the_same_loss_curve(data, tmp_path):
    subprocess.run(_cli("stage1", "--data", str(data), "--out", str(tmp_path / "s1")), env=_env(), check=True,
                   capture_output=True)

    def fresh(d):
        return _cli("stage2", "--stage1", str(tmp_path / "s1"), "--data", str(data), "--out", str(d))

    _check_same_curve(fresh, lambda d: fresh(d) + ["--resume"], tmp_path / "full", tmp_path / "killed")
