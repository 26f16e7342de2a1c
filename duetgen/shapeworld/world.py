"""ShapeWorld: a procedural toy world in which every DuetGen capability trains on a CPU and is judged exactly.

The world is DESIGN section 9, followed literally (other parties build prompts and canvases from
that spec): a 64x64 white canvas, a 3x3 grid with cell centres {12, 32, 52}, filled circles, squares
and triangles of half-size 7 in six colours, at most one piece per cell, at most four per canvas,
and never two pieces sharing both colour and shape.

Design choices:
- A ``Task`` (kind, initial scene, operations) is the one ground truth. Its prompt, its answer,
  its record and its scene trajectory are all derived from it, and the judge's ``parse_prompt``
  (duetgen.shapeworld.judge) turns a prompt (plus the canvas) back into the same ``Task``, so generator
  and parser are tested against each other.
- Fixed wordings this module chooses where the spec is silent (docs/shapeworld.md lists them):
  closing sentence ``Your canvas is done.``; text-to-image answer ``Here is a <colour> <shape> <place>.``;
  editing answers ``Here is your canvas with a yellow circle added at the top right.`` /
  ``... with the red circle removed.`` / ``... with the blue square moved to the left.`` /
  ``... with the green triangle made purple.``; an empty canvas is described as ``The canvas is empty.``
- The indefinite article is always ``a`` (``a orange circle``), as the spec's templates write
  ``a <colour> <shape>``; the parsers also accept ``an``.
- Record layout: user turns put the canvas image before the text; the assistant turn interleaves
  ``Step k: <sentence>`` text parts with the canvas after that step, then the closing sentence.
  A transition record (stage-2 alignment) is user: [canvas before, step sentence], assistant:
  [canvas after]. ``meta`` holds kind, split, every scene of the trajectory and the operations.
- Splits are a property of scenes, not of records: a non-empty scene's canonical key is hashed to
  train (80%) / val (10%) / test (10%), seed-independently. A record belongs to a split only if every
  non-empty scene it shows hashes there, and the sampler only proposes such scenes, so no scene of a
  test record ever appears in a train record, whatever seeds generated them. The empty canvas carries
  no combination and is shared by all splits.
- Determinism: record ``i`` is drawn from its own ``random.Random("shapeworld:<seed>:<split>:<i>")``
  (string seeds are hashed with SHA-512 by ``random``, so this is stable across processes and
  Python hash seeds); candidate lists are always built in the fixed vocabulary order.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

# ----------------------------------------------------------------------------- the world (DESIGN 9)
CANVAS_SIZE = 64
CELL_CENTRES = (12, 32, 52)  # x (columns) and y (rows) of the 3x3 grid
HALF_SIZE = 7  # every shape spans [c - 7, c + 7] on both axes
BACKGROUND = (255, 255, 255)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PLACE_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220),
    "yellow": (235, 200, 40), "purple": (150, 70, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
MAX_PIECES = 4
OPS = ("place", "remove", "move", "recolour")

# ----------------------------------------------------------------------------- tasks and wordings
KINDS = ("how-to", "continuation", "text-to-image", "editing", "understanding", "transition")
# Interleaved kinds (what stage 1 and the benchmark are about) get half the records; transitions
# feed stage 2's image generator; understanding keeps the MLLM reading canvases.
DEFAULT_MIX = {"how-to": 0.25, "continuation": 0.25, "text-to-image": 0.10,
               "editing": 0.15, "understanding": 0.10, "transition": 0.15}
CLOSING_SENTENCE = "Your canvas is done."
UNDERSTANDING_QUESTION = "What is on my canvas?"
EMPTY_DESCRIPTION = "The canvas is empty."
CANVAS_PREFIX = "Here is my canvas."
WORLD_VERSION = 1
SOURCE = "toyworld"

# ----------------------------------------------------------------------------- splits
SPLITS = ("train", "val", "test")
SPLIT_BOUNDS = (0.8, 0.9)  # scene-hash quantile < 0.8 -> train, < 0.9 -> val, else test
MAX_SAMPLING_TRIES = 1000  # a task that cannot be drawn in a split this often is a bug, not bad luck


class WorldError(ValueError):
    """A piece, scene, operation or ShapeWorld text is invalid. The message names the input."""


# =============================================================================================
# Pieces and scenes
# =============================================================================================
@dataclass(frozen=True)
class Piece:
    """One object on the canvas: a filled shape of one colour in one grid cell."""

    colour: str
    shape: str
    position: str

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise WorldError(f"unknown colour {self.colour!r} (expected one of {list(COLOURS)})")
        if self.shape not in SHAPES:
            raise WorldError(f"unknown shape {self.shape!r} (expected one of {list(SHAPES)})")
        if self.position not in POSITIONS:
            raise WorldError(f"unknown position {self.position!r} (expected one of {list(POSITIONS)})")

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[int, int]:
        row, col = divmod(POSITIONS.index(self.position), 3)
        return CELL_CENTRES[col], CELL_CENTRES[row]

    def phrase(self) -> str:
        """``a red circle at the top left`` (how-to prompt item, understanding answer item)."""
        return f"a {self.name} {PLACE_PHRASES[self.position]}"

    def to_json(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "position": self.position}

    @classmethod
    def from_json(cls, d: Any) -> "Piece":
        if not isinstance(d, dict) or set(d) != {"colour", "shape", "position"}:
            raise WorldError(f"a piece must be {{'colour', 'shape', 'position'}}, got {d!r}")
        return cls(d["colour"], d["shape"], d["position"])


def reading_order(piece: Piece) -> int:
    """Rows top to bottom, then left to right: the index of the position in POSITIONS."""
    return POSITIONS.index(piece.position)


@dataclass(frozen=True)
class Scene:
    """A valid canvas: pieces in reading order, <= 4, one per cell, unique colour + shape."""

    pieces: tuple[Piece, ...] = ()

    def __post_init__(self):
        pieces = tuple(sorted(self.pieces, key=reading_order))
        object.__setattr__(self, "pieces", pieces)
        if len(pieces) > MAX_PIECES:
            raise WorldError(f"a scene holds at most {MAX_PIECES} pieces, got {len(pieces)}: {self.key()}")
        positions = [p.position for p in pieces]
        if len(set(positions)) != len(positions):
            raise WorldError(f"two pieces share a cell: {self.key()}")
        names = [p.name for p in pieces]
        if len(set(names)) != len(names):
            raise WorldError(f"two pieces share colour and shape: {self.key()}")

    @classmethod
    def of(cls, pieces: Iterable[Piece]) -> "Scene":
        return cls(tuple(pieces))

    def __len__(self) -> int:
        return len(self.pieces)

    def find(self, colour: str, shape: str) -> Piece | None:
        return next((p for p in self.pieces if p.colour == colour and p.shape == shape), None)

    def at(self, position: str) -> Piece | None:
        return next((p for p in self.pieces if p.position == position), None)

    def free_positions(self) -> list[str]:
        used = {p.position for p in self.pieces}
        return [pos for pos in POSITIONS if pos not in used]

    def key(self) -> str:
        """Canonical text of the object set, e.g. ``red circle@top left;blue square@center``."""
        return ";".join(f"{p.name}@{p.position}" for p in self.pieces)

    def split(self) -> str | None:
        """The split this scene belongs to (seed-independent), or None for the shared empty canvas."""
        if not self.pieces:
            return None
        digest = hashlib.sha256(f"shapeworld-v{WORLD_VERSION}:{self.key()}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        return SPLITS[sum(u >= b for b in SPLIT_BOUNDS)]

    def describe(self) -> str:
        """The understanding answer: ``The canvas has a red circle at the top left and a blue square in the center.``"""
        if not self.pieces:
            return EMPTY_DESCRIPTION
        return f"The canvas has {join_phrases([p.phrase() for p in self.pieces])}."

    def triples(self) -> set[tuple[str, str, str]]:
        return {(p.colour, p.shape, p.position) for p in self.pieces}

    def to_json(self) -> list[dict[str, str]]:
        return [p.to_json() for p in self.pieces]

    @classmethod
    def from_json(cls, d: Any) -> "Scene":
        if not isinstance(d, list):
            raise WorldError(f"a scene must be a list of pieces, got {type(d).__name__}")
        return cls(tuple(Piece.from_json(p) for p in d))


def join_phrases(items: Sequence[str]) -> str:
    """``a``; ``a and b``; ``a, b and c`` (no Oxford comma, as in the spec's how-to prompt)."""
    if not items:
        raise WorldError("nothing to join")
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


# =============================================================================================
# Operations
# =============================================================================================
@dataclass(frozen=True)
class Operation:
    """place (a new piece), remove, move (to ``position``) or recolour (to ``new_colour``) a piece."""

    op: str
    colour: str
    shape: str
    position: str | None = None  # place: the cell; move: the target cell
    new_colour: str | None = None  # recolour only

    def __post_init__(self):
        if self.op not in OPS:
            raise WorldError(f"unknown operation {self.op!r} (expected one of {list(OPS)})")
        if self.colour not in COLOURS:
            raise WorldError(f"operation {self.op!r}: unknown colour {self.colour!r}")
        if self.shape not in SHAPES:
            raise WorldError(f"operation {self.op!r}: unknown shape {self.shape!r}")
        needs_position = self.op in ("place", "move")
        if needs_position != (self.position is not None) or (needs_position and self.position not in POSITIONS):
            raise WorldError(f"operation {self.op!r}: bad position {self.position!r}")
        if (self.op == "recolour") != (self.new_colour is not None) or (
                self.new_colour is not None and self.new_colour not in COLOURS):
            raise WorldError(f"operation {self.op!r}: bad new colour {self.new_colour!r}")

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    # ------------------------------------------------------------------------- wordings
    def sentence(self) -> str:
        """The step sentence: ``Place the red circle at the top left.``, ``Remove the red circle.``, ..."""
        if self.op == "place":
            return f"Place the {self.name} {PLACE_PHRASES[self.position]}."
        if self.op == "remove":
            return f"Remove the {self.name}."
        if self.op == "move":
            return f"Move the {self.name} to the {self.position}."
        return f"Make the {self.name} {self.new_colour}."

    def clause(self) -> str:
        """The prompt clause: ``add a yellow circle at the top right``, ``remove the red circle``, ..."""
        if self.op == "place":
            return f"add a {self.name} {PLACE_PHRASES[self.position]}"
        if self.op == "remove":
            return f"remove the {self.name}"
        if self.op == "move":
            return f"move the {self.name} to the {self.position}"
        return f"make the {self.name} {self.new_colour}"

    def edit_prompt(self) -> str:
        """The one-sentence editing prompt: ``Add a yellow circle at the top right.``"""
        c = self.clause()
        return c[0].upper() + c[1:] + "."

    def edit_answer(self) -> str:
        """The one-sentence editing answer (this module's choice; see the module docstring)."""
        if self.op == "place":
            return f"Here is your canvas with a {self.name} added {PLACE_PHRASES[self.position]}."
        if self.op == "remove":
            return f"Here is your canvas with the {self.name} removed."
        if self.op == "move":
            return f"Here is your canvas with the {self.name} moved to the {self.position}."
        return f"Here is your canvas with the {self.name} made {self.new_colour}."

    # ------------------------------------------------------------------------- semantics
    def apply(self, scene: Scene) -> Scene:
        """The scene after this operation. Raises WorldError if the spec would never ask it."""
        target = scene.find(self.colour, self.shape)
        if self.op == "place":
            if target is not None:
                raise WorldError(f"{self.sentence()!r}: the canvas already has a {self.name}")
            if scene.at(self.position) is not None:
                raise WorldError(f"{self.sentence()!r}: the {self.position} cell is taken")
            if len(scene) >= MAX_PIECES:
                raise WorldError(f"{self.sentence()!r}: the canvas already holds {MAX_PIECES} pieces")
            return Scene(scene.pieces + (Piece(self.colour, self.shape, self.position),))
        if target is None:
            raise WorldError(f"{self.sentence()!r}: the canvas has no {self.name}")
        rest = tuple(p for p in scene.pieces if p is not target)
        if self.op == "remove":
            return Scene(rest)
        if self.op == "move":
            if self.position == target.position:
                raise WorldError(f"{self.sentence()!r}: the {self.name} is already there")
            if scene.at(self.position) is not None:
                raise WorldError(f"{self.sentence()!r}: the {self.position} cell is taken")
            return Scene(rest + (Piece(self.colour, self.shape, self.position),))
        if self.new_colour == self.colour:
            raise WorldError(f"{self.sentence()!r}: the {self.name} is already {self.colour}")
        if scene.find(self.new_colour, self.shape) is not None:
            raise WorldError(f"{self.sentence()!r}: the canvas already has a {self.new_colour} {self.shape}")
        return Scene(rest + (Piece(self.new_colour, self.shape, target.position),))

    def touched_positions(self, scene: Scene) -> set[str]:
        """Cells this operation changes on ``scene`` (everything else must stay as it was)."""
        if self.op == "place":
            return {self.position}
        target = scene.find(self.colour, self.shape)
        if target is None:
            raise WorldError(f"{self.sentence()!r}: the canvas has no {self.name}")
        return {target.position, self.position} if self.op == "move" else {target.position}

    def to_json(self) -> dict[str, str]:
        d = {"op": self.op, "colour": self.colour, "shape": self.shape}
        if self.position is not None:
            d["position"] = self.position
        if self.new_colour is not None:
            d["new_colour"] = self.new_colour
        return d

    @classmethod
    def from_json(cls, d: Any) -> "Operation":
        if not isinstance(d, dict) or not {"op", "colour", "shape"} <= set(d) <= {
                "op", "colour", "shape", "position", "new_colour"}:
            raise WorldError(f"an operation must be {{'op', 'colour', 'shape'[, 'position'][, 'new_colour']}}, got {d!r}")
        return cls(d["op"], d["colour"], d["shape"], d.get("position"), d.get("new_colour"))


def valid_operations(scene: Scene) -> dict[str, list[Operation]]:
    """Every operation the spec may ask on ``scene``, per kind, in fixed vocabulary order."""
    names = {p.name for p in scene.pieces}
    free = scene.free_positions()
    out: dict[str, list[Operation]] = {op: [] for op in OPS}
    if len(scene) < MAX_PIECES:
        out["place"] = [Operation("place", c, s, pos) for pos in free for c in COLOURS for s in SHAPES
                        if f"{c} {s}" not in names]
    for p in scene.pieces:
        out["remove"].append(Operation("remove", p.colour, p.shape))
        out["move"] += [Operation("move", p.colour, p.shape, pos) for pos in free]
        out["recolour"] += [Operation("recolour", p.colour, p.shape, new_colour=c) for c in COLOURS
                            if c != p.colour and f"{c} {p.shape}" not in names]
    return out


# =============================================================================================
# Rendering
# =============================================================================================
def render(scene: Scene, size: int = CANVAS_SIZE):
    """The canvas as a PIL RGB image, drawn with ImageDraw exactly as DESIGN 9 specifies.

    ImageDraw fills without anti-aliasing, so every pixel is white or exactly a palette colour.
    ``size`` other than 64 draws at 64 and scales up with NEAREST (still palette-exact).
    """
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (CANVAS_SIZE, CANVAS_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(im)
    r = HALF_SIZE
    for p in scene.pieces:
        cx, cy = p.centre
        fill = COLOURS[p.colour]
        if p.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif p.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if size != CANVAS_SIZE:
        im = im.resize((size, size), Image.NEAREST)
    return im


# =============================================================================================
# Tasks: prompt, answer, record
# =============================================================================================
def howto_prompt(pieces: Sequence[Piece]) -> str:
    return f"How do I arrange {join_phrases([p.phrase() for p in pieces])}?"


def continuation_prompt(operations: Sequence[Operation]) -> str:
    return f"{CANVAS_PREFIX} How do I {', then '.join(op.clause() for op in operations)}?"


def text_to_image_prompt(piece: Piece) -> str:
    return f"Draw {piece.phrase()}."


def text_to_image_answer(piece: Piece) -> str:
    return f"Here is {piece.phrase()}."


def step_line(k: int, op: Operation) -> str:
    return f"Step {k}: {op.sentence()}"


@dataclass(frozen=True)
class Task:
    """One task instance: everything else (prompt, answer, record, scenes) is derived from it."""

    kind: str
    initial: Scene = field(default_factory=Scene)
    operations: tuple[Operation, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise WorldError(f"unknown task kind {self.kind!r} (expected one of {list(KINDS)})")
        n = len(self.operations)
        allowed = {"how-to": (2, 4), "continuation": (1, 3), "text-to-image": (1, 1), "editing": (1, 1),
                   "understanding": (0, 0), "transition": (1, 1)}[self.kind]
        if not allowed[0] <= n <= allowed[1]:
            raise WorldError(f"a {self.kind} task has {allowed[0]}-{allowed[1]} operations, got {n}")
        if self.kind in ("how-to", "text-to-image"):
            if self.initial.pieces:
                raise WorldError(f"a {self.kind} task starts from the empty canvas")
            if any(op.op != "place" for op in self.operations):
                raise WorldError(f"a {self.kind} task only places pieces")
        self.scenes()  # every operation must be valid on the scene it applies to

    def scenes(self) -> list[Scene]:
        """[initial, after step 1, ..., after step n]."""
        out = [self.initial]
        for op in self.operations:
            out.append(op.apply(out[-1]))
        return out

    @property
    def has_canvas(self) -> bool:
        """Whether the user turn shows the initial canvas."""
        return self.kind in ("continuation", "editing", "understanding", "transition")

    def prompt(self) -> str:
        if self.kind == "how-to":
            return howto_prompt([Piece(op.colour, op.shape, op.position) for op in self.operations])
        if self.kind == "continuation":
            return continuation_prompt(self.operations)
        if self.kind == "text-to-image":
            op = self.operations[0]
            return text_to_image_prompt(Piece(op.colour, op.shape, op.position))
        if self.kind == "editing":
            return self.operations[0].edit_prompt()
        if self.kind == "understanding":
            return UNDERSTANDING_QUESTION
        return self.operations[0].sentence()  # transition: the step sentence itself

    def answer_texts(self) -> list[str]:
        """The assistant's text parts, in order (images go after each step / single sentence)."""
        if self.kind in ("how-to", "continuation"):
            return [step_line(k, op) for k, op in enumerate(self.operations, 1)] + [CLOSING_SENTENCE]
        if self.kind == "text-to-image":
            op = self.operations[0]
            return [text_to_image_answer(Piece(op.colour, op.shape, op.position))]
        if self.kind == "editing":
            return [self.operations[0].edit_answer()]
        if self.kind == "understanding":
            return [self.initial.describe()]
        return []  # transition: the answer is the image alone

    def record(self, record_id: str, split: str | None = None):
        """The task as a ``Record`` whose image parts hold PIL images (a DatasetWriter stores them)."""
        from duetgen.data.record import ImagePart, Message, Record, TextPart

        scenes = self.scenes()
        user = [ImagePart(render(self.initial))] if self.has_canvas else []
        user.append(TextPart(self.prompt()))
        texts = self.answer_texts()
        assistant: list = []
        if self.kind in ("how-to", "continuation"):
            for k in range(len(self.operations)):
                assistant += [TextPart(texts[k]), ImagePart(render(scenes[k + 1]))]
            assistant.append(TextPart(texts[-1]))
        elif self.kind in ("text-to-image", "editing"):
            assistant = [TextPart(texts[0]), ImagePart(render(scenes[1]))]
        elif self.kind == "understanding":
            assistant = [TextPart(texts[0])]
        else:
            assistant = [ImagePart(render(scenes[1]))]
        meta = {"kind": self.kind, "split": split, "world_version": WORLD_VERSION,
                "scenes": [s.to_json() for s in scenes], "operations": [op.to_json() for op in self.operations]}
        return Record(id=record_id, source=SOURCE, meta=meta,
                      messages=[Message("user", user), Message("assistant", assistant)])

    @classmethod
    def from_meta(cls, meta: Any, record_id: str = "?") -> "Task":
        """The ground truth stored in a record's meta (checked against its own scene list)."""
        try:
            task = cls(meta["kind"], Scene.from_json(meta["scenes"][0]),
                       tuple(Operation.from_json(o) for o in meta["operations"]))
            stored = [Scene.from_json(s) for s in meta["scenes"]]
        except (KeyError, IndexError, TypeError) as e:
            raise WorldError(f"record {record_id!r}: meta is not a ShapeWorld task ({type(e).__name__}: {e})") from None
        except WorldError as e:
            raise WorldError(f"record {record_id!r}: meta: {e}") from None
        if stored != task.scenes():
            raise WorldError(f"record {record_id!r}: meta scenes do not follow from its operations")
        return task

    def splits(self) -> set[str]:
        """Splits selected by the non-empty scenes this task shows (one element for a valid record)."""
        return {s.split() for s in self.scenes() if s.pieces}


# =============================================================================================
# Sampling (every scene of a drawn task hashes to the requested split)
# =============================================================================================
def _in_split(scene: Scene, split: str) -> bool:
    return not scene.pieces or scene.split() == split


def _random_scene(rng: random.Random, size: int, split: str) -> Scene:
    for _ in range(MAX_SAMPLING_TRIES):
        positions = rng.sample(POSITIONS, size)
        names = rng.sample([(c, s) for c in COLOURS for s in SHAPES], size)
        scene = Scene(tuple(Piece(c, s, pos) for (c, s), pos in zip(names, positions)))
        if _in_split(scene, split):
            return scene
    raise WorldError(f"could not draw a {size}-piece scene in split {split!r}")


def _next_operation(rng: random.Random, scene: Scene, split: str, seen: set[Scene],
                    only_place: bool = False) -> Operation | None:
    """An operation kind uniformly among those with a candidate, then a candidate uniformly.

    Candidates must keep the split and lead to a scene this task has not shown yet (so no
    ``add X, then remove X`` round trips). Kinds and candidates are tried in a random order and
    the first that qualifies wins, which draws the same distribution as filtering all of them
    first at a tenth of the cost (about one candidate in ten lands in a small split).
    """
    by_kind = valid_operations(scene)
    kinds = ["place"] if only_place else list(OPS)
    rng.shuffle(kinds)
    for kind in kinds:
        ops = list(by_kind[kind])
        rng.shuffle(ops)
        for op in ops:
            nxt = op.apply(scene)
            if nxt not in seen and _in_split(nxt, split):
                return op
    return None


def _trajectory(rng: random.Random, initial: Scene, n_ops: int, split: str, only_place: bool = False):
    scene, seen, ops = initial, {initial}, []
    for _ in range(n_ops):
        op = _next_operation(rng, scene, split, seen, only_place)
        if op is None:
            return None
        scene = op.apply(scene)
        seen.add(scene)
        ops.append(op)
    return tuple(ops)


def sample_task(kind: str, rng: random.Random, split: str = "train") -> Task:
    """Draw one task of ``kind`` whose every non-empty scene belongs to ``split``."""
    if split not in SPLITS:
        raise WorldError(f"unknown split {split!r} (expected one of {list(SPLITS)})")
    if kind not in KINDS:
        raise WorldError(f"unknown task kind {kind!r} (expected one of {list(KINDS)})")
    for _ in range(MAX_SAMPLING_TRIES):
        if kind == "how-to":
            initial, n_ops, only_place = Scene(), rng.randint(2, 4), True
        elif kind == "text-to-image":
            initial, n_ops, only_place = Scene(), 1, True
        elif kind == "continuation":
            initial, n_ops, only_place = _random_scene(rng, rng.randint(1, 3), split), rng.randint(1, 3), False
        elif kind == "editing":
            initial, n_ops, only_place = _random_scene(rng, rng.randint(1, 4), split), 1, False
        elif kind == "understanding":
            return Task(kind, _random_scene(rng, rng.randint(1, MAX_PIECES), split))
        else:  # transition: the empty canvas is allowed, so stage 2 learns first placements too
            initial, n_ops, only_place = _random_scene(rng, rng.randint(0, MAX_PIECES), split), 1, False
        ops = _trajectory(rng, initial, n_ops, split, only_place)
        if ops is not None:
            return Task(kind, initial, ops)
    raise WorldError(f"could not draw a {kind} task in split {split!r}")


def record_id(split: str, kind: str, index: int) -> str:
    return f"{SOURCE}-{split}-{kind}-{index:06d}"


def task_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"shapeworld:{seed}:{split}:{index}")


def generate(out_dir: str | Path, n: int, seed: int = 0, split: str = "train",
             kinds: Sequence[str] | None = None, mix: dict[str, float] | None = None,
             shard_size: int = 1000, progress: bool = True, name: str | None = None) -> dict[str, int]:
    """Write ``n`` ShapeWorld records of ``split`` to a new dataset at ``out_dir``; return counts per kind.

    ``kinds`` restricts the kinds (default: all six, in that order); ``mix`` weights them (default
    DEFAULT_MIX, renormalised over ``kinds``). The same arguments, ``kinds`` in the same order, give the
    same records and image bytes. All or nothing: a killed run leaves no dataset (it takes seconds to
    start over), never a smaller one that looks whole.
    """
    from duetgen.data.dataset import DatasetWriter, building_new_dataset
    from duetgen.progress import progress_bar

    if not isinstance(n, int) or n < 0:
        raise WorldError(f"n must be a non-negative integer, got {n!r}")
    if split not in SPLITS:
        raise WorldError(f"unknown split {split!r} (expected one of {list(SPLITS)})")
    kinds = list(KINDS if kinds is None else kinds)
    for k in kinds:
        if k not in KINDS:
            raise WorldError(f"unknown task kind {k!r} (expected some of {list(KINDS)})")
    if not kinds:
        raise WorldError("kinds is empty")
    mix = dict(DEFAULT_MIX if mix is None else mix)
    for k, w in mix.items():
        if k not in KINDS or not isinstance(w, (int, float)) or w < 0:
            raise WorldError(f"mix entry {k!r}: {w!r} (keys must be task kinds, weights >= 0)")
    weights = [mix.get(k, 0.0) for k in kinds]
    if sum(weights) <= 0:
        raise WorldError(f"mix gives zero weight to every kind in {kinds}")

    counts = {k: 0 for k in kinds}
    with building_new_dataset(out_dir) as building, \
            DatasetWriter(building, shard_size=shard_size, name=name or f"shapeworld-{split}-seed{seed}") as writer, \
            progress_bar(progress, n, f"ShapeWorld {split}") as advance:
        for i in range(n):
            rng = task_rng(seed, split, i)
            kind = rng.choices(kinds, weights)[0]
            task = sample_task(kind, rng, split)
            writer.write(task.record(record_id(split, kind, i), split))
            counts[kind] += 1
            advance()
    return counts
