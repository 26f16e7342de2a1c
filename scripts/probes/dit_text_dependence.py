"""How much a trained DuetGen's DiT output depends on the text, on a blank canvas.

    python scripts/probes/dit_text_dependence.py --model checkpoints/shapeworld-toy --data runs/shapeworld/data/val

Takes the first 4 text-to-image records, runs the DiT on the same noisy white canvas at t = 0.95 / 0.7
/ 0.4 with each prompt's text condition, and prints the RMS of the output and its spread across the
prompts. A DiT that ignores the text has spread ~0 (docs/training.md, "Text is what the DiT learns last").
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a DuetGen directory")
    ap.add_argument("--data", required=True, help="ShapeWorld dataset with text-to-image records")
    args = ap.parse_args()
    from duetgen.data.dataset import Dataset
    from duetgen.diffusion.draw import white_canvas_latent
    from duetgen.diffusion.flow_matching import dit_sample_inputs
    from duetgen.models.duetgen import DuetGen
    from duetgen.train import stage2

    model = DuetGen.from_pretrained(args.model)
    ds = Dataset(args.data)
    items = [(ds, r) for r in ds if (r.meta or {}).get("kind") == "text-to-image"][:4]
    batch = stage2.make_batch(range(len(items)), items, [0] * len(items), model.tokenizer, model.image_processor, 0.0)
    prefixes = [b["rendered"].prefix(next(s.bov_position for s in b["rendered"].images if s.index == 0)) for b in batch]
    with torch.no_grad():
        text = [model.connector(s) for s in stage2.mllm_states(model.mllm, prefixes)]
        white = white_canvas_latent(model.vae, *model.config.image_size, "cpu")
        noise = torch.randn(white.shape, generator=torch.Generator().manual_seed(0))
        for t in (0.95, 0.7, 0.4):
            frames, times, mask = dit_sample_inputs([], t * noise + (1 - t) * white, t)
            out = torch.stack([model.dit(frames=[frames], timesteps=[times], condition_mask=[mask], text=[x],
                                         targets_only=True)[0][0] for x in text])
            spread = (out - out.mean(0)).pow(2).mean().sqrt()
            print(f"t={t:.2f}  output RMS {out.pow(2).mean().sqrt():.4f}  spread across prompts {spread:.4f}")


if __name__ == "__main__":
    main()
