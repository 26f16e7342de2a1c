"""Video transition records (paper section 3.2) on videos written by the test itself.

The standard video (tests/fixtures/alignment/make_videos.py) is 26 s at 10 fps: a yellow square
sliding over blue (0-6 s), a hard cut to a white square sliding over red (6-13 s), a hard cut to
a still frame (13-19 s), a cut to black (19-26 s). Expected: scene cuts at 6, 13 and 19 s; one
5 s window in each of the first two scenes kept; the still window dropped as static, the black
one as near_black. Captions come from a local OpenAI-compatible server over real HTTP.
"""

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from duetgen.data.alignment.transitions import (TransitionConfig, build_transitions, detect_scenes, find_videos,
                                                plan_windows, window_problem)
from duetgen.data.dataset import Dataset
from duetgen.data.synthetic.runlog import RunReport
from duetgen.llm.client import LLMClient
from duetgen.llm.testing import FakeOpenAIServer

sys.path.insert(0, str(Path(__file__).parent))
from fixtures.alignment.make_videos import (STANDARD, audio_only, scripted_video, truncated_copy,  # noqa: E402
                                            zeroed_payload_copy)

CAPTION = "The square slides from the left edge to the right edge while the camera stays still."


def caption_server(captions=None):
    return FakeOpenAIServer(responder=lambda body: json.dumps({"caption": CAPTION})).start()


def sent_images(body: dict) -> list[Image.Image]:
    parts = [p for m in body["messages"] if m["role"] == "user" for p in m["content"] if p["type"] == "image_url"]
    return [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))).convert("RGB")
            for p in parts]


def square_x(im: Image.Image, bg) -> float:
    """Mean x of the pixels that differ from the background colour (the moving square)."""
    a = np.asarray(im, dtype=np.int32)
    mask = np.abs(a - np.array(bg)).sum(-1) > 120
    return float(np.nonzero(mask)[1].mean())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    good = scripted_video(d / "a_standard.mkv", STANDARD)
    truncated_copy(scripted_video(d / "b_standard.mp4", STANDARD), d / "c_truncated.mp4", 0.5)  # no moov atom
    (d / "b_standard.mp4").unlink()
    truncated_copy(good, d / "d_truncated.mkv", 0.5)  # decodable prefix (first ~7 s)
    zeroed_payload_copy(good, d / "e_no_frames.mkv")
    audio_only(d / "f_audio_only.mkv")
    (d / "g_garbage.webm").write_bytes(b"\x00\x01garbage" * 300)
    return d


def test_scenes_windows_and_filters(videos):
    cfg = TransitionConfig()
    scenes, fps, n = detect_scenes(videos / "a_standard.mkv", cfg)
    assert fps == 10 and n == 260
    assert scenes == [(0, 60), (60, 130), (130, 190), (190, 260)]
    report = RunReport("t")
    windows = plan_windows("a", "k", scenes, fps, cfg, report)
    # a 2 s margin-less start, 0.2 s margins at cuts, 5 s = 50 frames per window
    assert [(w.first, w.last) for w in windows] == [(0, 49), (62, 111), (132, 181), (192, 241)]
    assert windows[0].samples[0] == 0 and windows[0].samples[-1] == 49


