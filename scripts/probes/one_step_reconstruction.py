"""Can the DiT redraw the truth crisply from a noisy copy of it? One DiT call per record and time.

    python scripts/probes/one_step_reconstruction.py --model checkpoints/shapeworld-toy --data runs/swr/data/val

For the first N text-to-image records: x_t = t * noise + (1 - t) * truth latent, one DiT call with the
record's text, the clean-image prediction decoded and read by the exact judge. Prints, per t, how often
the prediction reads back exactly as the truth scene, how often it reads cleanly, and the pixel RMSE.
Exact at small t means the network can draw the picture and the sampler's path is what loses it;
not exact even at t = 0.1 means the network cannot draw crisp pieces at all (capacity or training).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a DuetGen directory")
    ap.add_argument("--data", required=True, help="ShapeWorld dataset with text-to-image records")
    ap.add_argument("--n", type=int, default=13)
    args = ap.parse_args()
    from duetgen.data.dataset import Dataset
    from duetgen.data.record import ImagePart
    from duetgen.diffusion.draw import white_canvas_latent
    from duetgen.diffusion.flow_matching import dit_sample_inputs
    from duetgen.shapeworld.judge import Task, read_canvas
    from duetgen.models.duetgen import DuetGen
    from duetgen.train import stage2

    torch.set_num_threads(1)
    model = DuetGen.from_pretrained(args.model)
    ds = Dataset(args.data)
    items = [(ds, r) for r in ds if (r.meta or {}).get("kind") == "text-to-image"][: args.n]
    batch = stage2.make_batch(range(len(items)), items, [0] * len(items), model.tokenizer, model.image_processor, 0.0)
    prefixes = [b["rendered"].prefix(next(s.bov_position for s in b["rendered"].images if s.index == 0)) for b in batch]
    truths, scenes = [], []
    for _, r in items:
        part = next(p for m in r.messages if m.role == "assistant" for p in m.content if isinstance(p, ImagePart))
        img = ds.open_image(part.path, r.id).convert("RGB").resize(tuple(model.config.image_size))
        truths.append(model.encode_images([img])[0])
        scenes.append(Task.from_meta(r.meta, r.id).scenes()[1].triples())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text = [model.connector(s) for s in stage2.mllm_states(model.mllm, prefixes)]
        white = white_canvas_latent(model.vae, *model.config.image_size, "cpu")
        for t in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
            exact = clean = 0
            err = 0.0
            for x, z, want in zip(text, truths, scenes):
                noise = torch.randn(z.shape, generator=gen)
                frames, times, mask = dit_sample_inputs([], t * noise + (1 - t) * z, t)
                out = model.dit(frames=[frames], timesteps=[times], condition_mask=[mask], text=[x],
                                targets_only=True)[0][0] + white
                img = model.decode_latents([out])[0]
                reading = read_canvas(img)
                exact += reading.triples() == want
                clean += reading.clean
                err += (out - z).pow(2).mean().sqrt().item()
            n = len(truths)
            print(f"t={t:.1f}  exact {exact}/{n}  clean {clean}/{n}  latent RMSE {err / n:.4f}", flush=True)


if __name__ == "__main__":
    main()
