"""Synthesis through image-capable APIs (paper section 3.1), against local doubles over real HTTP.

tests/fixtures/synthetic/fake_image_apis.py answers the Gemini generateContent shape and an
OpenAI-compatible shape; a keyword in the question picks the behaviour (a good 3-step answer,
a blocked prompt, no image, a non-image part, ...).
"""

import asyncio
import base64
import io
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from duetgen.cli import app
from duetgen.data.dataset import Dataset
from duetgen.data.images import ImageError
from duetgen.data.record import ImagePart
from duetgen.data.synthetic.dishes import dish_requests, title_from_name
from duetgen.data.synthetic.image_api import GeminiImageClient, OpenAIImageClient
from duetgen.data.synthetic.quality import QualityConfig, build_record
from duetgen.data.synthetic.runlog import RunReport
from duetgen.data.synthetic.synthesize import PROGRESS_FILE, SynthesisConfig, load_requests, synthesize

sys.path.insert(0, str(Path(__file__).parent))
from fixtures.synthetic.fake_image_apis import COLORS, FakeImageAPIServer, png_bytes  # noqa: E402


@pytest.fixture()
def server():
    srv = FakeImageAPIServer().start()
    yield srv
    srv.stop()


def gemini(srv, **kw):
    kw.setdefault("backoff_base_s", 0.01)
    return GeminiImageClient(srv.url, "gemini-2.5-flash-image", api_key="test-key", **kw)


def openai(srv, **kw):
    kw.setdefault("backoff_base_s", 0.01)
    return OpenAIImageClient(srv.url + "/v1", "image-model", api_key="test-key", **kw)


def ask(client, question, image=None):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]

    async def go():
        try:
            return await client.agenerate([{"role": "system", "content": "Answer in steps."},
                                           {"role": "user", "content": content}])
        finally:
            await client.aclose()

    return asyncio.run(go())


# ----------------------------------------------------------------------------- clients + filters
@pytest.mark.parametrize("make", [gemini, openai])
def test_odd_usage_counts_zero_and_an_odd_answer_is_an_api_error_not_a_crash(server, make):
    """Usage counts of the wrong type (a string, a list, -5, 1e300) and answers of the wrong shape (a list for
    finishReason, a list for the message) raised out of agenerate and stopped `data synthesize` (an audit,
    session 13): an odd count is 0 (the paid answer is kept), an odd answer is one api_error."""
    res = ask(make(server), "How do I repot a plant? ODDUSAGE")
    assert res.status == "ok" and len(res.parts) == 8
    assert res.usage == {"prompt_tokens": 0, "output_text_tokens": 0, "output_image_tokens": 0}
    res = ask(make(server), "How do I repot a plant? ODDSHAPE")
    assert res.status == "api_error" and ("malformed reply" in res.error or "not an object" in res.error)


def test_gemini_good_answer_parts_cost_and_wire_shape(server):
    res = ask(gemini(server), "How do I repot a plant?", image=png_bytes((1, 2, 3), (300, 300)))
    assert res.status == "ok" and res.finish_reason == "STOP"
    assert [p["type"] for p in res.parts] == ["text", "text", "image", "text", "image", "text", "image", "text"]
    assert Image.open(io.BytesIO(res.parts[2]["data"])).getpixel((0, 0)) == COLORS[0]
    # 100 prompt tokens at $0.30/M, 40 text at $2.50/M, 3 x 1290 image tokens at $30/M
    assert res.usage == {"prompt_tokens": 100, "output_text_tokens": 40, "output_image_tokens": 3870}
    assert res.cost_usd == pytest.approx((100 * 0.30 + 40 * 2.50 + 3870 * 30.0) / 1e6)
    body, headers = server.bodies[0], server.headers[0]
    assert headers["x-goog-api-key"] == "test-key"
    assert body["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"]
    assert body["systemInstruction"] == {"parts": [{"text": "Answer in steps."}]}
    user_parts = body["contents"][0]["parts"]
    assert user_parts[0]["inline_data"]["mime_type"] == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(user_parts[0]["inline_data"]["data"]))).getpixel((0, 0)) == (1, 2, 3)

    rec, reason, _ = build_record({"id": "q1", "prompt": "How do I repot a plant?"}, [png_bytes()], res, QualityConfig())
    assert reason == "" and rec.id == "synth-q1" and rec.source == "synthetic"
    user, assistant = rec.messages
    assert isinstance(user.content[0], ImagePart) and user.content[1].text == "How do I repot a plant?"
    kinds = [type(p).__name__ for p in assistant.content]
    assert kinds == ["TextPart", "ImagePart", "TextPart", "ImagePart", "TextPart", "ImagePart", "TextPart"]
    assert assistant.content[0].text == "Step 1: Gather the tools and lay them out\n\non a clean surface."
    assert rec.meta["cost_usd"] == pytest.approx(res.cost_usd, abs=1e-6) and rec.meta["image_sizes"] == [[320, 320]] * 3