def test_records_frames_captions_and_bad_videos(videos, tmp_path):
    srv = caption_server()
    try:
        client = LLMClient(srv.url, "fake-vl")
        report = build_transitions(find_videos([videos]), client, tmp_path / "out", TransitionConfig(), progress=False)
    finally:
        srv.stop()
    ds = Dataset(tmp_path / "out")
    recs = sorted(ds, key=lambda r: (r.meta["video"], r.meta["start_s"]))
    standard = [r for r in recs if r.meta["video"].endswith("a_standard.mkv")]
    assert [(r.meta["start_s"], r.meta["end_s"]) for r in standard] == [(0.0, 4.9), (6.2, 11.1)]
    # [first frame] / [caption, last frame]: the last frame is the only generation target
    r0 = standard[0]
    assert [m.role for m in r0.messages] == ["user", "assistant"]
    assert len(r0.image_parts("user")) == 1 and len(r0.image_parts("assistant")) == 1
    assert r0.messages[1].text == CAPTION
    first = ds.open_image(r0.image_parts("user")[0].path, r0.id)
    last = ds.open_image(r0.image_parts("assistant")[0].path, r0.id)
    assert square_x(first, (30, 60, 160)) < 20 and square_x(last, (30, 60, 160)) > 70  # slid left -> right
    assert np.allclose(np.asarray(first)[2, 2], (30, 60, 160), atol=12)  # scene 0 background (blue)
    r1 = standard[1]
    assert np.allclose(np.asarray(ds.open_image(r1.image_parts("user")[0].path, r1.id))[2, 2], (200, 60, 40), atol=12)
    assert r0.meta["motion"] > 1.0 and r0.meta["scene"] == 0 and r1.meta["scene"] == 1

    # the MLLM saw exactly the two frames, first then last, and the clip length
    bodies = srv.bodies
    assert len(bodies) == 3  # two windows of the standard video + one of the decodable truncated prefix
    sent = [sent_images(b) for b in bodies]
    assert all(len(imgs) == 2 for imgs in sent)
    blue = [imgs for imgs in sent if np.allclose(np.asarray(imgs[0])[2, 2], (30, 60, 160), atol=12)]
    assert len(blue) == 2  # the first scene's window, in the full and in the truncated video
    for first_img, last_img in blue:
        assert square_x(first_img, (30, 60, 160)) < 20 and square_x(last_img, (30, 60, 160)) > 70
    assert all("4.9 seconds later" in json.dumps(b) for b in bodies)

    skips = {(Path(s["item"].split("@")[0]).name, s["reason"]) for s in report.skipped}
    assert ("a_standard.mkv", "static") in skips and ("a_standard.mkv", "near_black") in skips
    assert ("c_truncated.mp4", "undecodable") in skips
    assert ("e_no_frames.mkv", "no_frames") in skips
    assert ("f_audio_only.mkv", "no_video_stream") in skips
    assert ("g_garbage.webm", "undecodable") in skips
    truncated = [r for r in recs if r.meta["video"].endswith("d_truncated.mkv")]
    assert [r.meta["start_s"] for r in truncated] == [0.0]  # the cut-off second scene is too short
    assert report.counts["written"] == 3
    saved = json.loads(next((tmp_path / "out" / "reports").glob("transitions-*.json")).read_text())
    assert saved["skip_reasons"]["static"] >= 1
    from duetgen.data.view import render_dataset_html

    (page,) = render_dataset_html(tmp_path / "out", tmp_path / "view.html", progress=False)
    assert page.read_text().count("<img") == 6 and CAPTION in page.read_text()


def test_resume_skips_done_videos_and_retries_failed_captions(videos, tmp_path):
    vids = [videos / "a_standard.mkv"]
    calls = {"n": 0}

    def flaky(body):
        calls["n"] += 1
        return "not json at all" if calls["n"] == 1 else json.dumps({"caption": CAPTION})

    srv = FakeOpenAIServer(responder=flaky).start()
    try:
        client = LLMClient(srv.url, "fake-vl")
        r1 = build_transitions(vids, client, tmp_path / "out", TransitionConfig(), progress=False)
        assert r1.skip_reasons["caption_failed"] == 1 and r1.counts["written"] == 1
        n_before = srv.requests
        r2 = build_transitions(vids, client, tmp_path / "out", TransitionConfig(), progress=False)
        assert srv.requests == n_before + 1  # only the failed window is asked again
        assert r2.counts["written"] == 1
        assert len(Dataset(tmp_path / "out")) == 2
        r3 = build_transitions(vids, client, tmp_path / "out", TransitionConfig(), progress=False)
        assert srv.requests == n_before + 1 and r3.counts["videos_already_done"] == 1
        assert len(Dataset(tmp_path / "out")) == 2
    finally:
        srv.stop()


class ExplodingClient:
    """Captions the first batch, then dies: a crash in the middle of a run."""

    def __init__(self, inner):
        self.inner, self.model, self.batches = inner, inner.model, 0

    def chat_many(self, reqs, progress=True):
        self.batches += 1
        if self.batches > 1:
            raise RuntimeError("simulated crash")
        return self.inner.chat_many(reqs, progress=progress)

    @property
    def usage_totals(self):
        return self.inner.usage_totals


