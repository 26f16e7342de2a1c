"""Stage 1: packed next-token training of the MLLM (tiny random Qwen2.5-VL, real ShapeWorld records)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from duetgen.models.builder import stage1_mllm
from duetgen.models.mllm import IGNORE_INDEX, model_inputs
from duetgen.shapeworld.world import generate
from duetgen.train.common import load_records, pack_inputs, render
from duetgen.train.configs import stage1_config, tiny_stage1
from duetgen.train.stage1 import next_token_loss, train


def starting_mllm(cfg, run_dir):
    """The MLLM, tokenizer and processor stage 1 starts from (a run directory's tokenizer/)."""
    return stage1_mllm(cfg.mllm, cfg.vocab_size, run_dir / "tokenizer")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw")
    generate(root / "train", 40, seed=0, split="train", progress=False)
    return root / "train"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer, processor = starting_mllm(tiny_stage1(), tmp_path_factory.mktemp("tok"))
    return model.eval(), tokenizer, processor


def test_packed_forward_equals_separate_forwards(data, tiny):
    model, tokenizer, processor = tiny
    items = load_records([str(data)], exclude_kinds=["transition"])[:4]
    seqs = [render(it, tokenizer, processor) for it in items]
    assert any(s.pixel_values is not None for s in seqs)
    with torch.no_grad():
        packed = model(**{k: v for k, v in pack_inputs(model, seqs).items() if k != "labels"}).logits[0]
        offset = 0
        for s in seqs:
            alone = model(**model_inputs(model, s, with_labels=False)).logits[0]
            torch.testing.assert_close(packed[offset:offset + len(s)], alone, atol=1e-5, rtol=1e-5)
            offset += len(s)


def test_packed_attention_per_sample_equals_the_dense_mask_and_separate_forwards(data, tiny, tmp_path):
    """`use_packed_attention` (per-sample causal SDPA, boundaries as cu_seq_lens, no mask): the same logits
    and gradients as the dense block-diagonal mask, and as each sample alone."""
    from duetgen.models.packed_attention import use_packed_attention, uses_packed_attention

    _, tokenizer, processor = tiny
    torch.manual_seed(0)
    masked, _, _ = starting_mllm(tiny_stage1(), tmp_path / "a")
    torch.manual_seed(0)
    split, _, _ = starting_mllm(tiny_stage1(), tmp_path / "b")
    use_packed_attention(split)
    assert uses_packed_attention(split) and not uses_packed_attention(masked)
    items = load_records([str(data)], exclude_kinds=["transition"])[:4]
    seqs = [render(it, tokenizer, processor) for it in items]
    a_inputs, b_inputs = pack_inputs(masked, seqs), pack_inputs(split, seqs)
    assert "attention_mask" in a_inputs and "attention_mask" not in b_inputs and "cu_seq_lens_q" in b_inputs
    loss_a, _ = next_token_loss(masked, a_inputs)
    loss_b, _ = next_token_loss(split, b_inputs)
    loss_a.backward(), loss_b.backward()
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(masked.named_parameters(), split.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        packed = split(**{k: v for k, v in b_inputs.items() if k != "labels"}).logits[0]
        offset = 0
        for s in seqs:
            alone = split(**model_inputs(split, s, with_labels=False)).logits[0]  # no cu_seq_lens: plain SDPA
            torch.testing.assert_close(packed[offset:offset + len(s)], alone, atol=1e-5, rtol=1e-5)
            offset += len(s)


def test_packed_loss_is_the_token_weighted_mean_of_the_separate_losses(data, tiny):
    """No sample's loss sees another sample, and a sample's first token is never a target of the previous one."""
    model, tokenizer, processor = tiny
    items = load_records([str(data)], exclude_kinds=["transition"])[:3]
    seqs = [render(it, tokenizer, processor) for it in items]
    with torch.no_grad():
        loss, n = next_token_loss(model, pack_inputs(model, seqs))
        total, count = 0.0, 0
        for s in seqs:
            logits = model(**model_inputs(model, s, with_labels=False)).logits[0]
            targets = s.labels[1:]
            k = int((targets != IGNORE_INDEX).sum())
            total += F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += k
    assert n == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_only_assistant_text_bov_and_end_of_turn_are_supervised(data, tiny):
    model, tokenizer, processor = tiny
    (ds, rec), = [it for it in load_records([str(data)]) if it[1].meta["kind"] == "how-to"][:1]
    seq = render((ds, rec), tokenizer, processor)
    inputs = pack_inputs(model, [seq])
    supervised = tokenizer.decode(inputs["input_ids"][0][inputs["labels"] != IGNORE_INDEX])
    answer = "".join(p.text for p in rec.messages[-1].content if hasattr(p, "text"))
    assert supervised.replace("<BOV>", "").replace("<|im_end|>", "") == answer
    assert supervised.count("<BOV>") == len(rec.image_parts("assistant"))
    assert supervised.endswith("<|im_end|>")


def test_tiny_run_trains_saves_and_exports(data, tmp_path):
    cfg = dataclasses.replace(tiny_stage1(), data=[str(data)], steps=12, warmup_steps=2, sample_every=12)
    out = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "preprocessor_config.json").is_file()
    assert (tmp_path / "run" / "samples" / "step-0000012" / "index.html").is_file()
    from transformers import Qwen2_5_VLForConditionalGeneration
    Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True)  # plain transformers loads it
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)