@pytest.mark.parametrize("keyword,reason", [
    ("REFUSE", "refused"),
    ("SAFETYFINISH", "refused"),
    ("SORRY", "refused"),
    ("TEXTONLY", "no_images"),
    ("NOTANIMAGE", "bad_image"),
    ("PDFPART", "bad_image"),
    ("BADBASE64", "bad_image"),
    ("ONEIMAGE", "too_few_images"),
    ("ADJACENT", "not_alternating"),
    ("SMALL", "low_resolution"),
])
def test_bad_answers_get_a_reason(server, keyword, reason):
    for client in (gemini(server), openai(server)):
        res = ask(client, f"How do I {keyword} this?")
        want_status = "blocked" if (keyword == "REFUSE" or (keyword == "SAFETYFINISH" and isinstance(client, GeminiImageClient))) else "ok"
        if keyword == "SAFETYFINISH" and isinstance(client, OpenAIImageClient):
            continue  # a Gemini-only finish reason
        assert res.status == want_status
        rec, got, detail = build_record({"id": "x", "prompt": "q"}, [], res, QualityConfig())
        assert rec is None and got == reason, (type(client).__name__, detail)


def test_openai_shapes_and_remote_urls_are_not_fetched(server):
    res = ask(openai(server), "How do I do it?")
    assert res.status == "ok" and res.num_images == 3
    body = server.bodies[-1]
    assert body["modalities"] == ["image", "text"] and server.headers[-1]["Authorization"] == "Bearer test-key"
    assert res.usage["output_image_tokens"] == 3000
    res = ask(openai(server), "REMOTEURL please")
    assert [p["type"] for p in res.parts] == ["text", "bad_image", "text", "bad_image"]
    assert "remote URLs are not fetched" in res.parts[1]["reason"]
    res = ask(openai(server), "OPENROUTER style")
    assert [p["type"] for p in res.parts] == ["text", "image"]  # message.images after the text
    rec, reason, _ = build_record({"id": "o", "prompt": "q"}, [], res, QualityConfig(min_images=1))
    assert reason == "" and isinstance(rec.messages[1].content[1], ImagePart)


def test_retries_on_5xx_and_429_then_gives_up(server):
    server.inject("500", "429")
    res = ask(gemini(server, max_retries=3), "How do I retry?")
    assert res.status == "ok" and server.requests == 3
    server.inject("503", "503", "503")
    client = gemini(server, max_retries=2)
    res = ask(client, "How do I fail?")
    assert res.status == "api_error" and "gave up after 3 attempts" in res.error
    assert client.totals["api_error"] == 1 and client.totals["retries"] == 2


