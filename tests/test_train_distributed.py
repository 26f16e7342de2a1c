"""Both training stages under torchrun: 2 gloo ranks on CPU train like 1 process on the same global batch.

The 1-process runs take 2 packs per step (`packs_per_rank=2`), the 2-rank runs 1 pack per rank, so
every step sees the same packs. Stage 1 runs through the real CLI (`torchrun -m duetgen.cli train
stage1`); stage 2 through a driver that stops after a checkpoint and resumes in the same 2 ranks, so
the sharded save/resume of weights, AdamW, EMA and sampler is on the path the losses are compared on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from duetgen.shapeworld.world import generate
from duetgen.train import stage1, stage2
from duetgen.train.configs import tiny_stage1, tiny_stage2
from duetgen.train.logging import read_metrics

STEPS = 3  # tiny configs evaluate, sample and save at step 3: every rank-0-only path runs once


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> str:
    """2 processes on this machine (gloo on CPU); returns their stdout (rank 0 alone prints)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _steps(run_dir: Path) -> dict[int, dict]:
    return {e["step"]: e for e in read_metrics(run_dir / "metrics.jsonl") if "loss" in e}


def _vals(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["val/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in e}


def _same_curve(one: Path, two: Path, fields: tuple[str, ...]) -> None:
    a, b = _steps(one), _steps(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        # same packs, same math; only the grouping of float sums differs (gradient norm over shards,
        # FSDP's reduce-scatter), which reaches the loss through the updates
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
        assert b[step]["lr"] == a[step]["lr"]
        for f in fields:
            assert b[step][f] == a[step][f], (step, f)
    assert _vals(two) == pytest.approx(_vals(one), rel=1e-5)
    assert a[2]["loss"] != a[1]["loss"]  # it trains: not a comparison of two frozen models


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def single_stage1(tmp_path_factory):
    """Data, and the 1-process stage-1 run (2 packs per step) whose mllm/ stage 2 starts from."""
    root = tmp_path_factory.mktemp("dist")
    generate(root / "train", 40, seed=0, split="train", progress=False)
    cfg = dataclasses.replace(tiny_stage1(), data=[str(root / "train")], steps=STEPS, packs_per_rank=2)
    stage1.train(cfg, root / "s1-one", progress=False)
    return root


@pytest.mark.slow
def test_stage1_two_ranks_through_the_cli_match_one_process(single_stage1):
    root = single_stage1
    out = _torchrun("-m", "duetgen.cli", "train", "stage1", "--config", "tiny", "--data", str(root / "train"),
                    "--out", str(root / "s1-two"), "--steps", str(STEPS), "--quiet")
    assert "x 2 ranks" in out
    assert sum(line.startswith('{"step"') for line in out.splitlines()) == STEPS  # rank 0 alone logs

    _same_curve(root / "s1-one", root / "s1-two", ("supervised_tokens", "pack_tokens"))
    _same_weights(root / "s1-one" / "mllm" / "model.safetensors", root / "s1-two" / "mllm" / "model.safetensors")
    ckpt = root / "s1-two" / "checkpoints" / f"step-{STEPS:07d}"
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-00000.json", "rank-00001.json"]
    _same_weights(root / "s1-one" / "checkpoints" / f"step-{STEPS:07d}" / "optimizer.safetensors",
                  ckpt / "optimizer.safetensors")
    assert (root / "s1-two" / "samples" / f"step-{STEPS:07d}" / "index.html").is_file()
    assert (root / "s1-two" / "tensorboard").is_dir()


DRIVER = textwrap.dedent("""
    import dataclasses, sys
    from duetgen.train import stage2
    from duetgen.train.configs import tiny_stage2
    from duetgen.train.parallel import destroy_distributed, init_distributed

    data, mllm, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = dataclasses.replace(tiny_stage2(), data=[data], steps=steps, save_every=2)
    init_distributed()  # one process group for both calls
    stage2.train(cfg, mllm, out, progress=False, stop_after=2)  # checkpoint at 2, then stop
    stage2.train(cfg, mllm, out, resume_run=True, progress=False)  # the sharded resume, to the end
    destroy_distributed()
""")


@pytest.mark.slow
def test_stage2_two_ranks_with_a_sharded_resume_match_one_process(single_stage1, tmp_path):
    root = single_stage1
    mllm = root / "s1-one" / "mllm"
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")], steps=STEPS, packs_per_rank=2)
    stage2.train(cfg, mllm, tmp_path / "one", progress=False)

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = _torchrun(str(driver), str(root / "train"), str(mllm), str(tmp_path / "two"), str(STEPS))
    assert "start at step 0/3" in out and "start at step 2/3" in out and "x 2 ranks" in out

    _same_curve(tmp_path / "one", tmp_path / "two", ("pack_samples", "pack_tokens"))
    for name in ("dit/diffusion_pytorch_model.safetensors", "connector.safetensors"):  # EMA weights, exported
        _same_weights(tmp_path / "one" / "model" / name, tmp_path / "two" / "model" / name)
    assert (tmp_path / "two" / "samples" / f"step-{STEPS:07d}.html").is_file()


INIT_FROM_DRIVER = textwrap.dedent("""
    import dataclasses, sys
    from duetgen.train import stage2
    from duetgen.train.configs import tiny_stage2

    data, mllm, out, steps, init_from = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    stage2.train(dataclasses.replace(tiny_stage2(), data=[data], steps=steps, init_from=init_from), mllm, out,
                 progress=False)
""")


@pytest.mark.slow
def test_stage2_init_from_on_two_ranks_matches_one_process(single_stage1, tmp_path):
    """`init_from` under torchrun: rank 0 reads the trained connector + DiT and shards them out."""
    root = single_stage1
    mllm = root / "s1-one" / "mllm"
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")], steps=2)
    source = stage2.train(cfg, mllm, tmp_path / "source", progress=False)
    cfg = dataclasses.replace(tiny_stage2(), data=[str(root / "train")], steps=STEPS, init_from=str(source),
                              packs_per_rank=2)  # the same global batch as 2 ranks x 1 pack
    stage2.train(cfg, mllm, tmp_path / "one", progress=False)

    driver = tmp_path / "driver.py"
    driver.write_text(INIT_FROM_DRIVER)
    out = _torchrun(str(driver), str(root / "train"), str(mllm), str(tmp_path / "two"), str(STEPS), str(source))
    assert "start from" in out and "x 2 ranks" in out

    _same_curve(tmp_path / "one", tmp_path / "two", ("pack_samples", "pack_tokens"))
    for name in ("dit/diffusion_pytorch_model.safetensors", "connector.safetensors"):
        _same_weights(tmp_path / "one" / "model" / name, tmp_path / "two" / "model" / name)


def test_meta_qwen_gets_its_rope_buffers_back_from_config(single_stage1):
    """What every stage-1 rank does to the model it built on meta: same buffers, same logits as the original."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from duetgen.train.parallel import DistEnv, init_buffers_from_config, load_full_state_dict

    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(single_stage1 / "s1-one" / "mllm").eval()
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(reference.config)
    load_full_state_dict(model, reference.state_dict(), DistEnv(), init_buffers=init_buffers_from_config)
    buffers = {n: b for n, b in model.named_buffers() if "inv_freq" in n}
    assert len(buffers) == 4  # inv_freq + original_inv_freq of the language model and of the vision tower
    for n, b in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[n], b), n
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits)
