"""The prepared GPU checks still run: each one smoke-run in its CPU tiny mode, so none rots before a GPU comes.

benchmarks/gpu_check_train.py (issue 4), benchmarks/gpu_check_model.py (issue 3) and
benchmarks/generation.py --gpu-check (issue 5, with its zero-shot step of issue 19) are run in-process
(runpy, as `python script.py ...`), so transformers / diffusers are imported once for the whole file. The
model-FLOP counter that gives gpu_check_train its MFU is checked against hand-computed counts. The zero-shot
step reads real weights from a path: here a tiny model saved as an assembled directory stands in for them.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str], monkeypatch) -> int:
    """Run benchmarks/<name>.py as __main__ with argv; its exit code (0 when it returns without sys.exit)."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    try:
        runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


# ----------------------------------------------------------------------------- the FLOP counter


def test_model_flops_counts_linears_convs_and_attention_exactly():
    ModelFlops = load("gpu_check_train").ModelFlops

    class SelfAttention(nn.Module):
        def forward(self, q, mask):
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    frozen = nn.Linear(8, 4, bias=False).requires_grad_(False)
    trained, trained_next = nn.Linear(4, 6), nn.Linear(6, 3)
    conv = nn.Conv2d(3, 4, kernel_size=2, stride=2).requires_grad_(False)
    attention = SelfAttention()
    x = torch.randn(5, 8)  # no grad: data
    q = torch.randn(1, 2, 6, 4, requires_grad=True)  # (B, H, L, d)
    segments = torch.tensor([0, 0, 1, 1, 1, 1])  # a packed pair of samples of 2 and 4 tokens
    mask = (segments[:, None] == segments[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    reference = trained_next(trained(frozen(x)))
    original_sdpa = F.scaled_dot_product_attention

    with ModelFlops({"frozen": frozen, "trained": trained, "next": trained_next, "conv": conv,
                     "attn": attention}) as counter:
        out = trained_next(trained(frozen(x)))
        conv(torch.randn(1, 3, 4, 4))
        attention(q, mask)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)  # outside every part
        with torch.no_grad():
            trained(torch.randn(2, 4))  # no grad: forward only
    counts = counter.summary()["by_part"]

    assert F.scaled_dot_product_attention is original_sdpa  # restored
    assert torch.equal(out, reference)  # counting changes nothing
    # frozen weight, input without grad: forward only, 2 * 8 * 4 per row
    assert counts["frozen"] == {"linear_forward": 320, "linear_backward": 0, "attention_forward": 0, "attention_backward": 0}
    # trained weight, input without grad: weight gradient only; plus the no-grad call (2 rows, forward only)
    assert counts["trained"]["linear_forward"] == 2 * 4 * 6 * 5 + 2 * 4 * 6 * 2
    assert counts["trained"]["linear_backward"] == 2 * 4 * 6 * 5
    # trained weight, input with grad: 6 N T
    assert counts["next"]["linear_forward"] == 2 * 6 * 3 * 5 and counts["next"]["linear_backward"] == 4 * 6 * 3 * 5
    # conv: 2 x (3 x 2 x 2 weights per output channel) x (4 x 2 x 2 outputs)
    assert counts["conv"]["linear_forward"] == 2 * 12 * 16
    # block-diagonal causal mask: 3 + 10 allowed pairs per head, 2 heads, 2 (d_qk + d_v) = 16 FLOPs a pair
    assert counts["attn"]["attention_forward"] == 16 * 13 * 2 and counts["attn"]["attention_backward"] == 2 * 16 * 13 * 2
    # is_causal over 6 tokens: 21 pairs per head
    assert counts["other"]["attention_forward"] == 16 * 21 * 2


# ----------------------------------------------------------------------------- gpu_check_train


def tiny_train_args(out: Path) -> list[str]:
    return ["--allow-cpu", "--preset", "tiny", "--out", str(out), "--warmup", "1", "--steps", "1",
            "--matmul-repeats", "2", "--stage2-mllm-tokens", "96", "--stage1-pack", "64:0,96:1", "--lora-rank", "4"]


def test_gpu_check_train_smoke_on_cpu_tiny(tmp_path, monkeypatch, capsys):
    from duetgen.models import builder, presets

    out = tmp_path / "train.json"
    assert run_script("gpu_check_train", tiny_train_args(out), monkeypatch) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result  # stdout and --out agree
    assert result["failed"] == [] and result["matmul"]["tflops_median"] > 0

    stage2 = result["stage2"]
    assert stage2["frames"] == 4 and stage2["mllm_tokens"] == 96 and stage2["mllm_image_tokens"] == [16, 16, 16]
    for mode in ("plain", "checkpointed"):
        assert stage2[mode]["step_s_median"] > 0 and stage2[mode]["mfu"] > 0
    parts = stage2["model_flops"]["by_part"]
    dit = presets.tiny().dit
    width, layers, n, text = dit["num_attention_heads"] * dit["attention_head_dim"], dit["num_layers"], \
        stage2["dit_tokens"], stage2["mllm_tokens"]
    target = stage2["tokens_per_frame"]  # targets_only: the last block's queries are the target frame's tokens
    assert parts["dit"]["attention_forward"] == 4 * width * (  # self + cross, non-causal
        (layers - 1) * (n * n + n * text) + target * n + target * text)
    assert parts["dit"]["attention_backward"] == 2 * parts["dit"]["attention_forward"]
    for frozen in ("mllm_text", "mllm_vision"):  # the MLLM is frozen and runs without grad in stage 2
        assert parts[frozen]["linear_forward"] > 0
        assert parts[frozen]["linear_backward"] == parts[frozen]["attention_backward"] == 0

    lora = result["stage1_lora"]
    assert lora["tokens"] == 160 and lora["lora"]["peft"] == result["peft"]
    text = presets.tiny().mllm.text_config
    d, ff = text.hidden_size, text.intermediate_size
    kv = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    per_layer = (d + d) * 2 + (d + kv) * 2 + (d + ff) * 2 + (ff + d)  # q, o, k, v, gate, up, down: r (in + out) each
    assert lora["parameters"]["trained"] == text.num_hidden_layers * per_layer * 4
    head = lora["model_flops"]["by_part"]["lm_head"]
    assert head["linear_backward"] == head["linear_forward"] > 0  # frozen head: input gradient only
    assert lora["step"]["tokens_per_s"] > 0 and lora["step"]["mfu"] > 0


def test_gpu_check_train_records_a_failed_part_and_runs_the_rest(tmp_path, monkeypatch, capsys):
    out = tmp_path / "train.json"
    argv = tiny_train_args(out) + ["--sections", "stage2,stage1", "--stage2-mllm-tokens", "8"]
    assert run_script("gpu_check_train", argv, monkeypatch) == 1
    result = json.loads(out.read_text())
    assert result["failed"] == ["stage2"]
    assert "cannot hold 3 images" in result["stage2"]["error"]
    assert "error" not in result["stage1_lora"] and result["stage1_lora"]["step"]["step_s_median"] > 0


@no_cuda
def test_gpu_checks_refuse_without_cuda(tmp_path, monkeypatch, capsys):
    assert load("gpu_check_train").main(["--out", str(tmp_path / "a.json")]) == 2
    assert "--allow-cpu --preset tiny" in capsys.readouterr().err
    assert load("gpu_check_train").main(["--out", str(tmp_path / "a.json"), "--allow-cpu", "--preset", "toy"]) == 2
    assert run_script("gpu_check_model", ["--out", str(tmp_path / "b.json")], monkeypatch) == 2
    assert "--allow-cpu --preset tiny" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


# ----------------------------------------------------------------------------- the two other prepared checks


def test_gpu_check_model_smoke_on_cpu_tiny(tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.json"
    argv = ["--allow-cpu", "--preset", "tiny", "--out", str(out), "--repeats", "1", "--text-tokens", "64",
            "--mllm-tokens", "256"]
    assert run_script("gpu_check_model", argv, monkeypatch) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["dit_forward_backward"]["frames"] == 4
    for mode in ("plain", "checkpointed"):
        assert result["dit_forward_backward"][mode]["seconds_mean"] > 0
    assert result["mllm_forward"]["tokens"] == 256 and result["mllm_forward"]["seconds_mean"] > 0


def test_generation_gpu_check_smoke_on_cpu_tiny(monkeypatch, capsys):
    monkeypatch.delenv("DUETGEN_REAL_WEIGHTS", raising=False)
    argv = ["--gpu-check", "--gpu-check-preset", "tiny", "--device", "cpu", "--gpu-steps", "2"]
    assert run_script("generation", argv, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "time to first token:" in printed and "per-image latency" in printed
    assert "images of 32x32, 2 steps" in printed
    # no real weights anywhere: the zero-shot step says so and writes nothing
    assert "zero-shot step: skipped (no real weights: set DUETGEN_REAL_WEIGHTS or pass --real-weights DIR)" in printed


# ----------------------------------------------------------------------------- the zero-shot step (issue 19)


@pytest.fixture(scope="module")
def tiny_assembled(tmp_path_factory):
    """A tiny model saved as `duetgen model assemble` saves one: Cosmos' conditioning-frame time, provenance."""
    from duetgen.diffusion.flow_matching import COSMOS_CONDITION_FRAME_TIME
    from duetgen.models import builder, presets

    preset = presets.tiny()
    torch.manual_seed(0)
    model = builder.build(replace(preset, settings=replace(preset.settings,
                                                           condition_frame_time=COSMOS_CONDITION_FRAME_TIME)))
    model.provenance = {"connector_init": "the DiT's pretrained crossattn_proj", "connector_pretrained_against": "unknown"}
    return model.save_pretrained(tmp_path_factory.mktemp("real") / "duetgen-tiny")


ZERO_SHOT_ARGS = ["--gpu-check", "--gpu-check-sections", "zero_shot", "--device", "cpu", "--zero-shot-size", "32",
                  "32", "--zero-shot-steps", "2", "--zero-shot-prompt", "A red square."]


def test_zero_shot_step_writes_the_image_and_its_settings(tiny_assembled, tmp_path, monkeypatch, capsys):
    from duetgen.infer.engine import GenerationConfig, draw_cosmos
    from duetgen.models.duetgen import DuetGen

    out = tmp_path / "out"
    monkeypatch.setenv("DUETGEN_REAL_WEIGHTS", str(tiny_assembled))  # the path from the environment
    monkeypatch.setenv("OUT", str(out))  # as on the device machine
    assert run_script("generation", ZERO_SHOT_ARGS, monkeypatch) == 0
    assert "wrote" in capsys.readouterr().out
    result = json.loads((out / "zero_shot_cosmos.json").read_text())
    assert {k: result[k] for k in ("prompt", "seed", "steps", "guidance_scale", "image_size", "framing")} == {
        "prompt": "A red square.", "seed": 0, "steps": 2, "guidance_scale": 2.0, "image_size": [32, 32],
        "framing": "cosmos"}  # steps given, guidance the model's
    assert result["wall_s"] > 0 and result["peak_gpu_memory_gib"] is None  # no GPU here
    assert result["source"] == "duetgen directory" and result["condition_frame_time"] == 1e-4
    assert result["provenance"]["connector_pretrained_against"] == "unknown"
    image = Image.open(out / "zero_shot_cosmos.png")
    assert image.size == (32, 32)
    # the image is the Cosmos framing's draw: what `duetgen generate --framing cosmos` gives for seed 0
    model = DuetGen.from_pretrained(tiny_assembled).eval()
    settings = GenerationConfig(num_steps=2, image_size=(32, 32)).resolve(model.config, model.pixel_multiple)
    latent = draw_cosmos(model, "A red square.", None, settings,
                         generator=torch.Generator().manual_seed(1000))  # image 0's noise seed for seed 0
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(model.decode_latents([latent])[0]))


def test_zero_shot_step_refuses_what_it_cannot_load(tiny_assembled, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    # weights but nowhere to write
    assert run_script("generation", ZERO_SHOT_ARGS + ["--real-weights", str(tiny_assembled)], monkeypatch) == 2
    assert "no output directory (pass --zero-shot-out DIR or set $OUT)" in capsys.readouterr().err
    # a directory that is neither layout
    argv = ZERO_SHOT_ARGS + ["--real-weights", str(tmp_path), "--zero-shot-out", str(tmp_path / "out")]
    assert run_script("generation", argv, monkeypatch) == 2
    assert "neither duetgen.json" in capsys.readouterr().err
    # a pipeline directory is checked from its configs before any weight is read; errors name file and field
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "CosmosTextToImagePipeline"}))
    assert run_script("generation", argv, monkeypatch) == 2
    assert "model_index.json _class_name is 'CosmosTextToImagePipeline'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