# ----------------------------------------------------------------------------- full runs
def write_requests(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def std_requests(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (300, 300), (180, 90, 30)).save(photos / "grilled_steak.jpg")
    return write_requests(tmp_path / "requests.jsonl", [
        {"id": "good-1", "prompt": "How do I bathe a cat?", "domain": "pets_and_animal_care", "subcategory": "cat_grooming"},
        {"id": "good-2", "prompt": "How do I fold a fitted sheet?"},
        {"id": "refuse", "prompt": "REFUSE to answer this"},
        {"id": "textonly", "prompt": "TEXTONLY answer"},
        {"id": "notimage", "prompt": "NOTANIMAGE answer"},
        "{this line is not json",
        {"id": "good-1", "prompt": "duplicate id"},
        {"prompt": "no id"},
        {"id": "dish-1", "prompt": "How do I cook this grilled steak?", "kind": "dish", "images": ["grilled_steak.jpg"]},
        {"id": "dish-missing", "prompt": "How do I cook this?", "kind": "dish", "images": ["nope.jpg"]},
        {"id": "dish-escape", "prompt": "How do I cook this?", "kind": "dish", "images": ["../requests.jsonl"]},
    ])


def run(reqs_path, client, out, cfg=None, image_root=None):
    report = RunReport("synthesize")
    root = image_root if image_root is not None else reqs_path.parent / "photos"
    reqs = load_requests(reqs_path, root, report)
    return asyncio.run(synthesize(reqs, client, out, cfg or SynthesisConfig(), image_root=root, report=report,
                                  progress=False))


def test_synthesize_run_skips_bad_input_and_resumes_without_paying_twice(server, tmp_path):
    reqs = std_requests(tmp_path)
    out = tmp_path / "out"
    report = run(reqs, gemini(server), out)
    ds = Dataset(out)
    recs = {r.meta["request_id"]: r for r in ds}
    assert sorted(recs) == ["dish-1", "good-1", "good-2"]
    dish = recs["dish-1"]
    assert dish.meta["kind"] == "dish" and dish.messages[0].content[1].text == "How do I cook this grilled steak?"
    assert ds.open_image(dish.image_parts("user")[0].path, dish.id).getpixel((150, 150)) == pytest.approx((180, 90, 30), abs=3)
    assert recs["good-1"].meta["subcategory"] == "cat_grooming"
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert reasons["refuse"] == "refused" and reasons["textonly"] == "no_images" and reasons["notimage"] == "bad_image"
    assert reasons["dish-missing"] == "bad_input_image" and reasons["dish-escape"] == "bad_input_image"
    assert reasons["requests.jsonl:6"] == "bad_request" and reasons["requests.jsonl:7"] == "duplicate_id"
    assert reasons["requests.jsonl:8"] == "bad_request"
    # the dish request used the dish template with the photo as a user image
    dish_body = next(b for b in server.bodies if "grilled steak" in json.dumps(b))
    assert "photo of a dish" in dish_body["systemInstruction"]["parts"][0]["text"]
    assert "inline_data" in dish_body["contents"][0]["parts"][0]
    cost1 = report.extra["cost_usd"]["this_run"]
    assert cost1 > 0 and report.extra["cost_usd"]["all_runs"] == pytest.approx(cost1)
    paid = server.requests
    assert paid == 6  # 3 kept + 3 dropped answers; bad input never reached the API

    report2 = run(reqs, gemini(server), out)
    assert server.requests == paid  # nothing asked again: kept ones are committed, dropped ones logged
    assert report2.counts["already_done"] == 6 and len(Dataset(out)) == 3
    assert report2.extra["cost_usd"]["this_run"] == 0 and report2.extra["cost_usd"]["all_runs"] == pytest.approx(cost1)

    report3 = run(reqs, gemini(server), out, SynthesisConfig(retry_dropped=True))
    assert server.requests == paid + 3  # refuse, textonly, notimage asked again
    assert len(Dataset(out)) == 3
    saved = sorted((out / "reports").glob("synthesize-*.json"))
    assert len(saved) == 3 and json.loads(saved[0].read_text())["counts"]["written"] == 3
    # the output is an ordinary dataset: `duetgen data view` renders it
    res = CliRunner().invoke(app, ["data", "view", str(out), "--out", str(tmp_path / "view.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "view.html").read_text().count("<img") >= 10  # 3 answers x 3 images + the dish photo


def test_api_errors_are_retried_by_the_next_run(server, tmp_path):
    reqs = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "How do I a?"}])
    server.inject("500")
    r1 = run(reqs, gemini(server, max_retries=0), tmp_path / "out")
    assert r1.skip_reasons["api_error"] == 1 and not (tmp_path / "out" / PROGRESS_FILE).exists()
    r2 = run(reqs, gemini(server, max_retries=0), tmp_path / "out")
    assert r2.counts["written"] == 1


def test_a_request_the_api_rejects_is_dropped_and_a_cut_reply_is_asked_again(server, tmp_path):
    """A 400 is the same answer on every run: it was left for the next run forever (the image client did not say
    which errors may pass); a reply cut mid-JSON may pass and is asked again."""
    reqs = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "How do I a?"}])
    server.inject("400")
    r1 = run(reqs, gemini(server, max_retries=0), tmp_path / "out")
    assert r1.skip_reasons == {"api_rejected": 1} and "HTTP 400" in r1.skipped[0]["detail"]
    asked = server.requests
    r2 = run(reqs, gemini(server, max_retries=0), tmp_path / "out")
    assert server.requests == asked and not r2.counts.get("written")  # not asked again
    r3 = run(reqs, gemini(server, max_retries=0), tmp_path / "out", SynthesisConfig(retry_dropped=True))
    assert r3.counts["written"] == 1
    reqs = write_requests(tmp_path / "r2.jsonl", [{"id": "b", "prompt": "How do I b?"}])
    server.inject("notjson")
    r4 = run(reqs, gemini(server, max_retries=0), tmp_path / "out2")
    assert r4.skip_reasons == {"api_error": 1}
    assert run(reqs, gemini(server, max_retries=0), tmp_path / "out2").counts["written"] == 1
    # the caller's account, not the request (the review: a bad key, as Gemini says it with a 400, and spent credits
    # were dropped, so fixing the key left every request dropped): asked again by the next run
    reqs = write_requests(tmp_path / "r3.jsonl", [{"id": "c", "prompt": "How do I c?"}])
    for fault in ("400key", "402"):
        server.inject(fault)
        assert run(reqs, gemini(server, max_retries=0), tmp_path / "out3").skip_reasons == {"api_error": 1}, fault
    assert run(reqs, gemini(server, max_retries=0), tmp_path / "out3").counts["written"] == 1


