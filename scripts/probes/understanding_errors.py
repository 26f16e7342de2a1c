"""Where a stage-1 MLLM's understanding answers go wrong, teacher-forced.

    python scripts/probes/understanding_errors.py --mllm checkpoints/shapeworld-toy/mllm --data runs/shapeworld/data/test

For the understanding records of a ShapeWorld split: token accuracy over the answers, how many
answers are right in every token, the colour word's accuracy by the object's place in the answer
(1st, 2nd, ...: the "which piece is next in reading order" question), and the most common
(truth -> prediction) token swaps. `scripts/probes/reading_accuracy.py` counts only colour / shape /
position words; this one also sees the prepositions that carry the row ("at the top", "on the
left", "in the center"), docs/training.md "What the third run changed".
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

COLOURS = {"red", "green", "blue", "yellow", "purple", "orange"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mllm", required=True, help="a stage-1 `mllm/` directory (or a DuetGen directory's mllm/)")
    ap.add_argument("--data", required=True, help="ShapeWorld dataset with understanding records")
    args = ap.parse_args()
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from duetgen.data.dataset import Dataset
    from duetgen.models import mllm as M
    from duetgen.models.image_processor import ImageProcessor
    from duetgen.train import common as stage1  # render, pack_inputs (shared by both stages)

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.mllm).eval()
    tok, proc = AutoTokenizer.from_pretrained(args.mllm), ImageProcessor.from_pretrained(args.mllm)
    ds = Dataset(args.data)
    swaps, colour_total, colour_right = Counter(), Counter(), Counter()
    tokens = right = records = records_right = 0
    with torch.no_grad():
        for rec in ds:
            if (rec.meta or {}).get("kind") != "understanding":
                continue
            inputs = stage1.pack_inputs(model, [stage1.render((ds, rec), tok, proc)])
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[0]
            all_right, nth = True, 0
            for p, t in zip(logits[:-1].argmax(-1).tolist(), inputs["labels"][1:].tolist()):
                if t == M.IGNORE_INDEX:
                    continue
                tokens, right, all_right = tokens + 1, right + (p == t), all_right and p == t
                if p != t:
                    swaps[(tok.decode([t]).strip(), tok.decode([p]).strip())] += 1
                if tok.decode([t]).strip() in COLOURS:
                    colour_total[nth] += 1
                    colour_right[nth] += int(p == t)
                    nth += 1
            records, records_right = records + 1, records_right + all_right
    if not records:
        raise SystemExit(f"{args.data}: no understanding records")
    print(f"{records} understanding answers: token accuracy {right / tokens:.4f}, all tokens right {records_right}/{records}")
    print("colour word by object: " + ", ".join(f"#{k + 1} {colour_right[k]}/{colour_total[k]}" for k in sorted(colour_total)))
    print("most common swaps (truth -> prediction): " + ", ".join(f"{a!r}->{b!r} x{n}" for (a, b), n in swaps.most_common(8)))


if __name__ == "__main__":
    main()
