"""The exact ShapeWorld judge: canvas reading, metrics, and end-to-end corruption tests on disk."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from duetgen.data.dataset import Dataset, DatasetWriter
from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart
from duetgen.shapeworld import world as tw
from duetgen.shapeworld import judge
from duetgen.shapeworld.world import Piece, Scene, Task


def noisy(im: Image.Image, seed: int = 0, sigma: float = 10.0) -> Image.Image:
    a = np.asarray(im).astype(np.float32)
    a = a + np.random.default_rng(seed).normal(0.0, sigma, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def blurred(im: Image.Image) -> Image.Image:
    return im.filter(ImageFilter.BoxBlur(1))  # 3x3 mean


def scrambled(im: Image.Image, seed: int = 0) -> Image.Image:
    a = np.asarray(im).reshape(-1, 3)
    a = a[np.random.default_rng(seed).permutation(len(a))]
    return Image.fromarray(a.reshape(im.size[1], im.size[0], 3))


def random_scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [tw.sample_task("understanding", rng, tw.SPLITS[i % 3]).initial for i in range(n)]


# ----------------------------------------------------------------------------- reading canvases
def test_reads_every_piece_in_every_cell_exactly():
    for colour in tw.COLOURS:
        for shape in tw.SHAPES:
            for position in tw.POSITIONS:
                scene = Scene((Piece(colour, shape, position),))
                for size in (64, 160):
                    r = judge.read_canvas(tw.render(scene, size))
                    assert r.clean and r.scene() == scene, (scene.key(), size, r.problems)
                    assert r.stray_fraction == 0.0
                    # native size: pixel-exact; 2.5x NEAREST then BOX back to 64 shifts edges a little
                    assert r.pieces[0].confidence == 1.0 if size == 64 else r.pieces[0].confidence > 0.95
    assert judge.read_canvas(tw.render(Scene())).pieces == []


@pytest.mark.parametrize("name,transform", [
    ("noise sigma 10", lambda im, i: noisy(im, i)),
    ("3x3 blur", lambda im, i: blurred(im)),
    ("blur then noise", lambda im, i: noisy(blurred(im), i)),
    ("bilinear 100px", lambda im, i: im.resize((100, 100), Image.BILINEAR)),
    ("bilinear 48px", lambda im, i: im.resize((48, 48), Image.BILINEAR)),
    ("nearest 512px", lambda im, i: im.resize((512, 512), Image.NEAREST)),
])
def test_reading_survives_mild_degradation(name, transform):
    for i, scene in enumerate(random_scenes(40, seed=1)):
        r = judge.read_canvas(transform(tw.render(scene), i))
        assert r.clean, (name, scene.key(), r.problems)
        assert r.scene() == scene, (name, scene.key(), r.triples())
        assert min(p.confidence for p in r.pieces) >= 0.85


def test_reading_flags_what_is_not_a_clean_canvas():
    scene = Scene((Piece("red", "square", "top left"), Piece("blue", "triangle", "center")))
    assert not judge.read_canvas(scrambled(tw.render(scene))).clean
    # a grey smudge far from any piece: stray pixels
    a = np.asarray(tw.render(scene)).copy()
    a[50:60, 2:10] = (128, 128, 128)
    r = judge.read_canvas(Image.fromarray(a))
    assert not r.clean and r.stray_fraction > 0.01 and r.scene() == scene
    # half a square: read, but malformed
    a = np.asarray(tw.render(scene)).copy()
    a[5:20, 12:20] = 255
    r = judge.read_canvas(Image.fromarray(a))
    assert not r.clean and any("malformed" in p for p in r.problems)
    # a double-size circle: the right label (fill is size-free), but a poor likeness of the world's circle
    im = Image.new("RGB", (64, 64), "white")
    from PIL import ImageDraw
    ImageDraw.Draw(im).ellipse([17, 17, 47, 47], fill=tw.COLOURS["green"])
    r = judge.read_canvas(im)
    assert [p.shape for p in r.pieces] == ["circle"] and not r.clean
    # two pieces in one cell are not a scene
    im = tw.render(Scene((Piece("red", "circle", "center"),)))
    ImageDraw.Draw(im).rectangle([33, 33, 47, 47], fill=tw.COLOURS["blue"])  # centre (40, 40): still the center cell
    assert any("share a cell" in p for p in judge.read_canvas(im).problems)
    with pytest.raises(tw.WorldError, match="not read as a clean"):
        judge.read_scene(im)


# ----------------------------------------------------------------------------- metric pieces
def test_text_completeness_counts_required_sentences_in_order():
    req = ["Step 1: A.", "Step 2: B.", "Done."]
    assert judge.text_completeness(req, "Step 1: A.\nStep 2: B.\nDone.") == 1.0
    assert judge.text_completeness(req, "Step 1:   A.\n\nStep 2: B.  Done.") == 1.0  # whitespace-insensitive
    assert judge.text_completeness(req, "Step 1: A.\nDone.") == pytest.approx(2 / 3)
    assert judge.text_completeness(req, "Step 2: B.\nStep 1: A.\nDone.") == pytest.approx(2 / 3)  # order
    assert judge.text_completeness(req, "Done. Step 2: B. Step 1: A.") == pytest.approx(1 / 3)
    assert judge.text_completeness(req, "") == 0.0
    assert judge.text_completeness([], "anything") == 1.0


def test_image_completeness_and_jaccard():
    assert judge.image_completeness(3, 3) == 1.0 and judge.image_completeness(0, 0) == 1.0
    assert judge.image_completeness(3, 2) == pytest.approx(2 / 3)
    assert judge.image_completeness(3, 4) == pytest.approx(3 / 4)
    assert judge.image_completeness(0, 1) == 0.0 and judge.image_completeness(2, 0) == 0.0
    assert judge.jaccard(set(), set()) == 1.0 and judge.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def test_images_align_to_their_step_markers():
    T, I = TextPart, ImagePart
    parts = [T("Step 1: x"), I("a"), T("Step 3: z"), I("b"), I("c"), T("done")]
    assert judge.align_images(parts, 3, stepwise=True) == {1: 0, 3: 1}  # "c" is extra
    assert judge.align_images([I("a"), I("b")], 1, stepwise=False) == {1: 0}


# ----------------------------------------------------------------------------- end to end on disk
@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("judge") / "truth"
    counts = tw.generate(root, 48, seed=4, split="test", mix={k: 1.0 for k in tw.KINDS}, progress=False)
    assert min(counts.values()) >= 3, counts
    return root


def rewrite(truth: Path, out: Path, fn) -> Path:
    """Write a prediction dataset: each truth record's assistant parts (images as PIL) through ``fn``.

    ``fn(record, task, parts) -> parts`` (None drops the prediction). The user turn keeps its text.
    """
    ds = Dataset(truth)
    with DatasetWriter(out) as w:
        for rec in ds:
            parts = [ImagePart(ds.open_image(p.path, rec.id)) if isinstance(p, ImagePart) else TextPart(p.text)
                     for m in rec.messages if m.role == "assistant" for p in m.content]
            new = fn(rec, Task.from_meta(rec.meta, rec.id), parts)
            if new is None:
                continue
            user = Message("user", [TextPart(rec.messages[0].text)])
            w.write(Record(id=rec.id, source="prediction", messages=[user, Message("assistant", new)]))
    return out


def truth_steps(truth: Path) -> dict[str, int]:
    return {rec.id: len(rec.meta["operations"]) for rec in Dataset(truth)}


def rows(report) -> dict[str, dict]:
    return {r["id"]: r for r in report["records"]}


def run(truth, tmp_path, name, fn):
    return judge.evaluate(rewrite(truth, tmp_path / name, fn), truth, progress=False)


def images_of(parts):
    return [i for i, p in enumerate(parts) if isinstance(p, ImagePart)]


def map_images(fn):
    def apply(rec, task, parts):
        return [ImagePart(fn(p.image)) if isinstance(p, ImagePart) else p for p in parts]
    return apply


def assert_all_perfect(report):
    for kind, s in report["summary"].items():
        assert s["missing"] == 0
        for m in judge.METRICS:
            defined = kind == "all" or m in judge.defined_metrics(kind)
            assert (s[m] == 1.0) if defined else (s[m] is None), (kind, m, s[m])


def test_ground_truth_scores_one_on_every_metric(truth, tmp_path):
    report = judge.evaluate(truth, truth, progress=False)
    assert_all_perfect(report)
    assert report["summary"]["all"]["n"] == 48 and report["unexpected_predictions"] == []


@pytest.mark.parametrize("name,fn", [("noise", lambda im: noisy(im, zlib.crc32(im.tobytes()))),
                                     ("blur", blurred)])
def test_mild_noise_and_blur_keep_every_metric_at_one(truth, tmp_path, name, fn):
    assert_all_perfect(run(truth, tmp_path, name, map_images(fn)))


def _piece_mask(im: Image.Image, piece: Piece) -> np.ndarray:
    a = np.asarray(im)
    cx, cy = piece.centre
    mask = np.zeros(a.shape[:2], bool)
    box = (slice(cy - 7, cy + 8), slice(cx - 7, cx + 8))
    mask[box] = (a[box] == tw.COLOURS[piece.colour]).all(-1)
    assert mask.sum() > 100
    return mask


def recolour_piece(im, piece, colour):
    a = np.asarray(im).copy()
    a[_piece_mask(im, piece)] = tw.COLOURS[colour]
    return Image.fromarray(a)


def shift_piece(im, piece, position):
    a = np.asarray(im).copy()
    mask = _piece_mask(im, piece)
    a[mask] = 255
    (x0, y0), (x1, y1) = piece.centre, Piece(piece.colour, piece.shape, position).centre
    a[np.roll(np.roll(mask, y1 - y0, 0), x1 - x0, 1)] = tw.COLOURS[piece.colour]
    return Image.fromarray(a)


def test_wrong_colour_lowers_image_text_coherence(truth, tmp_path):
    def fn(rec, task, parts):
        if task.kind not in ("how-to", "text-to-image"):
            return parts
        last = task.scenes()[-1]
        piece = last.pieces[0]
        new = next(c for c in tw.COLOURS if c != piece.colour and last.find(c, piece.shape) is None)
        k = images_of(parts)[-1]
        parts[k] = ImagePart(recolour_piece(parts[k].image, piece, new))
        return parts

    report = run(truth, tmp_path, "colour", fn)
    for r in report["records"]:
        if r["kind"] in ("how-to", "text-to-image"):
            assert r["it_co"] < 1.0 and r["t_com"] == 1.0 and r["i_com"] == 1.0 and r["i_q"] == 1.0, r
            if r["kind"] == "text-to-image":
                assert r["it_co"] == 0.0 and r["i_co"] == 1.0  # the only piece is the one the step touched
        elif r["kind"] != "understanding":
            assert r["it_co"] == r["i_co"] == 1.0
    assert report["summary"]["how-to"]["it_co"] < 1.0 and report["summary"]["editing"]["it_co"] == 1.0


def test_shifted_shape_lowers_coherence(truth, tmp_path):
    touched = {}

    def fn(rec, task, parts):
        if task.kind != "how-to":
            return parts
        last = task.scenes()[-1]
        first = task.operations[0]  # placed at step 1, untouched by the last step
        piece = last.find(first.colour, first.shape)
        k = images_of(parts)[-1]
        parts[k] = ImagePart(shift_piece(parts[k].image, piece, last.free_positions()[0]))
        touched[rec.id] = len(task.operations)
        return parts

    report = run(truth, tmp_path, "shift", fn)
    got = rows(report)
    assert touched
    for rid, n in touched.items():
        r = got[rid]
        # the last image: one of n pieces moved -> IT-Co (n-1)/(n+1) there; I-Co loses it too
        assert r["it_co"] == pytest.approx(((n - 1) + (n - 1) / (n + 1)) / n)
        assert r["i_co"] < 1.0 and r["t_com"] == r["i_com"] == r["i_q"] == 1.0


def test_missing_and_extra_images_lower_image_completeness(truth, tmp_path):
    steps = {}

    def drop_last(rec, task, parts):
        if task.kind in ("how-to", "continuation"):
            steps[rec.id] = len(task.operations)
            del parts[images_of(parts)[-1]]
        return parts

    got = rows(run(truth, tmp_path, "missing", drop_last))
    for rid, n in steps.items():
        r = got[rid]
        assert r["i_com"] == pytest.approx((n - 1) / n), r
        assert r["t_com"] == 1.0
        # the images left still show their steps; with none left there is nothing to credit
        assert r["it_co"] == r["i_co"] == r["i_q"] == (1.0 if n > 1 else 0.0)
    assert any(n > 1 for n in steps.values())

    def add_one(rec, task, parts):
        if task.kind in ("how-to", "continuation", "editing", "understanding"):
            parts.append(ImagePart(tw.render(task.scenes()[-1])))
        return parts

    report = run(truth, tmp_path, "extra", add_one)
    n_steps = truth_steps(truth)
    for r in report["records"]:
        if r["kind"] in ("how-to", "continuation", "editing"):
            n = n_steps[r["id"]]
            assert r["i_com"] == pytest.approx(n / (n + 1)) and r["t_com"] == r["it_co"] == r["i_co"] == 1.0, r
        elif r["kind"] == "understanding":
            assert r["i_com"] == 0.0 and r["u_acc"] == 1.0
        else:
            assert r["i_com"] == 1.0


def test_dropped_step_text_lowers_text_completeness(truth, tmp_path):
    def fn(rec, task, parts):
        if task.kind in ("how-to", "continuation"):
            parts = [p for p in parts if not (isinstance(p, TextPart) and p.text.startswith("Step 1:"))]
        return parts

    report = run(truth, tmp_path, "text", fn)
    n_steps = truth_steps(truth)
    for r in report["records"]:
        if r["kind"] in ("how-to", "continuation"):
            n = n_steps[r["id"]]
            assert r["t_com"] == pytest.approx(n / (n + 1)) and r["i_com"] == r["i_q"] == 1.0, r
        elif r["kind"] != "transition":
            assert r["t_com"] == 1.0
    assert report["summary"]["how-to"]["t_com"] < 1.0 and report["summary"]["editing"]["t_com"] == 1.0


def test_scrambled_pixels_lower_image_quality(truth, tmp_path):
    def fn(rec, task, parts):
        if task.kind == "how-to":
            return [ImagePart(scrambled(p.image)) if isinstance(p, ImagePart) else p for p in parts]
        return parts

    report = run(truth, tmp_path, "scrambled", fn)
    assert report["summary"]["how-to"]["i_q"] == 0.0
    assert report["summary"]["how-to"]["t_com"] == 1.0 and report["summary"]["how-to"]["i_com"] == 1.0
    assert report["summary"]["editing"]["i_q"] == 1.0


def test_wrong_understanding_answer_lowers_accuracy(truth, tmp_path):
    def fn(rec, task, parts):
        if task.kind != "understanding":
            return parts
        if rec.id.endswith(("0", "2", "4", "6", "8")):  # a reworded but correct answer still counts
            return [TextPart("Sure! " + task.initial.describe().replace("The canvas has", "The canvas  has") + " Bye.")]
        p = task.initial.pieces[0]
        moved = tw.Operation("move", p.colour, p.shape, task.initial.free_positions()[0]).apply(task.initial)
        return [TextPart(moved.describe())]

    got = rows(run(truth, tmp_path, "understanding", fn))
    ids = [i for i, r in got.items() if r["kind"] == "understanding"]
    for i in ids:
        good = i.endswith(("0", "2", "4", "6", "8"))
        assert got[i]["u_acc"] == (1.0 if good else 0.0) and got[i]["t_com"] == (1.0 if good else 0.0)
    assert any(not i.endswith(("0", "2", "4", "6", "8")) for i in ids)


def test_missing_predictions_score_zero_and_are_counted(truth, tmp_path):
    dropped = set()

    def fn(rec, task, parts):
        if len(dropped) < 5 and task.kind in ("how-to", "understanding", "transition"):
            dropped.add(rec.id)
            return None
        return parts

    pred = rewrite(truth, tmp_path / "partial", fn)
    with DatasetWriter(pred, append=True) as w:
        w.write(Record(id="toyworld-test-how-to-999999", messages=[Message("assistant", [TextPart("hi")])]))
    report = judge.evaluate(pred, truth, progress=False)
    got = rows(report)
    assert report["summary"]["all"]["missing"] == 5 and report["unexpected_predictions"] == ["toyworld-test-how-to-999999"]
    for rid in dropped:
        r = got[rid]
        assert r["missing"] and all(r[m] == 0.0 for m in judge.defined_metrics(r["kind"]))
        assert all(r[m] is None for m in judge.METRICS if m not in judge.defined_metrics(r["kind"]))
    assert report["summary"]["all"]["i_com"] < 1.0


def test_prediction_paths_cannot_escape_their_root(truth, tmp_path):
    pred = rewrite(truth, tmp_path / "evil", lambda rec, task, parts: parts)
    shard = pred / "shards" / "part-00000.jsonl"
    lines = shard.read_text().splitlines()
    rec = json.loads(lines[0])
    for m in rec["messages"]:
        for p in m["content"]:
            if p["type"] == "image":
                p["image"] = "../../truth/manifest.json"
    lines[0] = json.dumps(rec)
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match="leaves the dataset root"):
        judge.evaluate(pred, truth, progress=False)


def test_cli_eval_toyworld(truth, tmp_path):
    from typer.testing import CliRunner

    from duetgen.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", "toyworld", "--pred", str(truth), "--truth", str(truth),
                              "--out", str(tmp_path / "report.json")])
    assert res.exit_code == 0, res.output
    assert "IT-Co" in res.output and "understanding" in res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["all"]["it_co"] == 1.0 and len(report["records"]) == 48
    res = runner.invoke(app, ["eval", "toyworld", "--pred", str(tmp_path / "nope"), "--truth", str(truth)])
    assert res.exit_code == 2 and "nope" in res.output