class CrashingClient:
    """Answers two requests, then fails like a dead process would (an exception out of the run)."""

    def __init__(self, inner):
        self.inner, self.model, self.max_concurrency, self.n = inner, inner.model, 1, 0
        self.totals = inner.totals

    async def agenerate(self, messages, **kw):
        self.n += 1
        if self.n > 2:
            raise RuntimeError("simulated crash")
        return await self.inner.agenerate(messages, **kw)

    async def aclose(self):
        await self.inner.aclose()


def test_a_crash_keeps_committed_records(server, tmp_path):
    reqs = write_requests(tmp_path / "r.jsonl", [{"id": f"q{i}", "prompt": f"How do I do task {i}?"} for i in range(4)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(reqs, CrashingClient(gemini(server)), tmp_path / "out", SynthesisConfig(shard_size=1))
    assert len(Dataset(tmp_path / "out")) == 2
    assert list((tmp_path / "out" / "reports").glob("synthesize-*.json"))  # the report is written anyway
    r = run(reqs, gemini(server), tmp_path / "out", SynthesisConfig(shard_size=1))
    assert r.counts["written"] == 2 and r.counts["already_done"] == 2 and len(Dataset(tmp_path / "out")) == 4


KILLED_RUN = """
import asyncio, os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_synthetic_synthesize import gemini, run

class Server:  # the test's fake API, reached over HTTP
    url = {url!r}

class DyingClient:
    \"\"\"Answers two requests, one at a time, then the process is SIGKILLed as it asks the third (no commit).\"\"\"
    def __init__(self, inner):
        self.inner, self.model, self.max_concurrency, self.totals, self.n = inner, inner.model, 1, inner.totals, 0
        self.lock = None
    async def agenerate(self, messages, **kw):
        self.lock = self.lock or asyncio.Lock()
        async with self.lock:  # the run's code after an answer runs before the next call starts
            self.n += 1
            if self.n > 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return await self.inner.agenerate(messages, **kw)
    async def aclose(self):
        await self.inner.aclose()

run(Path({reqs!r}), DyingClient(gemini(Server())), Path({out!r}))
"""


def test_a_killed_run_loses_no_paid_answer(server, tmp_path):
    """An audit: a SIGKILL before the open shard's commit (200 records) lost every answer in it, so the next run
    paid for them again, and the all-runs cost left them out. Answers are journaled as they arrive, and the next
    run commits them without asking again."""
    import subprocess

    reqs = write_requests(tmp_path / "r.jsonl", [{"id": f"q{i}", "prompt": f"How do I do task {i}?"} for i in range(4)])
    out = tmp_path / "out"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), url=server.url, reqs=str(reqs), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert server.requests == 2 and len(Dataset(out)) == 0  # two answers paid for, none committed
    r = run(reqs, gemini(server), out)
    assert r.counts["committed_from_journal"] == 2 and r.counts["written"] == 2
    assert server.requests == 4  # only the two never answered were asked
    assert sorted(rec.meta["request_id"] for rec in Dataset(out)) == ["q0", "q1", "q2", "q3"]
    cost = r.extra["cost_usd"]
    assert cost["all_runs"] == pytest.approx(sum(rec.meta["cost_usd"] for rec in Dataset(out)))
    assert cost["this_run"] == pytest.approx(cost["all_runs"] / 2)
    assert run(reqs, gemini(server), out).counts["already_done"] == 4 and server.requests == 4


def test_a_user_image_path_holding_nul_is_a_skipped_request(server, tmp_path):
    """An audit: a NUL in a request's image path (legal JSON) raised out of the worker and ended the run, on every
    rerun; it is one bad_input_image, and the other requests are answered."""
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (300, 300), (180, 90, 30)).save(tmp_path / "photos" / "steak.jpg")
    reqs = write_requests(tmp_path / "r.jsonl", [
        {"id": "nul", "prompt": "How do I cook this?", "kind": "dish", "images": ["pad\u0000thai.jpg"]},
        {"id": "ok", "prompt": "How do I cook this?", "kind": "dish", "images": ["steak.jpg"]}])
    r = run(reqs, gemini(server), tmp_path / "out")
    assert {s["item"]: s["reason"] for s in r.skipped} == {"nul": "bad_input_image"} and r.counts["written"] == 1


