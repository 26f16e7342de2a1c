"""The record type: JSON round trip, access helpers, and validation that names record and field."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart, check_image_path, validate

GOOD = {"id": "howto-1", "source": "wikihow", "meta": {"prompt_version": "v1"}, "messages": [
    {"role": "system", "content": [{"type": "text", "text": "Be helpful."}]},
    {"role": "user", "content": [{"type": "text", "text": "How do I bathe a cat?"},
                                 {"type": "image", "image": "images/3f/3fa9.png"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Step 1: ..."}, {"type": "image", "image": "images/91/91c0.png"},
                                      {"type": "text", "text": "Step 2: ..."}, {"type": "image", "image": "images/aa/aa00.jpg"}]}]}


def bad(**changes):
    d = json.loads(json.dumps(GOOD))
    d.update(changes)
    return d


def test_json_round_trip_and_access():
    rec = Record.from_json(GOOD)
    assert rec.to_json() == GOOD
    assert Record.from_jsonl_line(rec.to_jsonl_line()).to_json() == GOOD
    assert [p.path for p in rec.image_parts("assistant")] == ["images/91/91c0.png", "images/aa/aa00.jpg"]
    assert [p.path for p in rec.image_parts()] == ["images/3f/3fa9.png", "images/91/91c0.png", "images/aa/aa00.jpg"]
    assert rec.turns("assistant")[0].text == "Step 1: ...Step 2: ..."
    assert [type(p).__name__ for _, p in rec.iter_parts()][:3] == ["TextPart", "TextPart", "ImagePart"]


def test_openai_string_content_and_defaults():
    rec = Record.from_json({"id": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert rec.messages[0].content == [TextPart("hi")] and rec.source == "unknown" and rec.meta == {}


@pytest.mark.parametrize("d, match", [
    (bad(id=""), r"no string 'id'"),
    (bad(extra=1), r"record 'howto-1': unknown top-level field\(s\) \['extra'\]"),
    (bad(messages=[]), r"record 'howto-1': 'messages' must be a non-empty list"),
    (bad(messages=[{"role": "robot", "content": []}]), r"record 'howto-1': messages\[0\]\.role: unknown role 'robot'"),
    (bad(messages=[{"role": "user", "content": [{"type": "audio"}]}]),
     r"record 'howto-1': messages\[0\]\.content\[0\]\.type: unknown part type 'audio'"),
    (bad(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]), r"content\[0\]\.text must be a string"),
    (bad(messages=[{"role": "user", "content": [{"type": "image", "image": None}]}]), r"messages\[0\]\.content\[0\]\.image must be a path"),
    (bad(meta=[]), r"record 'howto-1': 'meta' must be an object"),
    (bad(source=5), r"record 'howto-1': 'source' must be a string"),
    ([1, 2], r"must be a JSON object"),
])
def test_from_json_rejects_with_record_and_field(d, match):
    with pytest.raises(RecordError, match=match):
        Record.from_json(d)


@pytest.mark.parametrize("path, why", [
    ("/abs/x.png", "absolute"), ("\\\\server\\x.png", "absolute"), ("http://a/x.png", "URL"), ("file:x.png", "URL"),
    ("c:/x.png", "URL"), ("//host/x.png", "URL"), ("images/../../x.png", "leaves the dataset root"),
    ("images\\..\\..\\x.png", "leaves the dataset root"), ("a\x00b.png", "NUL"), ("", "non-empty"),
])
def test_check_image_path_refuses(path, why):
    with pytest.raises(RecordError, match=why):
        check_image_path(path, "r")


def test_check_image_path_accepts_relative():
    assert check_image_path("images/ab/abc.png") == "images/ab/abc.png"


def test_in_memory_images_validate_but_do_not_serialise():
    rec = Record(id="m", messages=[Message("assistant", [ImagePart(Image.new("RGB", (2, 2))), ImagePart(b"\x89PNG")])])
    validate(rec)  # PIL images and bytes are fine in memory
    with pytest.raises(RecordError, match=r"record 'm': image part holds an in-memory image"):
        rec.to_json()
    rec.messages[0].content.append(ImagePart(3.5))
    with pytest.raises(RecordError, match=r"record 'm': messages\[0\]\.content\[2\]\.image must be a path, bytes or a PIL image"):
        validate(rec)
    with pytest.raises(TypeError):
        rec.messages[0].content[0].path
