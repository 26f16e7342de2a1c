"""Where a model's text-to-image answers put their mark: the cell of the centroid of non-white pixels.

    python scripts/probes/blank_canvas_placement.py runs/eval/pred runs/data/val

For every text-to-image record of the truth, reads the answer image of the prediction dataset
(`duetgen train eval-toy` output), takes the pixels that differ from white by more than 60 (sum of
|255 - channel|), and reports: blank (no such pixel), the centroid's nearest grid cell against the
truth piece's cell ("place right"), and whether the judge reads the right colour anywhere. A model that
has learned where but not what shows up here before it shows up in IT-Co.
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> None:
    from duetgen.data.dataset import Dataset
    from duetgen.shapeworld.judge import read_canvas

    pred, truth = Dataset(sys.argv[1]), Dataset(sys.argv[2])
    answers = {r.id: r for r in pred}
    centres = np.array([12, 32, 52])
    n = blank = place = colour = 0
    for rec in truth:
        if (rec.meta or {}).get("kind") != "text-to-image" or rec.id not in answers:
            continue
        n += 1
        (target,) = [truth.open_image(p.path, rec.id) for p in rec.image_parts("assistant")]
        images = [pred.open_image(p.path, rec.id) for p in answers[rec.id].image_parts("assistant")]
        piece = read_canvas(target).pieces[0]
        if not images:
            blank += 1
            continue
        a = np.asarray(images[-1].convert("RGB"), dtype=np.int32)
        ink = (255 - a).sum(-1) > 60
        if not ink.any():
            blank += 1
            continue
        ys, xs = np.nonzero(ink)
        cell = (int(np.abs(centres - ys.mean()).argmin()), int(np.abs(centres - xs.mean()).argmin()))
        truth_ink = (255 - np.asarray(target.convert("RGB"), dtype=np.int32)).sum(-1) > 60
        ty, tx = np.nonzero(truth_ink)
        place += cell == (int(np.abs(centres - ty.mean()).argmin()), int(np.abs(centres - tx.mean()).argmin()))
        colour += any(p.colour == piece.colour for p in read_canvas(images[-1]).pieces)
    print(f"{n} text-to-image records: blank {blank}, place right {place}, right colour read {colour}")


if __name__ == "__main__":
    main()