# ----------------------------------------------------------------------------- dish prompts
def test_dish_requests_from_a_photo_folder(tmp_path):
    d = tmp_path / "dishes"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (400, 300), (200, 120, 60)).save(d / "grilled_steak-02.jpg")
    Image.new("RGB", (400, 300), (90, 160, 60)).save(d / "sub" / "000123.png")
    Image.new("RGB", (400, 300), (90, 60, 160)).save(d / "IMG_0042.webp")
    Image.new("RGB", (40, 30), (1, 1, 1)).save(d / "tiny_pancake.png")
    (d / "fake.jpg").write_bytes(b"not a jpeg at all")
    (d / "notes.txt").write_text("shopping list")
    (d / "titles.json").write_text(json.dumps({"IMG_0042.webp": "mapo tofu"}))
    report = RunReport("dish-prompts")
    reqs = dish_requests(d, seed=1, report=report)
    by_photo = {r["photo"]: r for r in reqs}
    assert sorted(by_photo) == ["IMG_0042.webp", "grilled_steak-02.jpg", "sub/000123.png"]
    assert by_photo["grilled_steak-02.jpg"]["title"] == "grilled steak"
    assert "grilled steak" in by_photo["grilled_steak-02.jpg"]["prompt"]
    assert by_photo["IMG_0042.webp"]["title"] == "mapo tofu"
    assert "title" not in by_photo["sub/000123.png"]
    assert all(r["kind"] == "dish" and r["images"] == [r["photo"]] for r in reqs)
    assert {s["item"]: s["reason"] for s in report.skipped} == {
        "fake.jpg": "not_an_image", "notes.txt": "not_a_photo_file", "tiny_pancake.png": "low_resolution"}
    assert dish_requests(d, seed=1) == reqs  # deterministic
    assert title_from_name("a3f9c0d1e2") is None and title_from_name("pad_thai_3") == "pad thai"


