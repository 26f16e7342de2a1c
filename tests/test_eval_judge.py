"""The MLLM judge against a local OpenAI-compatible server over real HTTP (tests/fixtures/eval/eval_judge_server.py)."""

import asyncio
import io
import statistics
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_fakes import answer_parts, canvas, prompt_record  # noqa: E402
from eval_judge_server import JudgeServer, expected_score, request_text  # noqa: E402

from duetgen.data.record import ImagePart, Message  # noqa: E402
from duetgen.eval.judge import (PREPROCESS_ID, Judge, JudgeConfig, Sample, classify, count_images,  # noqa: E402
                                load_template, preprocess_image, sequence_parts)
from duetgen.llm.client import ChatResult  # noqa: E402


class MemoryImages:
    """An ImageSource over in-memory images keyed by path (the harness uses Dataset / ImageFolder)."""

    def __init__(self):
        self.images = {}

    def add(self, im) -> ImagePart:
        path = f"images/{len(self.images)}.png"
        self.images[path] = im
        return ImagePart(path)

    def open_image(self, path, record_id="?"):
        return self.images[path]


def make_sample(i: int = 0, marker: str = "", n_out: int = 2, big: bool = False) -> Sample:
    src = MemoryImages()
    rec = prompt_record(i)
    request = [Message(m.role, [src.add(p.image) if isinstance(p, ImagePart) else p for p in m.content])
               for m in rec.messages]
    output = [src.add(p.image) if isinstance(p, ImagePart) else p for p in answer_parts(i, marker, n_out, big=big)]
    return Sample(rec.id, "all", request, output, src, src)


@pytest.fixture(scope="module")
def server():
    s = JudgeServer().start()
    yield s
    s.stop()


def run(coro):
    return asyncio.run(coro)


def judge_for(server, tmp_path, k=1, cache=True, **kw) -> Judge:
    return Judge(JudgeConfig(server.url, "judge-test", k=k, max_retries=0, **kw),
                 cache_path=tmp_path / "scores.sqlite" if cache else None)


async def score_and_close(judge: Judge, template: str, fields: dict) -> dict:
    try:
        return await judge.score(load_template(template), fields)
    finally:
        await judge.aclose()


# ----------------------------------------------------------------------------- images and views
def test_preprocess_downscales_longest_side_to_512_and_keeps_small_images():
    big = preprocess_image(Image.new("RGB", (1000, 400), (10, 20, 30)))
    with Image.open(io.BytesIO(big)) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (512, 205), "RGB")
    small = preprocess_image(Image.new("RGBA", (64, 48), (10, 20, 30, 0)))
    with Image.open(io.BytesIO(small)) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (64, 48), "RGB")
    tall = preprocess_image(Image.new("L", (300, 2000)))
    with Image.open(io.BytesIO(tall)) as im:
        assert im.size == (77, 512)


def test_views_show_the_right_images_and_the_hidden_view_shows_none():
    s = make_sample(n_out=2)  # 1 input image, 2 output images
    seq = sequence_parts(s, "all")
    assert count_images([{"role": "user", "content": seq}]) == 3
    text = "".join(p["text"] for p in seq if p["type"] == "text")
    assert text.startswith("INPUT:\n") and "\nOUTPUT:\n" in text
    assert "<Img_0>" in text and "</Img_2>" in text and "ITEM-000" in text

    one = sequence_parts(s, 1)  # input image + output image 1 only
    assert count_images([{"role": "user", "content": one}]) == 2
    assert "<Img_1></Img_1>" in "".join(p["text"] for p in one if p["type"] == "text")

    hidden = sequence_parts(s, "none")
    assert count_images([{"role": "user", "content": hidden}]) == 0
    t = load_template("comm_irs_predict")
    messages = t.render(sequence=hidden, num_hidden=2, first_hidden=1, last_hidden=2)
    assert count_images(messages) == 0
    flat = str(messages)
    assert "image" not in [p.get("type") for m in messages if isinstance(m["content"], list) for p in m["content"]]
    assert "<Img_0></Img_0>" in flat and "<Img_1></Img_1>" in flat and "<Img_2></Img_2>" in flat
    assert "data:image" not in flat


def test_hidden_prediction_request_on_the_wire_carries_no_image(server, tmp_path):
    s = make_sample(n_out=3)
    judge = judge_for(server, tmp_path)
    server.reset()

    async def go():
        try:
            return await judge.predict(load_template("comm_irs_predict"),
                                       {"sequence": sequence_parts(s, "none"), "num_hidden": 3, "first_hidden": 1,
                                        "last_hidden": 3}, n_expected=3)
        finally:
            await judge.aclose()

    unit = run(go())
    assert unit["state"] == "ok" and len(unit["descriptions"]) == 3
    assert server.count == 1
    entry = server.log[0]
    assert entry["n_images"] == 0
    assert "image_url" not in str(entry["body"]["messages"])


