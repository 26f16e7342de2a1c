"""Text condition for every <BOV> of a sequence: one forward + slicing vs one prefix forward per <BOV>.

Toy ShapeWorld MLLM on one CPU thread, a how-to record with a user canvas and 4 generated canvases.
Prints the median wall time of each way, their ratio, the max difference between them, and the
stage-1 forward + backward time of the same sequence.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mllm_condition.py
"""

import statistics
import tempfile
import time

import torch
from PIL import Image, ImageDraw
from transformers import Qwen2_5_VLForConditionalGeneration

from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.models.mllm import (
    all_layer_states,
    condition_hidden_states,
    model_inputs,
    render_record,
    toy_image_processor,
    toy_qwen2_5_vl_config,
)
from duetgen.models.tokenizer import build_tokenizer, shapeworld_corpus

REPEATS = 7


def canvas(n: int) -> Image.Image:
    im = Image.new("RGB", (64, 64), "white")
    for k in range(n):
        cx, cy = 12 + 20 * (k % 3), 12 + 20 * (k // 3)
        ImageDraw.Draw(im).ellipse([cx - 7, cy - 7, cx + 7, cy + 7], fill=(220, 40, 40))
    return im


def median_seconds(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = build_tokenizer(tempfile.mkdtemp() + "/tok", shapeworld_corpus(), vocab_size=512)
    model = Qwen2_5_VLForConditionalGeneration(toy_qwen2_5_vl_config(len(tok))).eval()
    answer = []
    for k in range(1, 5):
        answer += [TextPart(f"Step {k}: Place the red circle at the top left.\n"), ImagePart(canvas(k))]
    answer.append(TextPart("Done. The canvas is ready."))
    record = Record("bench", [
        Message("user", [TextPart("Here is my canvas. How do I add a red circle at the top, then remove the red circle?"),
                         ImagePart(canvas(0))]),
        Message("assistant", answer),
    ])
    seq = render_record(record, tok, toy_image_processor())
    bovs = seq.bov_positions

    with torch.no_grad():
        def sliced():
            states = all_layer_states(model, seq)
            return [states[:b] for b in bovs]

        def per_bov():
            return [condition_hidden_states(model, seq, b) for b in bovs]

        a, b = sliced(), per_bov()
        diff = max((x - y).abs().max().item() for x, y in zip(a, b))
        t_sliced = median_seconds(sliced)
        t_per_bov = median_seconds(per_bov)

    model.train()
    inputs = model_inputs(model, seq)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    t_train = median_seconds(train_step)
    print(f"sequence: {len(seq)} tokens, {len(seq.images)} images, {len(bovs)} <BOV>s; "
          f"condition width {a[0].shape[1]}")
    print(f"one forward + slicing : {t_sliced * 1e3:8.1f} ms")
    print(f"one forward per <BOV> : {t_per_bov * 1e3:8.1f} ms")
    print(f"ratio (per-BOV / sliced): {t_per_bov / t_sliced:.2f}x   max |difference| {diff:.2e}")
    print(f"stage-1 forward + backward: {t_train * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