def test_unknown_config_and_bad_data_are_clear_errors(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from duetgen.cli import app

    with pytest.raises(ValueError, match="unknown stage-1 config 'nope'"):
        stage1_config("nope")
    result = CliRunner().invoke(app, ["train", "stage1", "--config", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "not a dataset directory" in result.output
    # the config's own dataset missing: the message names the config, the path and where its command is
    monkeypatch.chdir(tmp_path)  # the config's paths are relative (runs/shapeworld/...)
    result = CliRunner().invoke(app, ["train", "stage1", "--config", "toy-read-first", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "config 'toy-read-first' reads the dataset 'runs/shapeworld/data/train'" in " ".join(result.output.split())
    assert "docs/training.md" in result.output
    # data that cannot train (fewer records than the validation split takes): one line, no traceback
    generate(tmp_path / "few", 3, seed=0, split="train", progress=False)
    result = CliRunner().invoke(app, ["train", "stage1", "--config", "tiny", "--data", str(tmp_path / "few"),
                                      "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "not more than val_records=4" in result.output
    assert "Traceback" not in result.output


def test_cli_steps_under_the_warmup_trains_with_a_note(data, tmp_path):
    """`--steps 1` on a config that warms up over 2 steps (a smoke run) warms up over the one step; it failed with a
    traceback (the schedule's ValueError)."""
    from typer.testing import CliRunner

    from duetgen.cli import app

    result = CliRunner().invoke(app, ["train", "stage1", "--config", "tiny", "--data", str(data), "--steps", "1",
                                      "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "warming up over all 1 steps" in " ".join(result.output.split())
    assert (tmp_path / "r" / "mllm" / "config.json").is_file()


def test_resume_with_more_steps_continues_on_the_longer_cosine(data, tmp_path):
    from duetgen.train.optim import WarmupCosine

    cfg = dataclasses.replace(tiny_stage1(), data=[str(data)], steps=4, warmup_steps=2, save_every=4, eval_every=100,
                              sample_every=100)
    train(cfg, tmp_path / "run", progress=False)
    train(dataclasses.replace(cfg, steps=8), tmp_path / "run", resume_run=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(lrs) == list(range(1, 9))
    longer = WarmupCosine(2, 8, cfg.min_lr_ratio)
    for step in range(5, 9):  # get_last_lr after `step` optimiser steps = the lambda at `step`
        assert lrs[step] == pytest.approx(cfg.lr * longer(step))
    assert lrs[4] == pytest.approx(cfg.lr * WarmupCosine(2, 4, cfg.min_lr_ratio)(4))  # the first part kept its own


# ----------------------------------------------------------------------------- LoRA (lora_rank > 0)


def test_lora_trains_only_adapters_and_embeddings_and_keeps_base_weights(data, tmp_path):
    from duetgen.train.configs import tiny_lora_stage1
    from duetgen.train.lora import add_lora
    from duetgen.train.optim import make_adamw

    torch.manual_seed(0)
    cfg = tiny_lora_stage1()
    model, tokenizer, processor = starting_mllm(cfg, tmp_path / "tok")
    lora = add_lora(model, cfg.lora_rank, cfg.lora_alpha, train_embeddings=True)
    embeddings = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n in embeddings for n in trainable)
    assert embeddings <= trainable
    assert not any(".lora_" in n for n, _ in model.model.visual.named_parameters())  # ViT MLP not targeted
    assert any("mlp.gate_proj.lora_A" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    optimizer = make_adamw(model, lr=1e-2)
    seqs = [render(it, tokenizer, processor) for it in load_records([str(data)])[:3]]
    model.train()
    for _ in range(2):
        loss, _ = next_token_loss(model, pack_inputs(model, seqs))
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads == trainable
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # bit-identical frozen weights
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if n in before and "lora_A" not in n)  # B (zero-init) and the embeddings moved
    del lora

    torch.manual_seed(0)
    frozen, *_ = starting_mllm(cfg, tmp_path / "tok")
    add_lora(frozen, cfg.lora_rank, cfg.lora_alpha, train_embeddings=False)
    assert all(".lora_" in n for n, p in frozen.named_parameters() if p.requires_grad)


def test_tiny_lora_run_resumes_and_exports_a_merged_plain_model(data, tmp_path):
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration

    from duetgen.train.configs import stage1_config

    cfg = dataclasses.replace(stage1_config("tiny-lora"), data=[str(data)], steps=4, warmup_steps=1, save_every=2,
                              eval_every=100, sample_every=100)
    train(cfg, tmp_path / "cut", progress=False, stop_after=2)  # checkpoint at step 2, then "killed"
    with safe_open(str(tmp_path / "cut" / "checkpoints" / "step-0000002" / "model.safetensors"), "pt") as f:
        assert any(".lora_" in k for k in f.keys())  # the checkpoint holds the adapters
    out = train(cfg, tmp_path / "cut", resume_run=True, progress=False)
    train(cfg, tmp_path / "whole", progress=False)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("cut", "whole")}
    losses = {name: {r["step"]: r["loss"] for r in rows[name] if "loss" in r} for name in rows}
    assert sorted(losses["cut"]) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses["cut"].values())
    assert losses["cut"] == pytest.approx(losses["whole"], rel=1e-5)  # resume continues the same run

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora_" in k or "base_layer" in k or "base_model" in k for k in keys)
    assert not (out / "adapter_config.json").exists()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True)
    assert type(model) is Qwen2_5_VLForConditionalGeneration
    # the merge changed the language model's weights (B moved away from zero) but not the frozen ViT
    torch.manual_seed(cfg.seed)
    init, *_ = starting_mllm(cfg, tmp_path / "whole")
    init_state, merged_state = init.state_dict(), model.state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged_state[q], init_state[q])
    visual = [k for k in merged_state if k.startswith("model.visual.")]
    assert visual and all(torch.equal(merged_state[k], init_state[k]) for k in visual)
