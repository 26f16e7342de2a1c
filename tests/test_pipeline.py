"""Python API: DuetGenPipeline.from_pretrained, pipe(...) -> Record, pipe.stream(...) events, saved outputs, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from generation_model import trained_tiny_dir, trained_tiny_model, training_prompt
from duetgen.data.dataset import Dataset
from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.infer.engine import DenoisingStep, Finished, GenerationConfig, ImageDone, ImageStarted, TextDelta
from duetgen.infer.pipeline import DuetGenPipeline
from duetgen.infer.render import save_output
from duetgen.models.duetgen import ModelDirectoryError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe():
    return DuetGenPipeline.from_pretrained(trained_tiny_dir())


def parts(record: Record):
    return ["IMG" if isinstance(p, ImagePart) else p.text for p in record.messages[-1].content]


def test_call_returns_a_record_with_images(pipe):
    text, canvas = training_prompt(0)
    record = pipe(text, images=[canvas], num_steps=2, max_new_tokens=150)
    assert isinstance(record, Record) and record.source == "duetgen"
    assert [m.role for m in record.messages] == ["user", "assistant"]
    assert isinstance(record.messages[0].content[0], ImagePart)  # the canvas, then the request
    answer = record.messages[-1].content
    images = [p.image for p in answer if isinstance(p, ImagePart)]
    assert len(images) >= 1 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    assert any(isinstance(p, TextPart) and p.text.startswith("Step") for p in answer)  # learnt from the fit
    meta = record.meta
    assert meta["model"] == str(trained_tiny_dir()) and meta["preset"] == "tiny"
    assert meta["finish_reason"] in ("end_of_turn", "max_tokens", "max_images")
    assert meta["generation"]["num_steps"] == 2 and meta["stats"]["images"] == len(images)
    json.dumps(meta)  # storable


def test_loaded_directory_generates_like_the_model_in_memory(pipe):
    text, canvas = training_prompt(1)
    from_disk = pipe(text, images=[canvas], num_steps=2, max_new_tokens=80, seed=5)
    in_memory = DuetGenPipeline(trained_tiny_model())(text, images=[canvas], num_steps=2, max_new_tokens=80, seed=5)
    assert parts(from_disk) == parts(in_memory)
    for a, b in zip(from_disk.messages[-1].content, in_memory.messages[-1].content):
        if isinstance(a, ImagePart):
            assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 1


def test_stream_events_and_final_record(pipe):
    text, canvas = training_prompt(0)
    events = list(pipe.stream(text, images=[canvas], num_steps=3, max_new_tokens=150))
    assert isinstance(events[-1], Finished) and events[-1].record is not None
    kinds = {type(e) for e in events}
    assert {TextDelta, ImageStarted, DenoisingStep, ImageDone} <= kinds
    record = events[-1].record
    called = pipe(text, images=[canvas], num_steps=3, max_new_tokens=150)
    assert parts(record) == parts(called)  # same seed, same answer
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert streamed == "".join(p.text for p in record.messages[-1].content if isinstance(p, TextPart))
    # every image: started, its steps 1..3, done, in that order
    for k in range(sum(isinstance(e, ImageDone) for e in events)):
        mine = [e for e in events if getattr(e, "index", None) == k]
        assert [type(e).__name__ for e in mine] == ["ImageStarted"] + ["DenoisingStep"] * 3 + ["ImageDone"]


def test_message_list_input_is_not_modified(pipe):
    text, canvas = training_prompt(0)
    messages = [Message("user", [ImagePart(canvas), TextPart(text)])]
    record = pipe(messages, GenerationConfig(num_steps=1, max_new_tokens=20))
    assert len(messages) == 1 and record.messages[0].content[1].text == text


def test_save_output_writes_dataset_html_markdown(pipe, tmp_path):
    text, canvas = training_prompt(0)
    record = pipe(text, images=[canvas], num_steps=2, max_new_tokens=150)
    paths = save_output(record, tmp_path / "out")
    ds = Dataset(tmp_path / "out")
    stored = list(ds)
    assert len(stored) == 1 and parts(stored[0]) == parts(record)
    for part in stored[0].messages[-1].content:
        if isinstance(part, ImagePart):
            assert ds.open_image(part.image).size == (32, 32)
    page = paths["html"].read_text()
    assert page.count("<img") == len(stored[0].image_parts())
    for part in stored[0].image_parts():
        assert part.image in page and (tmp_path / "out" / part.image).is_file()
    assert "![image 1](" in paths["markdown"].read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        save_output(record, tmp_path / "out")


def test_bad_input(pipe, tmp_path):
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe("   ")
    with pytest.raises(ValueError, match="over the cap"):
        pipe("x" * 20_001)
    with pytest.raises(ValueError, match="not found"):
        pipe("Draw a red circle.", images=[tmp_path / "missing.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        pipe("Draw a red circle.", images=[tmp_path / "bad.png"])
    with pytest.raises(ValueError, match="unknown generation setting"):
        pipe("Draw a red circle.", stepz=3)
    with pytest.raises(ValueError, match="top_p"):
        pipe("Draw a red circle.", top_p=1.5)
    big = DuetGenPipeline(pipe.model, max_image_pixels=100)
    with pytest.raises(ValueError, match="over the cap of 100 pixels"):
        big("Draw a red circle.", images=[Image.new("RGB", (20, 20))])


def test_bad_model_directories(tmp_path):
    with pytest.raises(ModelDirectoryError, match="no such model directory"):
        DuetGenPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirectoryError, match="not a complete DuetGen directory"):
        DuetGenPipeline.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelDirectoryError, match="does not match preset 'toy'"):
        DuetGenPipeline.from_pretrained(trained_tiny_dir(), expect="toy")


def test_continuing_an_open_answer_extends_it(pipe):
    text, canvas = training_prompt(0)
    messages = [Message("user", [ImagePart(canvas), TextPart(text)]),
                Message("assistant", [TextPart("Step 1: Place the orange circle on the left.")])]
    record = pipe(messages, num_steps=1, max_new_tokens=40)
    assert [m.role for m in record.messages] == ["user", "assistant"]
    assert record.messages[1].content[0].text == "Step 1: Place the orange circle on the left."
    assert len(record.messages[1].content) > 1  # the model's continuation follows in the same turn
