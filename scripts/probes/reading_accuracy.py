"""Teacher-forced accuracy of a stage-1 MLLM on colour / shape / position words, per ShapeWorld task kind.

    python scripts/probes/reading_accuracy.py --mllm runs/shapeworld/stage1b/mllm --data runs/shapeworld/data/val
    python scripts/probes/reading_accuracy.py --checkpoint runs/shapeworld/stage1b/checkpoints/step-0001000 \
        --tokenizer runs/shapeworld/stage1-init --data runs/shapeworld/data/val

Copy tasks (how-to, continuation, text-to-image, editing) show whether the model copies prompt words;
understanding shows whether it reads the canvas. Chance for colours is 1/6. docs/training.md cites it.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

WORDS = {"colour": {"red", "green", "blue", "yellow", "purple", "orange"}, "shape": {"circle", "square", "triangle"},
         "position": {"top", "bottom", "left", "right", "center"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mllm", help="a stage-1 `mllm/` directory")
    ap.add_argument("--checkpoint", help="a stage-1 training checkpoint directory (toy architecture)")
    ap.add_argument("--tokenizer", help="tokenizer directory for --checkpoint")
    ap.add_argument("--data", required=True, help="ShapeWorld dataset (e.g. the val split)")
    args = ap.parse_args()
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from duetgen.data.dataset import Dataset
    from duetgen.models import mllm as M
    from duetgen.models.image_processor import ImageProcessor
    from duetgen.train import common as stage1  # render, pack_inputs (shared by both stages)

    if args.mllm:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.mllm)
        tok, proc = AutoTokenizer.from_pretrained(args.mllm), ImageProcessor.from_pretrained(args.mllm)
    elif args.checkpoint and args.tokenizer:
        tok, proc = AutoTokenizer.from_pretrained(args.tokenizer), M.toy_image_processor()
        model = Qwen2_5_VLForConditionalGeneration(M.toy_qwen2_5_vl_config(len(tok)))
        model.load_state_dict(load_file(f"{args.checkpoint}/model.safetensors"))
    else:
        ap.error("give --mllm, or --checkpoint with --tokenizer")
    model.eval()
    ds = Dataset(args.data)
    right, total = Counter(), Counter()
    with torch.no_grad():
        for rec in ds:
            kind = (rec.meta or {}).get("kind")
            inputs = stage1.pack_inputs(model, [stage1.render((ds, rec), tok, proc)])
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[0]
            for p, t in zip(logits[:-1].argmax(-1).tolist(), inputs["labels"][1:].tolist()):
                if t == M.IGNORE_INDEX:
                    continue
                word = tok.decode([t]).strip()
                for cat, words in WORDS.items():
                    if word in words:
                        total[(kind, cat)] += 1
                        right[(kind, cat)] += int(p == t)
    for key in sorted(total):
        print(f"{key[0]:14} {key[1]:9} {right[key]:4}/{total[key]:<4} = {right[key] / total[key]:.2f}")


if __name__ == "__main__":
    main()