def test_dish_requests_from_a_hostile_photo_folder(tmp_path):
    """An audit: a non-UTF-8 name crashed the run; titles.json as a FIFO hung it, as a link to /dev/zero ate
    memory, as a link out put an outside file's text into prompts; FIFOs named .jpg went unreported; a link
    to a photo of the folder asked for it twice; a valid photo over 64 MiB was 'truncated'."""
    d = tmp_path / "dishes"
    d.mkdir()
    Image.new("RGB", (300, 300), (200, 120, 60)).save(d / "pie.jpg")
    Image.new("RGB", (300, 300), (20, 120, 60)).save(os.fsdecode(bytes(d / "bad") + b"\xff\xfe.jpg"))
    os.mkfifo(d / "pipe.jpg")
    (d / "link.jpg").symlink_to(d / "pie.jpg")
    report = RunReport("dish-prompts")
    reqs = dish_requests(d, report=report)
    assert [r["photo"] for r in reqs] == ["pie.jpg"]
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert reasons == {"bad\ufffd\ufffd.jpg": "bad_file_name", "pipe.jpg": "not_a_regular_file",
                       "link.jpg": "duplicate_photo"}
    json.dumps(report.to_json())  # the report can be written
    (tmp_path / "secret.json").write_text(json.dumps({"pie.jpg": "SECRET"}))
    for target in ("fifo", tmp_path / "secret.json", "/dev/zero", "deep"):
        (d / "titles.json").unlink(missing_ok=True)
        if target == "fifo":
            os.mkfifo(d / "titles.json")
        elif target == "deep":
            (d / "titles.json").write_text("[" * 100000 + "]" * 100000)
        else:
            (d / "titles.json").symlink_to(target)
        with pytest.raises(ImageError, match="titles.json: (must be a regular file inside|not readable JSON)"):
            dish_requests(d)


def test_cli_dish_prompts_then_synthesize_openai(server, tmp_path):
    d = tmp_path / "dishes"
    d.mkdir()
    Image.new("RGB", (300, 300), (200, 120, 60)).save(d / "pad_thai.jpg")
    runner = CliRunner()
    res = runner.invoke(app, ["data", "dish-prompts", str(d), "--out", str(tmp_path / "dish.jsonl")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["data", "synthesize", str(tmp_path / "dish.jsonl"), "--out", str(tmp_path / "ds"),
                              "--api", "openai", "--url", server.url + "/v1", "--model", "m", "--image-root", str(d),
                              "--price-input", "1", "--price-text", "2", "--price-image", "10"])
    assert res.exit_code == 0, res.output
    ds = Dataset(tmp_path / "ds")
    (rec,) = list(ds)
    # 80 prompt tokens x $1/M + 30 text x $2/M + 3000 image x $10/M
    assert rec.meta["cost_usd"] == pytest.approx((80 * 1 + 30 * 2 + 3000 * 10) / 1e6)
    assert "cost $0.0301 this run" in res.output
    # no prices for --api openai and no key in the environment: both said before the run (the cost read $0 silently)
    res = runner.invoke(app, ["data", "synthesize", str(tmp_path / "dish.jsonl"), "--out", str(tmp_path / "ds4"),
                              "--api", "openai", "--url", server.url + "/v1", "--model", "m", "--image-root", str(d),
                              "--api-key-env", "DUETGEN_TEST_NO_SUCH_KEY"])
    assert res.exit_code == 0, res.output
    assert "no prices for --api openai" in res.output and "$DUETGEN_TEST_NO_SUCH_KEY is not set" in res.output
    # an API that never answers: no record, and the exit code says so (it was 0)
    res = runner.invoke(app, ["data", "synthesize", str(tmp_path / "dish.jsonl"), "--out", str(tmp_path / "ds5"),
                              "--api", "openai", "--url", "http://127.0.0.1:1/v1", "--model", "m", "--image-root",
                              str(d), "--max-retries", "0"])
    assert res.exit_code == 2 and "no record written: 1 API request(s) failed" in res.output, res.output
    res = runner.invoke(app, ["data", "synthesize", str(tmp_path / "dish.jsonl"), "--out", str(tmp_path / "ds2"),
                              "--api", "dalle"])
    assert res.exit_code == 2 and "--api" in res.output
    res = runner.invoke(app, ["data", "synthesize", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "ds3"),
                              "--url", server.url])
    assert res.exit_code == 2 and "missing.jsonl" in res.output


def test_a_torn_log_line_is_dropped_by_the_next_append_not_left_mid_file(tmp_path):
    """A review: an append after a torn last line (a kill mid-write) kept the torn line mid-file, and every later
    read of the log raised. The torn line is an unfinished item: the next append drops it."""
    from duetgen.data.synthetic.runlog import ProgressLog

    log = ProgressLog(tmp_path / "log.jsonl")
    log.append({"key": "a", "status": "dropped"})
    with open(log.path, "ab") as f:
        f.write(b'{"key": "b", "status": "dro')  # killed mid-line
    assert [e["key"] for e in log.entries()] == ["a"]  # a torn last line is forgiven
    log.append({"key": "c", "status": "dropped"})
    log.append({"key": "d", "status": "dropped"})
    assert [e["key"] for e in log.entries()] == ["a", "c", "d"]
    log.clear()
    assert list(log.entries()) == []


