"""The exact ShapeWorld judge: read text and canvases back into tasks and pieces, and score interleaved answers.

Reading text: ``parse_prompt`` (a user prompt and its canvas -> the Task it asks), ``parse_sentence``,
``parse_clause``, ``parse_description``: the inverses of the world's wordings (duetgen.shapeworld.world).

Reading a canvas (DESIGN 9): nearest palette colour per pixel, connected components per colour,
centroid to the nearest grid cell, shape from how the component fills its bounding box.

Design choices:
- Any image size is read by first resampling it to the 64x64 world with a BOX (area) filter. Big
  outputs (a DiT at 512 px) then cost the same as native ones, and the blends BOX makes at
  shape edges are handled by the same rule that handles blur (next point).
- Pixel classes: a pixel within POINT_TOL of a palette colour or of white takes it (Gaussian
  noise of sigma 10 per channel moves a pixel ~17 on average, the closest palette pair,
  yellow/orange, is 62 apart). Otherwise, if it lies near the segment white -> colour (an edge
  blend, as blur or downscaling make), it takes that colour when it is at least half way there,
  else background. Anything else is "unknown". Without the blend rule a blurred orange edge would
  read as yellow.
- Components smaller than MIN_AREA (about a third of a triangle) are specks, not pieces. Specks
  and unknown pixels within 2 px of a piece are explained (edge artefacts); the rest are stray.
- The shape label refines the spec's fill-ratio rule: instead of comparing only the fraction of
  its bounding box a component fills (circle 0.787, square 1.0, triangle 0.502, measured on
  ``render``), it compares *which* pixels of the box it fills, as the IoU with each shape drawn
  by ImageDraw into that same box. Like the fill ratio it ignores size; unlike it, it survives
  blur plus noise (measured: the plain fill ratio read 4 of 300 blurred noisy canvases wrong,
  all triangles read as circles; the box IoU read none). The fill ratio stays in the reading.
- A piece's confidence is the IoU of its pixels with the world's 15x15 mask of its labelled shape,
  placed on the piece's box centre (best of +-1 px), so a wrong size also lowers it. Measured on
  300 random scenes: 1.0 on renders, >= 0.97 under a 3x3 blur, >= 0.98 under noise of sigma 10,
  >= 0.87 under both (a fill-ratio tolerance could not do this: blur moves a triangle's fill ratio
  from 0.50 to 0.60). A canvas is clean
  (I-Q = 1) when it has < 1% stray pixels, every piece has confidence >= 0.75 and the pieces
  form a valid scene.
- Scores compare a prediction with the ground-truth record of the same id, using the truth's
  ``meta`` (the scenes and operations), so truth images are never read. docs/shapeworld.md
  defines each metric; a missing prediction scores 0 on every metric its kind defines.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from duetgen.shapeworld.world import (CANVAS_PREFIX, CANVAS_SIZE, CELL_CENTRES, COLOURS, EMPTY_DESCRIPTION, HALF_SIZE,
                                      KINDS, PLACE_PHRASES, POSITIONS, SHAPES, UNDERSTANDING_QUESTION, Operation, Piece,
                                      Scene, Task, WorldError, render)

POINT_TOL = 45.0  # max RGB distance to a palette colour / white for a "pure" pixel (noise sigma 10 -> ~17 typical)
BLEND_TOL = 40.0  # max distance from the white->colour segment for an edge-blend pixel
MIN_AREA = 40  # px at 64x64; a triangle is 113 px, so a third of one
EXPLAIN_RADIUS = 2  # px around a piece in which unknown pixels and specks count as edge artefacts
MAX_STRAY_FRACTION = 0.01  # a clean canvas has under 1% unexplained pixels
MIN_CONFIDENCE = 0.75  # IoU with the rendered shape; a half-drawn shape is ~0.5, a blurred one >= 0.95

METRICS = ("t_com", "i_com", "i_co", "it_co", "i_q", "u_acc")
METRIC_LABELS = {"t_com": "T-Com", "i_com": "I-Com", "i_co": "I-Co", "it_co": "IT-Co", "i_q": "I-Q",
                 "u_acc": "U-Acc"}
_STEP_RE = re.compile(r"Step (\d+):")


# =============================================================================================
# Parsing ShapeWorld text back into pieces, operations and tasks
# =============================================================================================
_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_POSITION = "|".join(sorted(POSITIONS, key=len, reverse=True))  # longest first: "top left" before "top"
_PHRASE_TO_POSITION = {v: k for k, v in PLACE_PHRASES.items()}
_PLACE = "|".join(sorted(PLACE_PHRASES.values(), key=len, reverse=True))
_PIECE_RE = re.compile(rf"an? ({_COLOUR}) ({_SHAPE}) ({_PLACE})")
_CLAUSE_RES = {
    "place": re.compile(rf"add an? ({_COLOUR}) ({_SHAPE}) ({_PLACE})"),
    "remove": re.compile(rf"remove the ({_COLOUR}) ({_SHAPE})"),
    "move": re.compile(rf"move the ({_COLOUR}) ({_SHAPE}) to the ({_POSITION})"),
    "recolour": re.compile(rf"make the ({_COLOUR}) ({_SHAPE}) ({_COLOUR})"),
}
_SENTENCE_RES = {
    "place": re.compile(rf"Place the ({_COLOUR}) ({_SHAPE}) ({_PLACE})\."),
    "remove": re.compile(rf"Remove the ({_COLOUR}) ({_SHAPE})\."),
    "move": re.compile(rf"Move the ({_COLOUR}) ({_SHAPE}) to the ({_POSITION})\."),
    "recolour": re.compile(rf"Make the ({_COLOUR}) ({_SHAPE}) ({_COLOUR})\."),
}


def _operation_from_match(op: str, m: re.Match) -> Operation:
    if op == "place":
        return Operation("place", m[1], m[2], _PHRASE_TO_POSITION[m[3]])
    if op == "remove":
        return Operation("remove", m[1], m[2])
    if op == "move":
        return Operation("move", m[1], m[2], m[3])
    return Operation("recolour", m[1], m[2], new_colour=m[3])


def parse_piece_phrase(text: str) -> Piece:
    """``a red circle at the top left`` -> Piece."""
    m = _PIECE_RE.fullmatch(text.strip())
    if not m:
        raise WorldError(f"not a ShapeWorld piece phrase: {text!r}")
    return Piece(m[1], m[2], _PHRASE_TO_POSITION[m[3]])


def _split_list(text: str) -> list[str]:
    """Inverse of join_phrases (no vocabulary word contains ``,`` or `` and ``)."""
    head, sep, last = text.rpartition(" and ")
    return (head.split(", ") + [last]) if sep else [text]


def _parse_operation(text: str, patterns: dict, what: str) -> Operation:
    """The Operation of the first of ``patterns`` (op -> regex) that matches all of ``text``."""
    for op, rx in patterns.items():
        m = rx.fullmatch(text.strip())
        if m:
            return _operation_from_match(op, m)
    raise WorldError(f"not a ShapeWorld {what}: {text!r}")


def parse_clause(text: str) -> Operation:
    """``add a yellow circle at the top right`` / ``remove the red circle`` / ... -> Operation."""
    return _parse_operation(text, _CLAUSE_RES, "operation clause")


def parse_sentence(text: str) -> Operation:
    """A step sentence (``Move the red circle to the center.``) -> Operation."""
    return _parse_operation(text, _SENTENCE_RES, "step sentence")


def parse_description(text: str) -> Scene:
    """An understanding answer (``The canvas has a red circle at the top left and ...``) -> Scene."""
    text = " ".join(text.split())
    if text == EMPTY_DESCRIPTION:
        return Scene()
    m = re.fullmatch(r"The canvas has (.+)\.", text)
    if not m:
        raise WorldError(f"not a ShapeWorld canvas description: {text!r}")
    return Scene(tuple(parse_piece_phrase(s) for s in _split_list(m[1])))


def parse_prompt(text: str, canvas: Any = None, kind: str | None = None) -> Task:
    """A ShapeWorld user prompt (and its canvas: a Scene or an image) -> the Task it asks.

    A canvas image is read with `read_scene`. Editing prompts for remove / move / recolour are
    word for word the step sentences that transition records use, so without ``kind`` a step
    sentence with a canvas parses as editing, except ``Place ...`` (never an editing prompt),
    which parses as a transition. ``kind`` checks the prompt against the kind you expect.
    """
    if kind is not None and kind not in KINDS:
        raise WorldError(f"unknown task kind {kind!r} (expected one of {list(KINDS)})")
    text = " ".join(text.split())

    def initial() -> Scene:
        if canvas is None:
            raise WorldError(f"prompt {text!r} refers to a canvas, but none was given")
        if isinstance(canvas, Scene):
            return canvas
        return read_scene(canvas)

    task = None
    if text == UNDERSTANDING_QUESTION:
        task = Task("understanding", initial())
    elif m := re.fullmatch(r"How do I arrange (.+)\?", text):
        pieces = [parse_piece_phrase(s) for s in _split_list(m[1])]
        task = Task("how-to", Scene(), tuple(Operation("place", p.colour, p.shape, p.position) for p in pieces))
    elif m := re.fullmatch(rf"{re.escape(CANVAS_PREFIX)} How do I (.+)\?", text):
        task = Task("continuation", initial(), tuple(parse_clause(c) for c in m[1].split(", then ")))
    elif m := re.fullmatch(r"Draw (.+)\.", text):
        p = parse_piece_phrase(m[1])
        task = Task("text-to-image", Scene(), (Operation("place", p.colour, p.shape, p.position),))
    elif kind == "transition" or (kind is None and text.startswith("Place ")):
        task = Task("transition", initial(), (parse_sentence(text),))
    elif text[:1].isupper() and text.endswith("."):
        task = Task("editing", initial(), (parse_clause(text[0].lower() + text[1:-1]),))
    if task is None:
        raise WorldError(f"not a ShapeWorld prompt: {text!r}")
    if kind is not None and task.kind != kind:
        raise WorldError(f"prompt {text!r} is a {task.kind} prompt, not {kind}")
    return task


# =============================================================================================
# Reading a canvas
# =============================================================================================
_NAMES = ("white",) + tuple(COLOURS)  # label 0 = background, 1.. = palette colours, -1 = unknown
_POINTS = np.array([(255, 255, 255)] + list(COLOURS.values()), dtype=np.float32)  # (7, 3)


@dataclass(frozen=True)
class ShapePrototype:
    fill: float  # area / bounding-box area
    mask: np.ndarray  # (15, 15) bool, the shape's pixels inside its box


@lru_cache(maxsize=1)
def shape_prototypes() -> dict[str, ShapePrototype]:
    """Fill ratio and pixel mask of each shape, measured on ``render`` itself."""
    out = {}
    c, r = CELL_CENTRES[1], HALF_SIZE
    for shape in SHAPES:
        mask = np.asarray(render(Scene((Piece("red", shape, "center"),)))).min(axis=-1) < 255  # (64, 64)
        box = mask[c - r:c + r + 1, c - r:c + r + 1]  # (15, 15)
        assert box.sum() == mask.sum(), "a shape must fit its [c - 7, c + 7] box"
        out[shape] = ShapePrototype(fill=float(box.mean()), mask=box)
    return out


@lru_cache(maxsize=4096)
def _box_template(shape: str, w: int, h: int) -> np.ndarray:
    """(h, w) bool: ``shape`` drawn by ImageDraw to fill a w x h box, as ``render`` draws it in 15 x 15."""
    from PIL import Image, ImageDraw

    im = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([0, 0, w - 1, h - 1], fill=1)
    elif shape == "square":
        draw.rectangle([0, 0, w - 1, h - 1], fill=1)
    else:
        draw.polygon([((w - 1) / 2, 0), (0, h - 1), (w - 1, h - 1)], fill=1)
    return np.asarray(im, dtype=bool)


def _label_shape(pixels: np.ndarray) -> str:
    """The shape whose box-filling drawing best overlaps (IoU) the component's pixels in its box."""
    ys, xs = pixels[:, 0] - pixels[:, 0].min(), pixels[:, 1] - pixels[:, 1].min()
    h, w = int(ys.max()) + 1, int(xs.max()) + 1
    comp = np.zeros((h, w), bool)
    comp[ys, xs] = True
    return max(SHAPES, key=lambda s: ((t := _box_template(s, w, h)) & comp).sum() / (t | comp).sum())


