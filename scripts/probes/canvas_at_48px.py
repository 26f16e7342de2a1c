"""Do ShapeWorld canvases survive being drawn at 48 px? Every image of a dataset resized to 48x48 and read back.

    python scripts/probes/canvas_at_48px.py runs/swr/data/test

Prints, per resampling filter, images / read back as the same scene / read cleanly (docs/decisions.md, 48 px).
"""
from PIL import Image
from duetgen.data.dataset import Dataset
from duetgen.data.record import ImagePart
from duetgen.shapeworld.judge import read_canvas
import sys
ds = Dataset(sys.argv[1])
for filt in ("BOX", "BICUBIC", "LANCZOS", "BILINEAR"):
    n = ok = clean = 0
    for rec in ds:
        for m in rec.messages:
            for p in m.content:
                if isinstance(p, ImagePart):
                    im = ds.open_image(p.path, rec.id).convert("RGB")
                    want = read_canvas(im).triples()
                    small = im.resize((48, 48), getattr(Image, filt))
                    r = read_canvas(small)
                    n += 1; ok += r.triples() == want; clean += r.clean
    print(filt, n, ok, clean)
