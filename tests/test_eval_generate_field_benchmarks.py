"""`duetgen eval generate` through the CLI on GenEval, ImgEdit and GEdit-Bench (issue 16), with a tiny
random DuetGen saved to disk: the single-image structure is forced (a random MLLM never writes <BOV>
by itself), so every item gets exactly one image, written in the layout its scorer reads.

Fixtures are 2-3 items in each benchmark's real field layout, with placeholder text."""

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_field_benchmarks import gedit_parquet, img  # noqa: E402

from duetgen.cli import app  # noqa: E402
from duetgen.data.dataset import Dataset  # noqa: E402

torch.set_num_threads(1)
runner = CliRunner()
FAST = ["--steps", "1", "--image-size", "16x16", "--no-progress"]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """The ``tiny`` preset with random weights, saved with DuetGen.save_pretrained."""
    from duetgen.models import builder

    return builder.build("tiny", seed=0).eval().save_pretrained(tmp_path_factory.mktemp("model") / "tiny-random")


def generate(random_model, benchmark: str, out: Path, *args: str, code: int = 0):
    result = runner.invoke(app, ["eval", "generate", "--benchmark", benchmark, "--model", str(random_model),
                                 "--out", str(out), *FAST, *args])
    assert result.exit_code == code, result.output
    return result


def test_geneval_through_the_cli_writes_its_five_digit_layout(random_model, tmp_path):
    meta = [{"tag": "single_object", "include": [{"class": "placeholder-a", "count": 1}], "prompt": "placeholder prompt a"},
            {"tag": "counting", "include": [{"class": "placeholder-b", "count": 2}], "prompt": "placeholder prompt b"}]
    (tmp_path / "evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    out = tmp_path / "geneval"
    r = generate(random_model, "geneval", out, "--prompts", str(tmp_path / "evaluation_metadata.jsonl"),
                 "--samples", "2")
    assert "generated 4 image(s)" in r.output and "evaluate_images.py" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "generation.json"]  # the scorer reads digits
    for i, m in enumerate(meta):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == m
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]
        from PIL import Image

        with Image.open(folder / "samples" / "00000.png") as im:
            assert im.format == "PNG" and im.size == (16, 16)
    again = generate(random_model, "geneval", out, "--prompts", str(tmp_path / "evaluation_metadata.jsonl"),
                     "--samples", "2")
    assert "generated 0 image(s)" in again.output  # resume: every sample is there
    other = generate(random_model, "geneval", out, "--prompts", str(tmp_path / "evaluation_metadata.jsonl"),
                     "--samples", "2", "--steps", "3", code=2)  # a resume with other settings is refused
    assert "different generation settings" in other.output
    fresh = generate(random_model, "geneval", tmp_path / "one", "--prompts", str(tmp_path / "evaluation_metadata.jsonl"),
                     "--samples", "1")  # an explicit 1 was turned into GenEval's default of 4
    assert "generated 2 image(s)" in fresh.output


def one_image_each(out: Path) -> dict:
    """id -> (user images, assistant images, assistant text parts) of every generated record."""
    ds = Dataset(out)
    return {r.id: (len(r.image_parts("user")), len(r.image_parts("assistant")),
                   [p for m in r.messages if m.role == "assistant" for p in m.content if hasattr(p, "text")])
            for r in ds}


def test_imgedit_through_the_cli_draws_exactly_one_edited_image_per_edit(random_model, tmp_path):
    edits = {"1082": {"id": "animal/000000001.jpg", "prompt": "Placeholder edit one.", "edit_type": "adjust"},
             "673": {"id": "style/000000002.jpg", "prompt": "Placeholder edit two.", "edit_type": "style"},
             "12": {"id": "animal/000000003.jpg", "prompt": "Placeholder edit three.", "edit_type": "add"}}
    (tmp_path / "basic_edit.json").write_text(json.dumps(edits))
    for e in edits.values():
        img(tmp_path / "original_images" / e["id"], size=(20, 16))
    out = tmp_path / "pred"
    r = generate(random_model, "imgedit", out, "--prompts", str(tmp_path / "basic_edit.json"),
                 "--images", str(tmp_path / "original_images"))
    assert "generated 3 answer(s)" in r.output
    got = one_image_each(out)
    assert sorted(got) == sorted(edits)
    assert all(g[:2] == (1, 1) and g[2] == [] for g in got.values())  # source in, one image out, no text
    run = json.loads((out / "generation.json").read_text())
    assert run["benchmark"] == {"name": "imgedit", "version": "1"} and run["generation"]["structure"] == "one_image"
    assert {r.id: r.meta["category"] for r in Dataset(out)} == {k: e["edit_type"] for k, e in edits.items()}
    # answers made from one set of source images are not resumed from another (they would be judged against it)
    import shutil

    shutil.copytree(tmp_path / "original_images", tmp_path / "other_images")
    r = generate(random_model, "imgedit", out, "--prompts", str(tmp_path / "basic_edit.json"),
                 "--images", str(tmp_path / "other_images"), code=2)
    assert "different inputs settings" in r.output
    # an input image that leaves its root is found before any answer is generated
    (tmp_path / "original_images" / "style" / "000000002.jpg").unlink()
    (tmp_path / "original_images" / "style" / "000000002.jpg").symlink_to("/etc/passwd")
    r = generate(random_model, "imgedit", tmp_path / "pred2", "--prompts", str(tmp_path / "basic_edit.json"),
                 "--images", str(tmp_path / "original_images"), code=2)
    assert "resolves outside" in r.output and not (tmp_path / "pred2" / "manifest.json").exists()


def test_gedit_through_the_cli_draws_one_image_per_english_row(random_model, tmp_path):
    gedit_parquet(tmp_path / "GEdit-Bench" / "data" / "train-00000-of-00001.parquet")  # 3 en rows, 1 cn row
    out = tmp_path / "pred"
    r = generate(random_model, "gedit", out, "--prompts", str(tmp_path / "GEdit-Bench"))
    assert "generated 3 answer(s)" in r.output
    got = one_image_each(out)
    assert sorted(got) == ["background_change/en/k1", "color_alter/en/k3", "subject-add/en/k2"]
    assert all(g[:2] == (1, 1) and g[2] == [] for g in got.values())
    cn = generate(random_model, "gedit", tmp_path / "pred-cn", "--prompts", str(tmp_path / "GEdit-Bench"),
                  "--language", "cn")
    assert "generated 1 answer(s)" in cn.output and list(one_image_each(tmp_path / "pred-cn")) == ["background_change/cn/k1"]
