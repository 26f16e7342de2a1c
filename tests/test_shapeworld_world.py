"""ShapeWorld world model, wordings, records, splits and the generator (DESIGN section 9)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from duetgen.data.dataset import Dataset
from duetgen.data.record import ImagePart, TextPart
from duetgen.shapeworld import judge
from duetgen.shapeworld import world as tw
from duetgen.shapeworld.world import Operation, Piece, Scene, Task, WorldError


def P(colour, shape, position):
    return Piece(colour, shape, position)


# ----------------------------------------------------------------------------- rendering
def test_render_draws_the_spec_pixels_without_antialiasing():
    scene = Scene((P("red", "circle", "top left"), P("blue", "square", "center"), P("green", "triangle", "bottom")))
    im = tw.render(scene)
    assert im.size == (64, 64) and im.mode == "RGB"
    px = np.asarray(im)

    def at(x, y):
        return tuple(int(v) for v in px[y, x])

    red, blue, green, white = (220, 40, 40), (40, 90, 220), (40, 170, 70), (255, 255, 255)
    # circle: ellipse [5, 5, 19, 19] around (12, 12): extremes of the middle row/column in, box corners out
    assert at(12, 12) == red and at(5, 12) == red and at(19, 12) == red and at(12, 5) == red
    assert at(5, 5) == white and at(19, 19) == white and at(4, 12) == white and at(20, 12) == white
    # square: rectangle [25, 25, 39, 39] inclusive
    assert at(25, 25) == blue and at(39, 39) == blue and at(24, 32) == white and at(40, 32) == white
    # triangle (32, 45), (25, 59), (39, 59)
    assert at(32, 45) == green and at(31, 45) == white and at(25, 59) == green and at(39, 59) == green
    assert at(32, 44) == white and at(32, 60) == white
    # no anti-aliasing: only white and the used palette colours occur
    colours = {tuple(int(v) for v in c) for c in px.reshape(-1, 3)}
    assert colours == {white, red, blue, green}
    assert np.array_equal(np.asarray(tw.render(Scene())), np.full((64, 64, 3), 255, np.uint8))


def test_render_at_other_sizes_is_a_nearest_upscale():
    scene = Scene((P("orange", "triangle", "right"),))
    big = np.asarray(tw.render(scene, 128))
    assert big.shape == (128, 128, 3)
    assert np.array_equal(big[::2, ::2], np.asarray(tw.render(scene)))


# ----------------------------------------------------------------------------- wordings
def test_wordings_are_the_spec_sentences():
    howto = Task("how-to", Scene(), (Operation("place", "red", "circle", "top left"),
                                     Operation("place", "blue", "square", "center"),
                                     Operation("place", "green", "triangle", "bottom")))
    assert howto.prompt() == ("How do I arrange a red circle at the top left, a blue square in the center "
                              "and a green triangle at the bottom?")
    assert howto.answer_texts() == ["Step 1: Place the red circle at the top left.",
                                    "Step 2: Place the blue square in the center.",
                                    "Step 3: Place the green triangle at the bottom.", tw.CLOSING_SENTENCE]
    cont = Task("continuation", Scene((P("red", "circle", "left"),)),
                (Operation("place", "yellow", "circle", "top right"), Operation("remove", "red", "circle")))
    assert cont.prompt() == "Here is my canvas. How do I add a yellow circle at the top right, then remove the red circle?"
    t2i = Task("text-to-image", Scene(), (Operation("place", "purple", "square", "bottom"),))
    assert t2i.prompt() == "Draw a purple square at the bottom."
    assert t2i.answer_texts() == ["Here is a purple square at the bottom."]

    canvas = Scene((P("red", "circle", "top left"), P("blue", "square", "center"), P("green", "triangle", "bottom")))
    edits = {Operation("place", "yellow", "circle", "top right"): "Add a yellow circle at the top right.",
             Operation("remove", "red", "circle"): "Remove the red circle.",
             Operation("move", "blue", "square", "left"): "Move the blue square to the left.",
             Operation("recolour", "green", "triangle", new_colour="purple"): "Make the green triangle purple."}
    for op, prompt in edits.items():
        assert Task("editing", canvas, (op,)).prompt() == prompt
    assert Operation("place", "red", "circle", "top left").sentence() == "Place the red circle at the top left."
    assert Operation("remove", "red", "circle").sentence() == "Remove the red circle."
    assert Operation("move", "red", "circle", "center").sentence() == "Move the red circle to the center."
    assert Operation("recolour", "red", "circle", new_colour="blue").sentence() == "Make the red circle blue."
    assert Operation("move", "red", "circle", "top left").clause() == "move the red circle to the top left"
    assert Operation("recolour", "red", "circle", new_colour="blue").clause() == "make the red circle blue"

    two = Scene((P("blue", "square", "center"), P("red", "circle", "top left")))
    assert two.describe() == "The canvas has a red circle at the top left and a blue square in the center."
    assert canvas.describe() == ("The canvas has a red circle at the top left, a blue square in the center "
                                 "and a green triangle at the bottom.")
    assert Task("understanding", canvas).prompt() == "What is on my canvas?"
    phrases = [P("red", "circle", pos).phrase() for pos in tw.POSITIONS]
    assert phrases == ["a red circle " + p for p in (
        "at the top left", "at the top", "at the top right", "on the left", "in the center", "on the right",
        "at the bottom left", "at the bottom", "at the bottom right")]


def test_understanding_lists_pieces_in_reading_order():
    scene = Scene((P("red", "square", "bottom right"), P("blue", "circle", "right"), P("green", "circle", "top"),
                   P("yellow", "triangle", "left")))
    assert scene.describe() == ("The canvas has a green circle at the top, a yellow triangle on the left, "
                                "a blue circle on the right and a red square at the bottom right.")


# ----------------------------------------------------------------------------- validation
def test_scene_validation_names_the_problem():
    with pytest.raises(WorldError, match="at most 4"):
        Scene(tuple(P(c, "circle", pos) for c, pos in zip(tw.COLOURS, tw.POSITIONS)))
    with pytest.raises(WorldError, match="share a cell"):
        Scene((P("red", "circle", "top"), P("blue", "circle", "top")))
    with pytest.raises(WorldError, match="share colour and shape"):
        Scene((P("red", "circle", "top"), P("red", "circle", "left")))
    with pytest.raises(WorldError, match="unknown colour 'pink'"):
        P("pink", "circle", "top")
    with pytest.raises(WorldError, match="unknown position 'middle'"):
        P("red", "circle", "middle")


def test_operations_apply_and_refuse_what_the_spec_never_asks():
    s = Scene((P("red", "circle", "top left"), P("blue", "square", "center")))
    assert Operation("move", "red", "circle", "bottom").apply(s) == Scene((P("red", "circle", "bottom"), P("blue", "square", "center")))
    assert Operation("recolour", "blue", "square", new_colour="red").apply(s).find("red", "square").position == "center"
    assert Operation("remove", "red", "circle").apply(s) == Scene((P("blue", "square", "center"),))
    refused = [Operation("place", "green", "circle", "center"),  # cell taken
               Operation("place", "red", "circle", "bottom"),  # red circle exists
               Operation("remove", "green", "circle"),  # absent
               Operation("move", "red", "circle", "top left"),  # already there
               Operation("move", "red", "circle", "center"),  # taken
               Operation("recolour", "red", "circle", new_colour="red")]  # same colour
    for op in refused:
        with pytest.raises(WorldError):
            op.apply(s)
    s2 = Scene((P("red", "circle", "top"), P("blue", "circle", "left")))
    with pytest.raises(WorldError, match="already has a blue circle"):
        Operation("recolour", "red", "circle", new_colour="blue").apply(s2)
    full = Scene(tuple(P(c, "square", pos) for c, pos in zip(["red", "green", "blue", "yellow"], tw.POSITIONS)))
    with pytest.raises(WorldError, match="already holds 4"):
        Operation("place", "red", "circle", "bottom").apply(full)
    assert all(ops == [] for k, ops in tw.valid_operations(full).items() if k == "place")


# ----------------------------------------------------------------------------- records
def test_records_follow_the_documented_layout():
    rng = random.Random(3)
    for kind in tw.KINDS:
        task = tw.sample_task(kind, rng, "train")
        rec = task.record(f"toyworld-train-{kind}-000000", "train")
        user, assistant = rec.messages
        assert (user.role, assistant.role) == ("user", "assistant") and rec.source == "toyworld"
        scenes = task.scenes()
        if task.has_canvas:
            assert isinstance(user.content[0], ImagePart)
            assert np.array_equal(np.asarray(user.content[0].image), np.asarray(tw.render(scenes[0])))
        assert user.content[-1].text == task.prompt()
        parts = assistant.content
        if kind in ("how-to", "continuation"):
            n = len(task.operations)
            assert len(parts) == 2 * n + 1
            for k in range(n):
                assert parts[2 * k].text == f"Step {k + 1}: {task.operations[k].sentence()}"
                assert np.array_equal(np.asarray(parts[2 * k + 1].image), np.asarray(tw.render(scenes[k + 1])))
            assert parts[-1].text == tw.CLOSING_SENTENCE
        elif kind in ("text-to-image", "editing"):
            assert [type(p) for p in parts] == [TextPart, ImagePart]
        elif kind == "understanding":
            assert [p.text for p in parts] == [scenes[0].describe()]
        else:
            assert [type(p) for p in parts] == [ImagePart] and user.content[-1].text == task.operations[0].sentence()
        assert rec.meta["kind"] == kind and rec.meta["split"] == "train"
        assert rec.meta["scenes"] == [s.to_json() for s in scenes]
        assert Task.from_meta(rec.meta) == task


def test_from_meta_rejects_inconsistent_ground_truth():
    task = Task("editing", Scene((P("red", "circle", "top"),)), (Operation("move", "red", "circle", "left"),))
    meta = task.record("r", "train").meta
    meta["scenes"][1] = [{"colour": "red", "shape": "circle", "position": "right"}]
    with pytest.raises(WorldError, match="do not follow"):
        Task.from_meta(meta, "r")
    with pytest.raises(WorldError, match="record 'r'"):
        Task.from_meta({"kind": "editing"}, "r")


# ----------------------------------------------------------------------------- parsing
def test_parse_prompt_recovers_every_sampled_task_from_text_and_canvas_image():
    rng = random.Random(11)
    for i in range(60):
        kind = tw.KINDS[i % len(tw.KINDS)]
        task = tw.sample_task(kind, rng, tw.SPLITS[i % 3])
        canvas = tw.render(task.initial, size=96) if task.has_canvas else None  # read back by the judge
        assert judge.parse_prompt(task.prompt(), canvas, kind=kind) == task
        guessed = judge.parse_prompt(task.prompt(), canvas)
        if kind == "transition" and task.operations[0].op != "place":
            assert guessed.kind == "editing"  # documented: the same words as an editing prompt
        else:
            assert guessed == task
        for text in task.answer_texts():
            if text.startswith("Step "):
                assert judge.parse_sentence(text.split(": ", 1)[1]) in task.operations
        if kind == "understanding":
            assert judge.parse_description(task.answer_texts()[0]) == task.initial


def test_parse_accepts_an_and_rejects_nonsense():
    assert judge.parse_piece_phrase("an orange circle on the left") == P("orange", "circle", "left")
    task = judge.parse_prompt("How do I arrange a red circle at the top and an orange square in the center?")
    assert [op.name for op in task.operations] == ["red circle", "orange square"]
    with pytest.raises(WorldError, match="not a ShapeWorld prompt"):
        judge.parse_prompt("How do I bathe a cat")
    with pytest.raises(WorldError, match="piece phrase"):
        judge.parse_prompt("Draw a pink circle at the top.")
    with pytest.raises(WorldError, match="none was given"):
        judge.parse_prompt("What is on my canvas?")
    with pytest.raises(WorldError, match="not a how-to prompt|is a text-to-image prompt"):
        judge.parse_prompt("Draw a red circle at the top.", kind="how-to")
    with pytest.raises(WorldError, match="no red circle"):  # the canvas decides validity
        judge.parse_prompt("Remove the red circle.", Scene((P("blue", "circle", "top"),)))


# ----------------------------------------------------------------------------- sampling and splits
def test_sampled_tasks_respect_counts_and_their_split():
    rng = random.Random(5)
    counts = {"how-to": (2, 4), "continuation": (1, 3), "text-to-image": (1, 1), "editing": (1, 1),
              "understanding": (0, 0), "transition": (1, 1)}
    for split in tw.SPLITS:
        for kind, (lo, hi) in counts.items():
            for _ in range(15):
                task = tw.sample_task(kind, rng, split)
                assert lo <= len(task.operations) <= hi
                assert task.splits() == {split}
                scenes = task.scenes()
                assert len(set(scenes)) == len(scenes)  # no step returns to a canvas already shown
                if kind == "understanding":
                    assert 1 <= len(task.initial) <= 4


def test_scene_split_is_a_fixed_partition_close_to_80_10_10():
    rng = random.Random(0)
    seen = {}
    for _ in range(3000):
        size = rng.randint(1, 4)
        positions = rng.sample(tw.POSITIONS, size)
        names = rng.sample([(c, s) for c in tw.COLOURS for s in tw.SHAPES], size)
        scene = Scene(tuple(Piece(c, s, p) for (c, s), p in zip(names, positions)))
        seen[scene] = scene.split()
        # the key is order-free: the same object set listed differently is the same scene
        assert Scene(tuple(reversed(scene.pieces))).split() == seen[scene]
    frac = {s: sum(v == s for v in seen.values()) / len(seen) for s in tw.SPLITS}
    assert 0.76 < frac["train"] < 0.84 and 0.07 < frac["val"] < 0.13 and 0.07 < frac["test"] < 0.13
    assert Scene().split() is None


def _scenes_of(ds: Dataset, read_images: bool) -> set[str]:
    """Every non-empty scene a dataset shows: from meta, and (optionally) read back from the images."""
    from duetgen.shapeworld.judge import read_scene

    keys = set()
    for rec in ds:
        for s in rec.meta["scenes"]:
            scene = Scene.from_json(s)
            if scene.pieces:
                keys.add(scene.key())
        if read_images:
            for part in rec.image_parts():
                scene = read_scene(ds.open_image(part.path, rec.id))
                if scene.pieces:
                    assert scene.key() in keys, f"{rec.id}: an image shows a scene its meta does not list"
    return keys


def test_no_scene_of_a_test_record_appears_in_a_train_record(tmp_path):
    counts = {}
    for split, seed, n in (("train", 0, 400), ("val", 1, 120), ("test", 2, 120)):
        counts[split] = tw.generate(tmp_path / split, n, seed=seed, split=split, progress=False)
    train, val, test = (_scenes_of(Dataset(tmp_path / s), read_images=s != "train") for s in tw.SPLITS)
    assert len(train) > 600 and len(test) > 150  # enough scenes for the claim to mean something
    assert not train & test and not train & val and not val & test
    for split in tw.SPLITS:
        for rec in Dataset(tmp_path / split):
            assert rec.meta["split"] == split and rec.id.startswith(f"toyworld-{split}-{rec.meta['kind']}-")


# ----------------------------------------------------------------------------- generator
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".writer.lock")}


def test_generate_is_deterministic_and_seeded(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        tw.generate(tmp_path / name, 40, seed=seed, split="val", shard_size=15, progress=False)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b and a != c
    assert sum(k.startswith("shards/") for k in a) == 3
    tw.generate(tmp_path / "short", 25, seed=7, split="val", progress=False)  # a prefix of the same stream
    assert [r.to_json() for r in Dataset(tmp_path / "short")] == [r.to_json() for r in Dataset(tmp_path / "a")][:25]
    ma, mb = (Dataset(tmp_path / n).manifest for n in "ab")
    drop = ("created", "updated")
    assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}


def test_generate_kinds_mix_and_ids(tmp_path):
    counts = tw.generate(tmp_path / "d", 30, seed=1, kinds=["editing", "understanding"], progress=False)
    assert set(counts) == {"editing", "understanding"} and sum(counts.values()) == 30
    ids = [rec.id for rec in Dataset(tmp_path / "d")]
    assert len(set(ids)) == 30 and all(i.split("-")[-1].isdigit() for i in ids)
    counts = tw.generate(tmp_path / "e", 20, seed=1, kinds=["how-to", "editing"], mix={"how-to": 1.0}, progress=False)
    assert counts == {"how-to": 20, "editing": 0}
    with pytest.raises(WorldError, match="unknown task kind 'cooking'"):
        tw.generate(tmp_path / "f", 5, kinds=["cooking"], progress=False)
    with pytest.raises(WorldError, match="zero weight"):
        tw.generate(tmp_path / "g", 5, kinds=["editing"], mix={"how-to": 1.0}, progress=False)
    with pytest.raises(WorldError, match="unknown split"):
        tw.generate(tmp_path / "h", 5, split="dev", progress=False)


def test_cli_data_toyworld(tmp_path):
    from typer.testing import CliRunner

    from duetgen.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["data", "toyworld", "--out", str(tmp_path / "d"), "--n", "12", "--seed", "3",
                              "--split", "test", "--kinds", "how-to,transition"])
    assert res.exit_code == 0, res.output
    ds = Dataset(tmp_path / "d")
    assert len(ds) == 12 and {r.meta["kind"] for r in ds} <= {"how-to", "transition"}
    res = runner.invoke(app, ["data", "toyworld", "--out", str(tmp_path / "x"), "--n", "3", "--split", "dev"])
    assert res.exit_code == 2 and "--split 'dev'" in res.output
    res = runner.invoke(app, ["data", "toyworld", "--out", str(tmp_path / "x"), "--n", "3", "--kinds", "how-to,poems"])
    assert res.exit_code == 2 and "'poems'" in res.output
    res = runner.invoke(app, ["data", "toyworld", "--out", str(tmp_path / "d"), "--n", "3"])
    assert res.exit_code == 2 and "exists and is not an empty folder; this writes a new dataset" in res.output


def test_a_generation_that_fails_midway_leaves_no_dataset(tmp_path, monkeypatch):
    """An audit: a SIGKILLed `data toyworld` left a valid-looking 2,100-record dataset of the 50,000 asked,
    which export and training took silently."""
    from duetgen.shapeworld import world

    real, calls = world.sample_task, []

    def failing(kind, rng, split):
        calls.append(kind)
        if len(calls) == 7:
            raise KeyboardInterrupt  # (Ctrl-C; a SIGKILL leaves only the hidden build folder, removed next run)
        return real(kind, rng, split)

    monkeypatch.setattr(world, "sample_task", failing)
    with pytest.raises(KeyboardInterrupt):
        world.generate(tmp_path / "d", 20, shard_size=2, progress=False)
    assert not (tmp_path / "d").exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(world, "sample_task", real)
    world.generate(tmp_path / "d", 20, shard_size=2, progress=False)
    assert len(Dataset(tmp_path / "d")) == 20