def _template_iou(pixels: np.ndarray, template: np.ndarray) -> float:
    """Best IoU of a component (its (N, 2) y, x pixels) with ``template`` centred on its box (+-1 px)."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    y0, x0 = ys.min(), xs.min()
    th, tw = template.shape
    pad = th + 2  # room for the template around the component's box
    h, w = ys.max() - y0 + 1 + 2 * pad, xs.max() - x0 + 1 + 2 * pad
    comp = np.zeros((h, w), bool)
    comp[ys - y0 + pad, xs - x0 + pad] = True
    cy, cx = pad + (ys.max() - y0) / 2, pad + (xs.max() - x0) / 2  # box centre in this frame
    best = 0.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ty, tx = int(round(cy - th // 2)) + dy, int(round(cx - tw // 2)) + dx
            placed = np.zeros_like(comp)
            placed[ty:ty + th, tx:tx + tw] = template
            best = max(best, (comp & placed).sum() / (comp | placed).sum())
    return float(best)


@dataclass
class DetectedPiece:
    colour: str
    shape: str
    position: str
    area: int  # pixels
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive, at 64x64
    fill: float
    centroid: tuple[float, float]  # x, y
    confidence: float  # IoU with the rendered shape: 1 = exactly it, <= 0.5 = a poor likeness

    @property
    def piece(self) -> Piece:
        return Piece(self.colour, self.shape, self.position)


@dataclass
class CanvasReading:
    pieces: list[DetectedPiece]
    stray_fraction: float  # unexplained pixels / all pixels
    problems: list[str] = field(default_factory=list)  # why the canvas is not clean (empty if clean)

    @property
    def clean(self) -> bool:
        return not self.problems

    def triples(self) -> set[tuple[str, str, str]]:
        return {(p.colour, p.shape, p.position) for p in self.pieces}

    def scene(self) -> Scene:
        """The pieces as a valid Scene; raises WorldError if they do not form one."""
        return Scene(tuple(p.piece for p in self.pieces))


def _to_world_pixels(image: Any) -> np.ndarray:
    """(64, 64, 3) float32 RGB of a PIL image (or HxWx3 uint8 array), area-resampled to the world grid."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise WorldError(f"a canvas array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise WorldError(f"a canvas must be a PIL image or an array, got {type(image).__name__}")
    if image.mode != "RGB":
        from duetgen.data.images import to_rgb

        image = to_rgb(image)
    if image.size != (CANVAS_SIZE, CANVAS_SIZE):
        image = image.resize((CANVAS_SIZE, CANVAS_SIZE), Image.BOX)
    return np.asarray(image, dtype=np.float32)