def test_crash_keeps_what_was_written(videos, tmp_path):
    srv = caption_server()
    try:
        cfg = TransitionConfig(caption_batch=1, shard_size=1)
        client = ExplodingClient(LLMClient(srv.url, "fake-vl"))
        with pytest.raises(RuntimeError, match="simulated crash"):
            build_transitions([videos / "a_standard.mkv"], client, tmp_path / "out", cfg, progress=False)
        assert len(Dataset(tmp_path / "out")) == 1  # the first window survived the crash
        report = build_transitions([videos / "a_standard.mkv"], LLMClient(srv.url, "fake-vl"), tmp_path / "out",
                                   cfg, progress=False)
        assert report.counts["written"] == 1 and len(Dataset(tmp_path / "out")) == 2
    finally:
        srv.stop()


def test_window_problem_thresholds():
    from duetgen.data.alignment.transitions import Window

    cfg = TransitionConfig()
    w = Window("v", "k", 0, 0, 9, 10.0, samples=[0, 5, 9], first_jpeg=b"x", last_jpeg=b"x",
               lumas=[100, 100, 100], grays=[np.full((64, 64), 100.0, np.float32)] * 3)
    assert window_problem(w, cfg)[0] == "static"
    w.grays = [np.full((64, 64), v, np.float32) for v in (100.0, 110.0, 120.0)]
    assert window_problem(w, cfg) == ("", "") and w.motion == pytest.approx(10.0)
    w.lumas = [10, 100, 100]  # first frame near-black
    assert window_problem(w, cfg)[0] == "near_black"
    w.lumas, w.last_jpeg = [100, 100, 100], None
    assert window_problem(w, cfg)[0] == "frames_missing"


def test_cli_transitions(videos, tmp_path):
    from typer.testing import CliRunner

    from duetgen.cli import app

    srv = caption_server()
    try:
        res = CliRunner().invoke(app, ["data", "transitions", str(videos / "a_standard.mkv"), str(videos / "g_garbage.webm"),
                                       "--out", str(tmp_path / "out"), "--llm-url", srv.url, "--llm-model", "fake-vl"])
    finally:
        srv.stop()
    assert res.exit_code == 0, res.output
    assert "wrote 2 records from 2 videos" in res.output and "undecodable" in res.output
    assert len(Dataset(tmp_path / "out")) == 2
    res = CliRunner().invoke(app, ["data", "transitions", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o2"),
                                   "--llm-url", "http://127.0.0.1:9/v1", "--llm-model", "m"])
    assert res.exit_code == 2 and "nothing-here" in res.output
    # a captioner that always fails: no record, and the exit code says so (it was 0)
    srv = FakeOpenAIServer(responder=lambda body: "not json at all").start()
    try:
        res = CliRunner().invoke(app, ["data", "transitions", str(videos / "a_standard.mkv"), "--out",
                                       str(tmp_path / "o3"), "--llm-url", srv.url, "--llm-model", "fake-vl"])
    finally:
        srv.stop()
    assert res.exit_code == 2 and "no record written: 2 caption request(s) failed" in res.output, res.output


def test_a_video_symlink_leaving_its_folder_is_not_taken(tmp_path):
    """An audit: `link.mp4 -> /elsewhere/secret.mp4` in an input folder was decoded and its frames stored."""
    from duetgen.data.alignment.transitions import find_videos

    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.mp4").write_bytes(b"x")
    (tmp_path / "in" / "sub" / "own.mp4").write_bytes(b"x")
    (tmp_path / "in" / "link.mp4").symlink_to(tmp_path / "elsewhere" / "secret.mp4")
    (tmp_path / "in" / "inner.mp4").symlink_to(tmp_path / "in" / "sub" / "own.mp4")  # stays inside: the same file
    outside: list = []
    assert find_videos([tmp_path / "in"], outside) == [tmp_path / "in" / "inner.mp4"]
    assert outside == [tmp_path / "in" / "link.mp4"]

