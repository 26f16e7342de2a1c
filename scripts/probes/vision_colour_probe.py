"""Is a canvas cell's colour in the toy MLLM's vision tokens? A linear probe on the merged vision tokens.

    python scripts/probes/vision_colour_probe.py --mllm runs/shapeworld/stage1c/mllm

Renders 600 random ShapeWorld canvases (1-4 pieces, seed 0), runs the MLLM's vision tower + merger
(one token per grid cell at 48 px), and fits a linear classifier (colour of the cell's piece, or
empty) on 70% of the tokens; prints its accuracy on the other 30%. High accuracy while the MLLM's
understanding answers get colours wrong means the language model does not use what the vision tokens
carry (docs/training.md, "What limits it").
"""

from __future__ import annotations

import argparse
import random

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mllm", required=True, help="a stage-1 `mllm/` directory (toy architecture)")
    ap.add_argument("--canvases", type=int, default=600)
    args = ap.parse_args()
    from transformers import Qwen2_5_VLForConditionalGeneration

    from duetgen.shapeworld.world import COLOURS, POSITIONS, SHAPES, Piece, Scene, WorldError, render
    from duetgen.models.image_processor import ImageProcessor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.mllm).eval()
    processor = ImageProcessor.from_pretrained(args.mllm)
    colours, rng = list(COLOURS), random.Random(0)
    features, labels = [], []
    with torch.no_grad():
        for _ in range(args.canvases):
            cells = rng.sample(range(9), rng.randint(1, 4))
            pieces = [Piece(rng.choice(colours), rng.choice(SHAPES), POSITIONS[c]) for c in cells]
            try:
                scene = Scene.of(pieces)
            except WorldError:  # two pieces of the same colour and shape: not a ShapeWorld canvas
                continue
            pixel_values, grid = processor([render(scene)])
            out = model.model.visual(pixel_values, grid_thw=grid)
            tokens = out.pooler_output if getattr(out, "pooler_output", None) is not None else out
            if tokens.shape[0] != 9:
                raise SystemExit(f"{args.mllm}: expected 9 vision tokens per canvas (one per cell), got {tokens.shape[0]}")
            label = [len(colours)] * 9  # empty
            for p in pieces:
                label[POSITIONS.index(p.position)] = colours.index(p.colour)
            features.append(tokens.float()), labels.append(torch.tensor(label))
    x, y = torch.cat(features), torch.cat(labels)
    n = int(0.7 * len(x))
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], len(colours) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x[:n]), y[:n]).backward()
        opt.step()
    pred, truth = probe(x[n:]).argmax(-1), y[n:]
    filled = truth < len(colours)
    print(f"held-out cells: {int(filled.sum())} with a piece, colour read right {(pred[filled] == truth[filled]).float().mean():.3f}; "
          f"{int((~filled).sum())} empty, read empty {(pred[~filled] == len(colours)).float().mean():.3f}")


if __name__ == "__main__":
    main()
