"""The simple evaluation loop: run a trained DuetGen on ShapeWorld prompts and score it with the exact judge.

    duetgen train eval-toy --model checkpoints/shapeworld-toy --truth runs/shapeworld/data/test --out runs/eval

This is NOT the inference engine (that is `duetgen/infer/engine.py`, with one KV cache for the whole
answer). It is the shortest correct loop, kept for measuring training:

1. render the conversation so far (`render_prompt`), run the MLLM over all of it, take the greedy
   next token; repeat (no KV cache: every token re-runs the whole prefix, fine for 200-token toys);
2. on `<BOV>`: the text condition is the MLLM's all-layer states of every token before it
   (`all_layer_states` of the prefix), the conditioning frames are every image so far (user
   canvases and images drawn earlier in the answer); the DiT samples the image (Euler, guidance
   written out below), and the image joins the context as an assistant image;
3. stop at `<|im_end|>`, at `max_new_tokens`, or after `max_images` images.

Predictions are written as a dataset whose record ids are the truth's, then
`duetgen.eval.toyworld_judge.evaluate` scores them (T-Com, I-Com, I-Co, IT-Co, I-Q, U-Acc).

Design choices:
- Generated text is re-tokenised canonically when the conversation is re-rendered after each image,
  which is exactly how training rendered the same text (each run of text tokenised on its own).
- Guidance: v = v_neg + w (v_pos - v_neg), the negative keeping every conditioning frame and
  dropping the final text chunk (paper section 4); w = 1 makes one call per sampler step.
- Images are drawn by `DuetGen.sample_latent`, which applies the model's saved settings
  (`use_condition_frames`, `x0_relative_to_previous`: the output added to the latest conditioning
  frame; docs/training.md says why it exists).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.models.mllm import TokenIds, all_layer_states, render_prompt, rope_position_ids


# ----------------------------------------------------------------------------- text: greedy decoding


@torch.no_grad()
def greedy_answer(model, tokenizer, processor, prompt: list[Message],
                  draw: Callable[[int, "DrawContext"], Image.Image | None],
                  max_new_tokens: int = 200, max_images: int = 8) -> Message:
    """Greedy-decode one assistant turn; ``draw(k, context)`` makes the k-th image (None stops the answer)."""
    ids = TokenIds.from_tokenizer(tokenizer)
    parts: list = []
    run: list[int] = []  # token ids of the text being written since the last image
    n_images = 0
    base = render_prompt(prompt, tokenizer, processor)  # re-rendered after each image
    for _ in range(max_new_tokens):
        input_ids = torch.cat([base.input_ids, torch.tensor(run, dtype=torch.long)]).to(model.device)
        grid = None if base.image_grid_thw is None else base.image_grid_thw.to(model.device)
        kwargs = {"input_ids": input_ids[None], "position_ids": rope_position_ids(model, input_ids, grid)[:, None]}
        if base.pixel_values is not None:
            kwargs.update(pixel_values=base.pixel_values.to(model.device), image_grid_thw=grid)
        token = int(model(**kwargs, use_cache=False).logits[0, -1].argmax())
        if token == ids.im_end:
            break
        if token != ids.bov:
            run.append(token)
            continue
        # <BOV>: close the text run, draw, append the image, re-render
        text = tokenizer.decode(run)
        if text:
            parts.append(TextPart(text))
        run = []
        messages = prompt + [Message("assistant", list(parts))] if parts else prompt
        prefix = render_prompt(messages, tokenizer, processor)  # the tokens before the <BOV>
        images = [p.image for m in messages for p in m.content if isinstance(p, ImagePart)]
        image = draw(n_images, DrawContext(prefix=prefix, images=images, vision_end=ids.vision_end))
        if image is None:
            break
        parts.append(ImagePart(image))
        n_images += 1
        if n_images >= max_images:
            break
        base = render_prompt(prompt + [Message("assistant", list(parts))], tokenizer, processor)
    text = tokenizer.decode(run)
    if text:
        parts.append(TextPart(text))
    if not parts:
        parts.append(TextPart(""))
    return Message("assistant", parts)


@dataclass
class DrawContext:
    prefix: object  # RenderedSequence of every token before the <BOV>
    images: list  # PIL images of the context so far (user canvases, earlier answer images), oldest first
    vision_end: int  # <|vision_end|> id: the final text chunk starts after the last one


# ----------------------------------------------------------------------------- images: the DiT sampler


@dataclass
class DrawConfig:
    num_steps: int = 20  # Euler steps (calibration: 10 is nearly as good as 50)
    guidance_scale: float = 1.0  # w; 1 = no guidance


@torch.no_grad()
def draw_image(model, context: DrawContext, cfg: DrawConfig, generator: torch.Generator | None = None,
               size: tuple[int, int] | None = None) -> Image.Image:
    """Sample one image for the `<BOV>` that follows ``context.prefix`` with a `DuetGen` model.

    The model's settings decide what the DiT sees and how its output is read
    (`use_condition_frames`, `parameterisation`, `x0_relative_to_previous`).
    """
    from duetgen.diffusion.guidance import final_text_chunk_start
    from duetgen.diffusion.sampling import SamplerConfig

    # 1. text condition: all-layer MLLM states before the <BOV>; negative = without the final text chunk
    states = all_layer_states(model.mllm, context.prefix)  # (L, n_layers * D)
    text_pos = model.connect(states.to(model.device))  # (L, D_cross)
    start = final_text_chunk_start(context.prefix.input_ids.tolist(), context.vision_end,
                                   min_start=max(context.prefix.system_length, 1))
    text_neg = text_pos[:start]
    # 2. conditioning frames: every image so far; 3. sample (guidance in velocity space) and decode
    cond = model.encode_images(context.images) if context.images else []
    if size is None and context.images:  # the canvas keeps its size; none yet: the model's image_size
        size = (context.images[-1].height, context.images[-1].width)
    latent = model.sample_latent(cond, text_pos, text_neg, size=size, generator=generator,
                                 sampler=SamplerConfig(solver="euler", num_steps=cfg.num_steps),
                                 guidance_scale=cfg.guidance_scale)
    return model.decode_latents([latent])[0]


# ----------------------------------------------------------------------------- the evaluation


def evaluate_toy(model_dir: str | os.PathLike, truth_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 limit: int | None = None, kinds: list[str] | None = None, num_steps: int = 20, guidance_scale: float = 1.0, seed: int = 0,
                 max_new_tokens: int = 200, progress: bool = True) -> dict:
    """Answer every truth prompt with the model, write predictions to ``out_dir/pred``, judge them; return the report.

    Writes ``out_dir/pred`` (dataset, record ids = truth ids), ``out_dir/report.json`` and
    ``out_dir/pred.html``. Wall time and settings go into the report's ``run`` entry.
    """
    import shutil

    from duetgen.data.record import Dataset, DatasetWriter
    from duetgen.data.view import render_dataset_html
    from duetgen.eval import toyworld_judge

    from duetgen.models.duetgen import DuetGen

    torch.manual_seed(seed)
    model = DuetGen.from_pretrained(model_dir).eval()
    cfg = DrawConfig(num_steps=num_steps, guidance_scale=guidance_scale)
    truth = Dataset(truth_dir)
    out_dir = Path(out_dir)
    pred_dir = out_dir / "pred"
    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [rec for rec in truth if kinds is None or (rec.meta or {}).get("kind") in kinds]
    records = records[:limit] if limit is not None else records
    subset = limit is not None or kinds is not None
    start = time.perf_counter()
    from rich.progress import track

    with DatasetWriter(pred_dir, name="toy-eval") as writer:
        for i, rec in enumerate(track(records, description="answering", disable=not progress)):
            prompt = [Message(m.role, [p if isinstance(p, TextPart) else ImagePart(truth.open_image(p.path, rec.id))
                                       for p in m.content]) for m in rec.messages if m.role != "assistant"]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + i)

            def draw(k, context):
                return draw_image(model, context, cfg, generator=generator)

            answer = greedy_answer(model.mllm, model.tokenizer, model.image_processor, prompt, draw,
                                   max_new_tokens=max_new_tokens)
            writer.write(Record(id=rec.id, source="duetgen-toy-eval", messages=prompt + [answer], meta={"kind": rec.meta.get("kind")}))
    seconds = time.perf_counter() - start
    report = toyworld_judge.evaluate(pred_dir, truth_dir, progress=False)
    if subset:  # score only the records answered (the rest would count as missing)
        answered = {rec.id for rec in records}
        report["records"] = [row for row in report["records"] if row["id"] in answered]
        report["summary"] = toyworld_judge.summarise(report["records"])
    report["run"] = {"model": str(model_dir), "truth": str(truth_dir), "records": len(records), "kinds": kinds,
                     "limit": limit, "seconds": seconds,
                     "num_steps": num_steps, "guidance_scale": guidance_scale, "seed": seed,
                     "settings": model.config.to_dict(),
                     "loop": "duetgen.train.toy_eval (simple, no KV cache)"}
    toyworld_judge.write_report(report, out_dir / "report.json")
    render_dataset_html(pred_dir, out_dir / "pred.html", progress=False)
    return report