def test_a_full_disk_during_the_journal_replay_keeps_the_journal(tmp_path, monkeypatch):
    """A review: the replay went on after a failed write; the writer had dropped its open shard, so answers
    written before the failure were in neither the dataset, the progress log nor the (cleared) journal."""
    import errno

    from duetgen.data.dataset import DatasetWriter
    from duetgen.data.record import Message, Record, TextPart
    from duetgen.data.synthetic.runlog import ProgressLog
    from duetgen.data.synthetic.synthesize import ANSWERS_FILE, commit_journaled_answers

    out = tmp_path / "out"
    out.mkdir()
    journal = ProgressLog(out / ANSWERS_FILE)
    for key in "abcd":
        rec = Record(id=f"syn-{key}", meta={"request_id": key}, messages=[Message("user", [TextPart(key)])])
        journal.append({"key": key, "cost_usd": 0.01, "record": rec.to_jsonl_line()})
    journal.append({"key": "e", "cost_usd": 0.5, "record": "{not a record"})  # lost: logged once, not per retry
    real_write, calls = DatasetWriter.write, []

    def write(self, rec):
        calls.append(rec.id)
        if len(calls) == 3:  # what the writer does when the disk is full mid-shard: it drops the open shard
            raise self._abort_shard(OSError(errno.ENOSPC, "No space left on device"))
        return real_write(self, rec)

    monkeypatch.setattr(DatasetWriter, "write", write)
    with pytest.raises(OSError):
        commit_journaled_answers(out, shard_size=10, report=RunReport("synthesize"))
    monkeypatch.undo()
    assert [e["key"] for e in ProgressLog(out / ANSWERS_FILE).entries()] == list("abcde")  # nothing forgotten
    assert not (out / PROGRESS_FILE).exists() or "lost" not in (out / PROGRESS_FILE).read_text()
    report = RunReport("synthesize")
    commit_journaled_answers(out, shard_size=10, report=report)  # the disk has room again
    assert sorted(r.meta["request_id"] for r in Dataset(out)) == list("abcd")
    assert report.counts["committed_from_journal"] == 4
    assert [e["key"] for e in ProgressLog(out / PROGRESS_FILE).entries() if e["status"] == "lost"] == ["e"]


def test_request_lines_json_cannot_read_are_skipped_not_fatal(tmp_path, monkeypatch):
    """json's own ValueError (an integer of over 4,300 digits) and RecursionError (deep nesting) crashed
    load_requests at the same line on every run, and the file was read whole (a 300 MB line was accepted; one
    byte that is not UTF-8 anywhere refused the whole file); each is one skipped request now."""
    import duetgen.data.synthetic.synthesize as synthesize_module

    monkeypatch.setattr(synthesize_module, "MAX_RECORD_LINE_BYTES", 8192)
    reqs = write_requests(tmp_path / "requests.jsonl", [
        '{"id": "big", "prompt": "p", "n": ' + "9" * 5000 + "}", "[" * 3000 + "]" * 3000,
        {"id": "long", "prompt": "x" * 10_000}, {"id": "good", "prompt": "How do I fold a fitted sheet?"}])
    with open(reqs, "ab") as f:
        f.write(b'{"id": "latin", "prompt": "caf\xe9"}\n{"id": "last", "prompt": "How do I tie a tie?"}\n')
    report = RunReport("synthesize")
    assert [r["id"] for r in load_requests(reqs, None, report)] == ["good", "last"]
    why = {s["item"]: (s["reason"], s["detail"]) for s in report.skipped}
    assert why["requests.jsonl:1"][0] == "bad_request" and "4300" in why["requests.jsonl:1"][1]
    assert why["requests.jsonl:2"] == ("bad_request", "not readable JSON (nested too deeply)")
    assert why["requests.jsonl:3"] == ("bad_request", "a line over the cap of 8,192 bytes")
    assert why["requests.jsonl:5"][0] == "bad_request" and "utf-8" in why["requests.jsonl:5"][1]
