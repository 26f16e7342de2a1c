"""Where an answer's images go wrong: each wrong piece of each aligned image against the truth scene.

    python scripts/probes/error_anatomy.py PRED_DATASET TRUTH_DATASET

Counts, per task kind, pieces with the wrong shape (e.g. circle->square), the wrong colour, missing or extra,
split by whether the step touched the cell or kept it (docs/training.md, "What session 5 measured").
"""
import sys, collections
from duetgen.data.dataset import Dataset
from duetgen.data.record import ImagePart
from duetgen.shapeworld.judge import Task, read_canvas, align_images
pred_dir, truth_dir = sys.argv[1], sys.argv[2]
truth_ds, pred_ds = Dataset(truth_dir), Dataset(pred_dir)
preds = {r.id: [p for m in r.messages if m.role=="assistant" for p in m.content] for r in pred_ds}
cnt = collections.Counter()
for rec in truth_ds:
    t = Task.from_meta(rec.meta, rec.id)
    if t.kind == "understanding": continue
    parts = preds[rec.id]; imgs = [p for p in parts if isinstance(p, ImagePart)]
    scenes = t.scenes()
    al = align_images(parts, len(t.operations), t.kind in ("how-to","continuation"))
    for k, i in al.items():
        rd = read_canvas(pred_ds.open_image(imgs[i].path, rec.id))
        touched = t.operations[k-1].touched_positions(scenes[k-1])
        shown = rd.triples(); want = scenes[k].triples()
        for c,s,p in want - shown:
            g = [q for q in shown if q[2]==p]
            where = 'touched' if p in touched else 'kept'
            if g and g[0][0]==c: cnt[(t.kind, where, f'shape {s}->{g[0][1]}')] += 1
            elif g: cnt[(t.kind, where, 'colour/both')] += 1
            else: cnt[(t.kind, where, 'missing')] += 1
        for c,s,p in shown - want:
            if not any(q[2]==p for q in want): cnt[(t.kind, 'touched' if p in touched else 'kept', 'extra')] += 1
for k in sorted(cnt): print(k, cnt[k])
