"""FSDP2 from outside the model: 2 gloo ranks on CPU train exactly like one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from duetgen.train.logging import read_metrics
from duetgen.train.parallel import DistEnv, apply_fsdp, init_distributed, load_full_state_dict, non_persistent_buffers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "tiny_train.py"
sys.path.insert(0, str(ROOT / "tests"))
import tiny_train  # noqa: E402  (the same tiny model and loop the 2-rank runs use)
from tiny_train import TinyConfig, TinyLM  # noqa: E402

# dropout and augmentation off: with them each rank would draw its own masks, unlike one process
ARGS = ["--steps", "4", "--save-every", "2", "--dropout", "0", "--augment", "0", "--packs-per-step", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_ranks(world_size: int, extra: list[str]) -> list[str]:
    """Start ``world_size`` copies with torchrun's environment variables; returns each one's stdout."""
    port, procs = free_port(), []
    for rank in range(world_size):
        env = dict(base_env(), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *ARGS, *extra], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=90)
            assert p.returncode == 0, f"rank failed:\n{err[-3000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_on_the_same_global_batch_including_a_resume(tmp_path):
    single = tmp_path / "single"
    tiny_train.main([*ARGS, "--run-dir", str(single)])  # in this process: one interpreter start fewer

    sharded = tmp_path / "sharded"
    first = run_ranks(2, ["--run-dir", str(sharded), "--stop-after", "2"])
    # each rank holds half of the (sharded-dim-even) parameters, never the whole model
    total = sum(p.numel() for p in TinyLM(TinyConfig()).parameters())
    held = [int(out.split("holds ")[1].split(" of")[0]) for out in first]
    assert sum(held) == total and max(held) < total
    second = run_ranks(2, ["--run-dir", str(sharded)])  # resumes the 2-rank checkpoint of step 2
    assert all("resumed from step 2" in out for out in second)

    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(sharded / "metrics.jsonl")
    assert [e["step"] for e in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        # same samples, same math; only the order of float additions differs (one matmul vs two halves + a sum)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
        assert b["lr"] == a["lr"]
    for name in ("model.safetensors", "state.safetensors", "optimizer.safetensors"):
        w1, w2 = load_file(single / "step-0000004" / name), load_file(sharded / "step-0000004" / name)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
    # the weights moved: the comparison above is not between two copies of the initialisation
    init = load_file(single / "step-0000002" / "model.safetensors")
    final = load_file(single / "step-0000004" / "model.safetensors")
    assert not torch.allclose(init["embed.weight"], final["embed.weight"])


def test_single_process_path_needs_no_process_group():
    env = init_distributed() if "RANK" not in os.environ else pytest.skip("running under torchrun")
    assert env == DistEnv(device=env.device) and not env.distributed and env.is_main


def test_meta_model_loads_with_buffers_recomputed_and_ties_kept():
    cfg = TinyConfig(dropout=0.0)
    torch.manual_seed(0)
    reference = TinyLM(cfg)
    with torch.device("meta"):
        model = TinyLM(cfg)
    assert non_persistent_buffers(model) == ["inv_freq"]
    with pytest.raises(ValueError, match="non-persistent buffers.*inv_freq"):
        load_full_state_dict(model, reference.state_dict(), DistEnv())
    load_full_state_dict(model, reference.state_dict(), DistEnv(), init_buffers=TinyLM.init_buffers)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.inv_freq, reference.inv_freq)
    ids = torch.arange(10) % cfg.vocab
    pos, cu = torch.arange(10), torch.tensor([0, 10], dtype=torch.int32)
    assert torch.equal(model(ids, pos, cu), reference(ids, pos, cu))

    with torch.device("meta"):
        other = TinyLM(cfg)
    with pytest.raises(RuntimeError, match="norm.weight"):
        bad = dict(reference.state_dict())
        bad.pop("norm.weight")
        load_full_state_dict(other, bad, DistEnv(), init_buffers=TinyLM.init_buffers)


def test_activation_checkpointing_leaves_gradients_unchanged():
    cfg = TinyConfig(dropout=0.1)  # dropout: checkpointing must replay the same masks in backward
    grads = []
    for ac in (False, True):
        torch.manual_seed(0)
        model = TinyLM(cfg)
        apply_fsdp(model, model.blocks, DistEnv(), activation_checkpointing=ac)
        ids = torch.randint(0, cfg.vocab, (20,))
        pos = torch.cat([torch.arange(12), torch.arange(8)])
        cu = torch.tensor([0, 12, 20], dtype=torch.int32)
        model(ids, pos, cu).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-7, msg=n)


def test_apply_fsdp_refuses_blocks_from_another_model():
    model, stranger = nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not a submodule"):
        apply_fsdp(model, [stranger], DistEnv())
