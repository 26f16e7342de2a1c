"""Stage 1's phase 3 (`toy-read-more`) from a chosen phase-2 model with a few fields changed (session 6's reading runs).

    python scripts/probes/stage1_phase3_variant.py runs/s6/p3-vis1 runs/sw5/stage1/mllm vision_lr_scale=1.0
    python scripts/probes/stage1_phase3_variant.py runs/s6/p3-lr1e3 runs/sw5/stage1/mllm lr=0.001

Data: a `duetgen train shapeworld` run's datasets (DATA, default runs/sw5/data). Then read the result with
`scripts/probes/understanding_errors.py --mllm OUT/mllm --data runs/s6/read-val` (docs/training.md,
"What session 6 measured").
"""
import dataclasses
import json
import os
import sys

from duetgen.train import configs as C, stage1

out, init = sys.argv[1], sys.argv[2]
over = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
data = os.environ.get("DATA", "runs/sw5/data") + "/"
cfg = dataclasses.replace(C.toy_stage1_read_more(), data=[data + "train", data + "train-understanding", data + "train-understanding-2"],
                          val_data=data + "val", mllm=init, save_every=500, keep_last=5, **over)
stage1.train(cfg, out, resume_run=False, progress=False)