# ----------------------------------------------------------------------------- states
@pytest.mark.parametrize("marker,state", [("", "ok"), ("JUDGE_REFUSE", "refusal"), ("JUDGE_BADJSON", "unparsable"),
                                          ("JUDGE_OUTOFRANGE", "unparsable"), ("JUDGE_500", "api_error")])
def test_each_failure_is_its_own_state_and_carries_no_score(server, tmp_path, marker, state):
    s = make_sample(marker=marker)
    unit = run(score_and_close(judge_for(server, tmp_path), "duetgen_sequence",
                               {"sequence": sequence_parts(s, "all"), "num_output_images": 2}))
    assert unit["state"] == state
    if state == "ok":
        assert set(unit["scores"]) == {"text_completeness", "image_completeness", "image_coherence"}
        assert all(1 <= v <= 5 for v in unit["scores"].values())
    else:
        assert unit["scores"] is None
        assert unit["samples"][0]["state"] == state and "scores" not in unit["samples"][0]
        assert unit["samples"][0]["error"]


def test_classify_only_prose_refusals_as_refusals():
    r = lambda text: classify(ChatResult("invalid_json", text, None, "not JSON"))  # noqa: E731
    assert r("I'm sorry, I cannot evaluate this.")["state"] == "refusal"
    assert r("I can't help with that request.")["state"] == "refusal"
    assert r('{"score": ')["state"] == "unparsable"
    assert r("The answer is good. Score: 4")["state"] == "unparsable"
    assert classify(ChatResult("api_error", None, None, "HTTP 500"))["state"] == "api_error"
    ok = classify(ChatResult("ok", '{"a": 1}', {"a": 1}, None))
    assert ok == {"state": "ok", "data": {"a": 1}}


def test_api_refusal_field_is_a_refusal_and_is_cached(server, tmp_path):
    # content null + message.refusal (OpenAI structured outputs); the text has no prose-refusal opening,
    # so only the field can make this a refusal (before, it was an api_error: "malformed response body").
    fields = {"sequence": sequence_parts(make_sample(i=5, marker="JUDGE_APIREFUSAL"), "all"), "num_output_images": 2}
    server.reset()
    unit = run(score_and_close(judge_for(server, tmp_path), "duetgen_sequence", fields))
    assert unit["state"] == "refusal" and unit["scores"] is None and server.count == 1
    assert unit["samples"][0]["text"] == "Grading this content is against the usage policy."
    judge = judge_for(server, tmp_path)
    again = run(score_and_close(judge, "duetgen_sequence", fields))
    assert again["state"] == "refusal" and server.count == 1 and judge.stats["cache_hits"] == 1
    assert classify(ChatResult("refusal", "No.", None, "the API refused: No."))["state"] == "refusal"


# ----------------------------------------------------------------------------- k samples, provenance
def test_k_samples_use_distinct_seeds_and_the_score_is_their_median(server, tmp_path):
    s = make_sample(i=7)
    server.reset()
    unit = run(score_and_close(judge_for(server, tmp_path, k=3), "duetgen_sequence",
                               {"sequence": sequence_parts(s, "all"), "num_output_images": 2}))
    assert server.count == 3
    bodies = [e["body"] for e in server.log]
    assert sorted(b["seed"] for b in bodies) == [0, 1, 2]
    assert all(b["temperature"] == 0.0 for b in bodies)
    assert {request_text(b) for b in bodies} == {request_text(bodies[0])}  # same prompt, only the seed differs
    differ = False
    for field in unit["scores"]:
        per_seed = [expected_score(b, field, 1, 5) for b in bodies]
        differ |= len(set(per_seed)) > 1
        assert unit["scores"][field] == statistics.median(per_seed)
        assert sorted(x["scores"][field] for x in unit["samples"]) == sorted(per_seed)
    assert differ, "the fake judge should disagree across seeds for at least one field"


def test_every_unit_records_model_endpoint_template_hash_and_preprocessing(server, tmp_path):
    s = make_sample()
    unit = run(score_and_close(judge_for(server, tmp_path, k=2), "duetgen_image",
                               {"sequence": sequence_parts(s, 0), "target": "<Img_1>"}))
    t = load_template("duetgen_image")
    assert unit["judge"] == {"model": "judge-test", "base_url": server.url, "template": t.version_key,
                             "template_sha256": t.content_hash, "preprocess": PREPROCESS_ID, "temperature": 0.0, "k": 2}
    assert t.version_key.startswith("duetgen_image@1:")


