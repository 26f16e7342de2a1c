"""Checkpoints: atomic layout, no pickle, exact state round trips, and the headline guarantee:
a run killed with SIGKILL and resumed gives exactly the loss curve of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from duetgen.data.packing import PackedSampler, PackingError
from duetgen.train import checkpoint as ckpt_mod
from duetgen.train.checkpoint import (
    CheckpointError,
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_state,
)
from duetgen.train.logging import read_metrics
from duetgen.train.optim import EMA, make_adamw, make_scheduler

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "tiny_train.py"


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def train_steps(model, opt, sched, ema, n):
    losses = []
    for _ in range(n):
        x = torch.randint(0, 10, (6,))
        loss = nn.functional.cross_entropy(model(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(model)
        losses.append(loss.item())
    return losses


def make_all(seed=0):
    torch.manual_seed(seed)
    model = Net()
    opt = make_adamw(model, lr=1e-2, weight_decay=0.1)
    sched = make_scheduler(opt, warmup_steps=2, total_steps=10)
    ema = EMA(model, decay=0.5)
    sampler = PackedSampler([3, 5, 2, 7, 4, 4, 1, 6], budget=8, seed=3)
    return model, opt, sched, ema, sampler


# --- the headline guarantee -------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_loss_curve(tmp_path):
    steps = ["--steps", "24", "--save-every", "5"]
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, str(SCRIPT), "--run-dir", str(clean), *steps], check=True, env=run_env(),
                   capture_output=True, timeout=120)
    expected = read_metrics(clean / "metrics.jsonl")
    assert [e["step"] for e in expected] == list(range(1, 25))

    # Kill a slowed-down copy with a real SIGKILL once it has logged step 13 (checkpoints at 5 and 10).
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--run-dir", str(killed), *steps, "--step-sleep", "0.05"],
                            env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    seen = 0
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists():
            seen = max([0] + [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()
                              if l.strip()])
            if seen >= 13:
                break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run had finished before the kill"
    assert 13 <= seen < 24
    ckpt = latest_checkpoint(killed)
    saved_step = json.loads((ckpt / "meta.json").read_text())["step"]
    assert saved_step < seen, "the kill must lose some steps, or resuming proves little"
    before = read_metrics(killed / "metrics.jsonl")
    assert max(e["step"] for e in before) > saved_step

    out = subprocess.run([sys.executable, str(SCRIPT), "--run-dir", str(killed), *steps], check=True, env=run_env(),
                         capture_output=True, text=True, timeout=120)
    assert f"resumed from step {saved_step}" in out.stdout
    got = read_metrics(killed / "metrics.jsonl")
    assert [e["step"] for e in got] == list(range(1, 25))  # the killed run's extra steps were trimmed
    for e, g in zip(expected, got):
        for key in ("loss", "lr", "grad_norm"):
            assert g[key] == e[key], f"step {e['step']}: {key} {g[key]!r} != uninterrupted {e[key]!r}"
    # ... and the end state is bit-identical too: weights, optimiser moments, EMA
    for name in ("model.safetensors", "optimizer.safetensors", "state.safetensors"):
        a, b = load_file(clean / "step-0000024" / name), load_file(killed / "step-0000024" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs"


# --- layout and atomicity ---------------------------------------------------------------------------


def test_layout_is_safetensors_and_json_only_with_latest_and_keep_last(tmp_path):
    model, opt, sched, ema, sampler = make_all()
    for step in (1, 2, 3, 4):
        train_steps(model, opt, sched, ema, 1)
        save_checkpoint(tmp_path, step, model, opt, scheduler=sched, stateful={"ema": ema, "sampler": sampler},
                        config={"lr": 1e-2, "name": "tiny"}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    assert (tmp_path / "latest").read_text() == "step-0000004\n"
    step_dir = tmp_path / "step-0000004"
    files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())
    assert files == ["meta.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng/rank-00000.json", "state.json", "state.safetensors"]
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["step"] == 4 and meta["config"] == {"lr": 1e-2, "name": "tiny"} and meta["world_size"] == 1
    weights = load_file(step_dir / "model.safetensors")  # plain safetensors: any tool can read the weights
    assert "embed.weight" in weights and "head.weight" not in weights  # tied: stored once, aliased
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_save_killed_before_the_rename_leaves_the_previous_checkpoint_in_charge(tmp_path, monkeypatch):
    model, opt, sched, ema, sampler = make_all()
    stateful = {"ema": ema, "sampler": sampler}
    save_checkpoint(tmp_path, 5, model, opt, scheduler=sched, stateful=stateful)
    train_steps(model, opt, sched, ema, 1)

    real_rename = os.rename

    def dies_at_rename(src, dst):  # the process "dies" with every file of step 6 written but not renamed
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt_mod.os, "rename", dies_at_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 6, model, opt, scheduler=sched, stateful=stateful)
    monkeypatch.setattr(ckpt_mod.os, "rename", real_rename)
    assert (tmp_path / ".tmp-step-0000006").is_dir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000005"
    assert resume(tmp_path, model, opt, scheduler=sched, stateful=stateful).step == 5
    save_checkpoint(tmp_path, 6, model, opt, scheduler=sched, stateful=stateful)  # cleans the leftover
    assert not list(tmp_path.glob(".tmp-*"))
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000006"


def test_stale_or_hostile_latest_pointer_falls_back_to_newest_complete_dir(tmp_path):
    model, opt, sched, ema, sampler = make_all()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, keep_last=None)
    (tmp_path / "latest").write_text("../../etc\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000002"
    (tmp_path / "latest").write_text("step-0000009\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000002"
    (tmp_path / "step-0000003").mkdir()  # a directory without meta.json is not a checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000002"
    assert latest_checkpoint(tmp_path / "nothing-here") is None
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resume(tmp_path / "nothing-here", model)


# --- exact round trips ------------------------------------------------------------------------------


def test_resume_in_process_continues_bitwise(tmp_path):
    model, opt, sched, ema, sampler = make_all()
    train_steps(model, opt, sched, ema, 3)
    packs_before = [next(iter(sampler)).items for _ in range(3)]
    save_checkpoint(tmp_path, 3, model, opt, scheduler=sched, stateful={"ema": ema, "sampler": sampler})
    after = train_steps(model, opt, sched, ema, 4)
    packs_after = [next(iter(sampler)).items for _ in range(5)]
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2, ema2, sampler2 = make_all(seed=99)  # different init, RNG, and nothing drawn yet
    res = resume(tmp_path / "step-0000003", model2, opt2, scheduler=sched2, stateful={"ema": ema2, "sampler": sampler2})
    assert res.step == 3 and res.world_size == 1
    assert model2.head.weight is model2.embed.weight  # loading must not untie
    assert train_steps(model2, opt2, sched2, ema2, 4) == after
    assert [next(iter(sampler2)).items for _ in range(5)] == packs_after
    assert packs_before  # the sampler had moved before the save
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final[k]), k
    for k in ema.shadow:
        assert torch.equal(ema.shadow[k], ema2.shadow[k]), k
    assert sched2.state_dict() == sched.state_dict()


def test_rng_state_round_trip_covers_python_numpy_torch():
    state = rng_state()
    json.dumps(state)  # plain JSON
    a = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist())
    set_rng_state(json.loads(json.dumps(state)))
    b = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist())
    assert a == b


def test_flatten_round_trip_keeps_types_and_rejects_what_json_cannot_hold():
    state = {"a": (1, 2.5, None), "b": [torch.tensor(3.0), torch.arange(4)], "c": {"d": "x", "e": True},
             "f": float("inf")}
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(flatten_state(state, tensors)))
    back = unflatten_state(tree, tensors.__getitem__)
    assert back["a"] == (1, 2.5, None) and isinstance(back["a"], tuple)
    assert torch.equal(back["b"][1], torch.arange(4)) and back["b"][0].shape == ()
    assert back["c"] == {"d": "x", "e": True} and back["f"] == float("inf")
    with pytest.raises(TypeError, match="not a string"):
        flatten_state({1: torch.zeros(1)}, {})
    with pytest.raises(TypeError, match="'x/y' holds a set"):
        flatten_state({"x": {"y": {1, 2}}}, {})
    with pytest.raises(CheckpointError, match="unknown tensor dtype"):
        unflatten_state({"__tensor__": "k", "shape": [1], "dtype": "torch.load"}, tensors.__getitem__)


def test_trainable_only_stores_the_trainable_part_and_needs_the_frozen_one_loaded(tmp_path):
    torch.manual_seed(0)
    model = Net()
    model.body.requires_grad_(False)  # "the frozen MLLM"
    opt = make_adamw(model, lr=1e-2)
    save_checkpoint(tmp_path, 1, model, opt, trainable_only=True)
    saved = load_file(tmp_path / "step-0000001" / "model.safetensors")
    assert set(saved) == {"embed.weight"}  # head.weight is its alias, body is frozen

    torch.manual_seed(1)
    other = Net()
    other.body.requires_grad_(False)
    other.body.load_state_dict(model.body.state_dict())  # the frozen weights come from their own files
    resume(tmp_path, other, make_adamw(other, lr=1e-2))
    assert torch.equal(other.embed.weight, model.embed.weight)

    full = tmp_path / "full"
    save_checkpoint(full, 1, Net())
    with pytest.raises(CheckpointError, match="unexpected"):
        bigger = nn.Sequential(Net())  # names do not fit: never a silent partial load
        resume(full, bigger)


def test_resume_refuses_mismatched_objects(tmp_path):
    model, opt, sched, ema, sampler = make_all()
    save_checkpoint(tmp_path, 1, model, opt, scheduler=sched, stateful={"sampler": sampler})
    with pytest.raises(CheckpointError, match="saved statefuls"):
        resume(tmp_path, model, opt, scheduler=sched)
    with pytest.raises(CheckpointError, match="optimizer"):
        resume(tmp_path, model, scheduler=sched, stateful={"sampler": sampler})
    other = PackedSampler([3, 5, 2, 7, 4, 4, 1, 9], budget=9, seed=3)
    with pytest.raises(PackingError, match="budget"):
        resume(tmp_path, model, opt, scheduler=sched, stateful={"sampler": other})


def test_tampered_files_are_refused_with_the_file_named(tmp_path):
    model = Net()
    step_dir = save_checkpoint(tmp_path, 1, model)
    weights = load_file(step_dir / "model.safetensors")
    save_file(weights, str(step_dir / "model.safetensors"), metadata={"aliases": '{"head.weight": "../x"}'})
    with pytest.raises(CheckpointError, match="model.safetensors: header metadata 'aliases'"):
        resume(step_dir, model)
    (step_dir / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        resume(step_dir, model)
    save_checkpoint(tmp_path / "b", 1, model)
    (tmp_path / "b" / "step-0000001" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="state.json: not valid JSON"):
        resume(tmp_path / "b", model)