def classify_pixels(px: np.ndarray) -> np.ndarray:
    """(H, W, 3) float RGB -> (H, W) int labels: 0 white, 1..6 palette colours (COLOURS order), -1 unknown."""
    dist = np.linalg.norm(px[:, :, None, :] - _POINTS[None, None], axis=-1)  # (H, W, 7)
    labels = dist.argmin(-1)  # (H, W)
    pure = dist.min(-1) <= POINT_TOL
    # Edge blends: project onto each segment white -> colour.
    white = _POINTS[0]
    dirs = _POINTS[1:] - white  # (6, 3)
    rel = px - white  # (H, W, 3)
    t = np.clip((rel @ dirs.T) / (dirs * dirs).sum(-1), 0.0, 1.0)  # (H, W, 6)
    resid = np.linalg.norm(rel[:, :, None, :] - t[..., None] * dirs[None, None], axis=-1)  # (H, W, 6)
    best = resid.argmin(-1)  # (H, W)
    best_t = np.take_along_axis(t, best[..., None], -1)[..., 0]
    blend = resid.min(-1) <= BLEND_TOL
    blend_labels = np.where(best_t >= 0.5, best + 1, 0)
    return np.where(pure, labels, np.where(blend, blend_labels, -1))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (N, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _nearest_position(x: float, y: float) -> str:
    col = min(range(3), key=lambda i: abs(CELL_CENTRES[i] - x))
    row = min(range(3), key=lambda i: abs(CELL_CENTRES[i] - y))
    return POSITIONS[3 * row + col]


def read_canvas(image: Any) -> CanvasReading:
    """Read a canvas image of any size back into pieces, with per-piece confidence and stray pixels."""
    px = _to_world_pixels(image)  # (64, 64, 3)
    labels = classify_pixels(px)  # (64, 64)
    protos = shape_prototypes()
    pieces, piece_mask, specks = [], np.zeros(labels.shape, bool), np.zeros(labels.shape, bool)
    for label, colour in enumerate(_NAMES[1:], 1):
        for comp in _components(labels == label):
            ys, xs = comp[:, 0], comp[:, 1]
            if len(comp) < MIN_AREA:
                specks[ys, xs] = True
                continue
            piece_mask[ys, xs] = True
            w, h = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
            fill = len(comp) / (w * h)
            shape = _label_shape(comp)
            cx, cy = float(xs.mean()), float(ys.mean())
            pieces.append(DetectedPiece(colour, shape, _nearest_position(cx, cy), len(comp),
                                        (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
                                        round(fill, 4), (round(cx, 2), round(cy, 2)),
                                        round(_template_iou(comp, protos[shape].mask), 4)))
    pieces.sort(key=lambda p: (POSITIONS.index(p.position), p.colour, p.shape))
    explained = _dilate(piece_mask, EXPLAIN_RADIUS)
    stray = ((labels == -1) | specks) & ~explained
    reading = CanvasReading(pieces, float(stray.mean()))
    if reading.stray_fraction >= MAX_STRAY_FRACTION:
        reading.problems.append(f"{reading.stray_fraction:.1%} of pixels are unexplained")
    for p in pieces:
        if p.confidence < MIN_CONFIDENCE:
            reading.problems.append(f"malformed {p.colour} {p.shape} at the {p.position} (confidence {p.confidence})")
    try:
        reading.scene()
    except WorldError as e:
        reading.problems.append(f"not a valid scene: {e}")
    return reading


def read_scene(image: Any) -> Scene:
    """The Scene a canvas shows; raises WorldError naming the problem if it does not read cleanly."""
    reading = read_canvas(image)
    if not reading.clean:
        raise WorldError(f"the canvas does not read as a clean ShapeWorld scene: {'; '.join(reading.problems)}")
    return reading.scene()


# =============================================================================================
# Scores of one record
# =============================================================================================
def text_completeness(required: list[str], text: str) -> float:
    """Fraction of ``required`` sentences found in ``text`` as substrings, in order (longest in-order chain)."""
    if not required:
        return 1.0
    text = " ".join(text.split())
    required = [" ".join(s.split()) for s in required]

    @lru_cache(maxsize=None)
    def best(i: int, pos: int) -> int:
        if i == len(required):
            return 0
        skip = best(i + 1, pos)
        at = text.find(required[i], pos)  # the earliest match leaves the most room for the rest
        return max(skip, 1 + best(i + 1, at + len(required[i]))) if at >= 0 else skip

    return best(0, 0) / len(required)


def image_completeness(n_true: int, n_pred: int) -> float:
    """min/max of the image counts: missing and extra images both lower it; 1 when both are 0."""
    if n_true == n_pred:
        return 1.0
    return min(n_true, n_pred) / max(n_true, n_pred)


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|, 1 for two empty sets."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def _restrict(triples: set, positions: set[str]) -> set:
    return {t for t in triples if t[2] not in positions}


def align_images(parts: list, n_steps: int, stepwise: bool) -> dict[int, int]:
    """Map step (1-based) -> index into the predicted assistant images.

    With ``Step k:`` markers in the text, an image belongs to the step whose marker last preceded
    it (the first image per step wins; others are extra). Without markers, images align in order.
    """
    from duetgen.data.record import ImagePart, TextPart

    marked = stepwise and any(isinstance(p, TextPart) and _STEP_RE.search(p.text) for p in parts)
    out: dict[int, int] = {}
    step, n_img = None, 0
    for p in parts:
        if isinstance(p, TextPart):
            found = _STEP_RE.findall(p.text)
            if found:
                step = int(found[-1])
        elif isinstance(p, ImagePart):
            k = step if marked else n_img + 1
            if k is not None and 1 <= k <= n_steps and k not in out:
                out[k] = n_img
            n_img += 1
    return out


def defined_metrics(kind: str) -> tuple[str, ...]:
    """The metrics a task kind defines (undefined ones are None in reports)."""
    if kind == "understanding":
        return ("t_com", "i_com", "u_acc")
    if kind == "transition":
        return ("i_com", "i_co", "it_co", "i_q")
    return ("t_com", "i_com", "i_co", "it_co", "i_q")


def score_record(truth: Task, truth_texts: list[str], pred_parts: list | None,
                 open_image: Callable[[int], Any]) -> dict[str, Any]:
    """Scores of one prediction against its ground truth.

    ``pred_parts``: the predicted assistant content parts in order (None: no prediction);
    ``open_image(i)``: the i-th predicted assistant image as a PIL image.
    """
    metrics = defined_metrics(truth.kind)
    if pred_parts is None:
        return {m: (0.0 if m in metrics else None) for m in METRICS} | {"missing": True}
    from duetgen.data.record import ImagePart, TextPart

    scenes = truth.scenes()
    n_steps = len(truth.operations) if truth.kind != "understanding" else 0
    pred_text = "\n".join(p.text for p in pred_parts if isinstance(p, TextPart))
    n_images = sum(isinstance(p, ImagePart) for p in pred_parts)
    out: dict[str, Any] = {m: None for m in METRICS} | {"missing": False}
    if "t_com" in metrics:
        out["t_com"] = text_completeness(truth_texts, pred_text)
    out["i_com"] = image_completeness(n_steps, n_images)
    if truth.kind == "understanding":
        try:
            out["u_acc"] = float(_find_description(pred_text) == scenes[0])
        except WorldError:
            out["u_acc"] = 0.0
        return out

    readings = [read_canvas(open_image(i)) for i in range(n_images)]
    out["i_q"] = sum(r.clean for r in readings) / n_images if readings else 0.0
    aligned = align_images(pred_parts, n_steps, stepwise=truth.kind in ("how-to", "continuation"))
    if not aligned:
        out["i_co"] = out["it_co"] = 0.0
        return out
    it_co, i_co = [], []
    for k, img in sorted(aligned.items()):
        shown = readings[img].triples()
        it_co.append(jaccard(shown, scenes[k].triples()))
        # Previous canvas: the model's own previous image when it drew one, else the truth (for
        # step 1 that is the user's canvas). Only cells the step does not touch are compared.
        prev = readings[aligned[k - 1]].triples() if k - 1 in aligned else scenes[k - 1].triples()
        touched = truth.operations[k - 1].touched_positions(scenes[k - 1])
        i_co.append(jaccard(_restrict(prev, touched), _restrict(shown, touched)))
    out["it_co"] = sum(it_co) / len(it_co)
    out["i_co"] = sum(i_co) / len(i_co)
    return out


# ----------------------------------------------------------------------------- the scorer of the eval harness
# duetgen/eval/benchmarks/shapeworld.json names this module as its "scorer": the harness calls these two.


def truth_category(truth) -> str:
    """The task kind of a ground-truth record (its category in reports)."""
    return Task.from_meta(truth.meta, truth.id).kind


def score_item(truth, output: list | None, open_output_image: Callable[[int], Any]) -> dict[str, Any]:
    """`score_record` of one prediction (its assistant parts; None: missing) against a ground-truth record."""
    from duetgen.data.record import TextPart

    texts = [p.text for m in truth.messages if m.role == "assistant" for p in m.content if isinstance(p, TextPart)]
    return score_record(Task.from_meta(truth.meta, truth.id), texts, output, open_output_image)


def _find_description(text: str) -> Scene:
    """The first ``The canvas has ... .`` / ``The canvas is empty.`` sentence in a text, parsed."""
    text = " ".join(text.split())
    m = re.search(r"The canvas (has .+?\.|is empty\.)(?=\s|$)", text)
    if not m:
        raise WorldError(f"no canvas description in {text[:200]!r}")
    return parse_description(m[0])


# =============================================================================================
# Scoring a prediction dataset against a truth dataset
# =============================================================================================
def evaluate(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Score every truth record; returns {"summary": {kind: {metric: mean, n, missing}}, "records": [...], ...}."""
    from duetgen.data.dataset import Dataset
    from duetgen.data.record import ImagePart, RecordError, TextPart
    from duetgen.progress import progress_bar

    truth_ds, pred_ds = Dataset(truth_dir), Dataset(pred_dir)
    preds: dict[str, Any] = {}
    for rec in pred_ds:  # records only; images are opened lazily, one record at a time
        if rec.id in preds:
            raise RecordError(f"{pred_dir}: prediction id {rec.id!r} appears twice")
        preds[rec.id] = [p for m in rec.messages if m.role == "assistant" for p in m.content]
    rows, truth_ids = [], set()
    with progress_bar(progress, len(truth_ds), "judging") as advance:
        for rec in truth_ds:
            truth = Task.from_meta(rec.meta, rec.id)
            truth_ids.add(rec.id)
            texts = [p.text for m in rec.messages if m.role == "assistant" for p in m.content
                     if isinstance(p, TextPart)]
            parts = preds.get(rec.id)
            images = [p for p in parts or [] if isinstance(p, ImagePart)]
            scores = score_record(truth, texts, parts,
                                  lambda i, images=images, rid=rec.id: pred_ds.open_image(images[i].path, rid))
            rows.append({"id": rec.id, "kind": truth.kind} | scores)
            advance()
    return {"summary": summarise(rows), "records": rows,
            "unexpected_predictions": sorted(set(preds) - truth_ids),
            "truth": str(truth_dir), "pred": str(pred_dir)}


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(values: list[float], seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean (records resampled with replacement, a fixed seed)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(BOOTSTRAP_RESAMPLES, len(v)))].mean(axis=1)
    return [float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))]


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind (and "all"): mean of each metric over the records that define it, its 95% bootstrap
    interval (``<metric>_ci``), n, missing."""
    groups = {k: [r for r in rows if r["kind"] == k] for k in KINDS}
    groups = {k: rs for k, rs in groups.items() if rs} | {"all": rows}
    out = {}
    for kind, rs in groups.items():
        s: dict[str, Any] = {"n": len(rs), "missing": sum(r["missing"] for r in rs)}
        for m in METRICS:
            vals = [r[m] for r in rs if r[m] is not None]
            s[m] = sum(vals) / len(vals) if vals else None
            s[f"{m}_ci"] = bootstrap_interval(vals) if vals else None
        out[kind] = s
    return out


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ShapeWorld judge: {report['pred']} vs {report['truth']}")
    table.add_column("kind", no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column("missing", justify="right", no_wrap=True)
    for m in METRICS:
        table.add_column(METRIC_LABELS[m], justify="right")
    for kind, s in report["summary"].items():
        if kind == "all":
            table.add_section()
        table.add_row(kind, str(s["n"]), str(s["missing"]),
                      *("-" if s[m] is None else f"{s[m]:.3f} [{s[m + '_ci'][0]:.2f}, {s[m + '_ci'][1]:.2f}]"
                        for m in METRICS))
    console = Console(width=None if sys.stdout.isatty() else 200)  # piped to a log: the whole table, not 80 columns
    console.print(table)
    if report["unexpected_predictions"]:
        console.print(f"{len(report['unexpected_predictions'])} prediction(s) have no truth record (ignored)")


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    from duetgen.data.dataset import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(report, indent=1) + "\n").encode("utf-8"))