def test_images_reach_the_judge_downscaled(server, tmp_path):
    s = make_sample(big=True)  # the first output image is 900x600
    server.reset()
    run(score_and_close(judge_for(server, tmp_path), "duetgen_sequence",
                        {"sequence": sequence_parts(s, "all"), "num_output_images": 2}))
    sizes = server.log[0]["image_sizes"]
    assert len(sizes) == 3
    assert ("JPEG", (512, 341)) in sizes
    assert all(fmt == "JPEG" and max(wh) <= 512 for fmt, wh in sizes)


# ----------------------------------------------------------------------------- score cache
def test_score_cache_makes_a_repeat_free_across_judges_but_retries_api_errors(server, tmp_path):
    fields_ok = {"sequence": sequence_parts(make_sample(i=1), "all"), "num_output_images": 2}
    fields_ref = {"sequence": sequence_parts(make_sample(i=2, marker="JUDGE_REFUSE"), "all"), "num_output_images": 2}
    fields_err = {"sequence": sequence_parts(make_sample(i=3, marker="JUDGE_500"), "all"), "num_output_images": 2}

    async def all_three(judge):
        try:
            t = load_template("duetgen_sequence")
            return [await judge.score(t, f) for f in (fields_ok, fields_ref, fields_err)]
        finally:
            await judge.aclose()

    server.reset()
    first = run(all_three(judge_for(server, tmp_path, k=2)))
    assert server.count == 6
    assert [u["state"] for u in first] == ["ok", "refusal", "api_error"]

    server.reset()
    judge = judge_for(server, tmp_path, k=2)  # a new process would open the same file
    again = run(all_three(judge))
    assert server.count == 2  # only the api_error unit's two samples are asked again
    assert all(request_text(e["body"]).count("JUDGE_500") for e in server.log)
    assert judge.stats["cache_hits"] == 4
    assert again[0] == first[0] and again[1] == first[1]

    server.reset()
    run(all_three(judge_for(server, tmp_path, k=2, cache=False)))
    assert server.count == 6  # without the cache everything is asked


def test_cache_key_follows_the_image_bytes(server, tmp_path):
    s1, s2 = make_sample(i=4), make_sample(i=4)
    s2.output[1] = s2.output_images.add(canvas(999))  # same text, another image
    server.reset()
    for s in (s1, s2, s1):
        run(score_and_close(judge_for(server, tmp_path), "duetgen_sequence",
                            {"sequence": sequence_parts(s, "all"), "num_output_images": 2}))
    assert server.count == 2


def test_hidden_prediction_with_the_wrong_count_is_unparsable(server, tmp_path):
    s = make_sample(n_out=2)
    judge = judge_for(server, tmp_path)

    async def go():
        try:  # the prompt asks for 2 descriptions (the server answers 2) but 3 are expected
            return await judge.predict(load_template("comm_irs_predict"),
                                       {"sequence": sequence_parts(s, "none"), "num_hidden": 2, "first_hidden": 1,
                                        "last_hidden": 2}, n_expected=3)
        finally:
            await judge.aclose()

    unit = run(go())
    assert unit["state"] == "unparsable" and unit["descriptions"] is None
    assert "expected 3" in unit["error"]


def test_judge_config_refuses_bad_k_and_non_http_endpoints():
    with pytest.raises(ValueError, match="k must be >= 1"):
        JudgeConfig("http://127.0.0.1:1/v1", "m", k=0)
    with pytest.raises(ValueError, match="must start with http"):
        JudgeConfig("file:///etc/passwd", "m")


# ----------------------------------------------------------------------------- issue 15: hostile judge replies
@pytest.mark.parametrize("marker", ["JUDGE_DRIP", "JUDGE_HUGE"])
def test_dripping_or_huge_judge_reply_is_an_api_error_within_the_timeout(server, tmp_path, marker):
    """Issue 15 items 7 and 8: a dripping judge held a request 31 s under --timeout 3; 100 MB replies were read whole."""
    import time

    s = make_sample(marker=marker)
    t0 = time.perf_counter()
    unit = run(score_and_close(judge_for(server, tmp_path, timeout_s=1.0, max_reply_bytes=1 << 20), "duetgen_sequence",
                               {"sequence": sequence_parts(s, "all"), "num_output_images": 2}))
    assert time.perf_counter() - t0 < 2.5
    assert unit["state"] == "api_error" and unit["scores"] is None
    assert ("deadline" if marker == "JUDGE_DRIP" else "cap of 1,048,576 bytes") in unit["samples"][0]["error"]
