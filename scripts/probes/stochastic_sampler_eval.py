"""Probe: eval-toy on a val split with a stochastic flow sampler (x0 + re-noised mix of implied and fresh noise).

    python scripts/probes/stochastic_sampler_eval.py MODEL OUT ETA [TRUTH]

Not in the engine: it replaces the sampler for this process only (docs/training.md, "Sampler and guidance at inference").
"""
import sys, torch
import duetgen.models.duetgen as D
from duetgen.diffusion.schedules import make_schedule
model_dir, out, eta = sys.argv[1], sys.argv[2], float(sys.argv[3])
truth = sys.argv[4] if len(sys.argv) > 4 else "runs/swr/data/val"
torch.set_num_threads(1)
def stochastic(denoise, noise, config, callback=None):
    schedule = make_schedule(config)
    gen = torch.Generator().manual_seed(int(noise.flatten()[:8].abs().sum().item() * 1e6) % (2**31))
    x = noise
    for i in range(len(schedule) - 1):
        t, s = float(schedule[i]), float(schedule[i + 1])
        v = denoise(x, torch.tensor(t, dtype=x.dtype))
        x0 = x - t * v
        eps = x + (1 - t) * v  # the noise the model implies
        z = torch.randn(x.shape, generator=gen)
        mixed = (1 - eta ** 2) ** 0.5 * eps + eta * z
        x = (1 - s) * x0 + s * mixed
    return x
D.sample = stochastic
from duetgen.shapeworld.evaluate import evaluate_toy
r = evaluate_toy(model_dir, truth, out, progress=False)
