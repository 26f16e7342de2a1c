"""Video transition records for context alignment (paper section 3.2).

Following Bagel, the paper segments raw videos into 5-second clips inside detected scenes,
filters them, takes each clip's first and last frame and asks an MLLM (Qwen2.5-VL-32B) to
describe the transition: object motion, human actions, camera movement. Each clip becomes

    user: [first frame]    assistant: [transition caption, last frame]

so in the token stream it reads [first frame, caption, last frame]: the last frame is the only
generation target, conditioned on the first frame (a clean conditioning frame) and the caption.

Pipeline per video::

    PySceneDetect ContentDetector (PyAV backend)  -> scenes
    scenes -> 5 s windows inside each scene (a margin after each cut)
    one PyAV decode pass -> first/last frame + frames sampled every 0.5 s per window
    near-black / static windows dropped -> caption (LLM client, JSON) -> records

Design choices:
- Two decode passes (scene detection, then frames): PySceneDetect owns its decode loop; a
  second sequential pass is cheap next to the MLLM call and keeps both steps plain.
- Frames are counted in decode order in both passes, so PySceneDetect's frame numbers index
  the PyAV pass directly.
- Filters: a window is ``near_black`` if its first or last frame, or more than half of its
  samples, have mean luma <= 20/255; ``static`` if the mean absolute difference between
  consecutive samples (64x64 gray) is under 1.0/255. Both are measured, stored in meta.
- Bad videos never stop the run: unopenable / corrupt (``undecodable``), no video stream,
  no decodable frames (``no_frames``), truncated (windows past the last decodable frame are
  ``frames_missing``). Each is a reason in the report; records already written stay.
- Resume: a video is skipped when its progress entry says it completed and every record it
  listed is committed in the dataset; caption failures leave the video incomplete (retried).
- Frames are stored as JPEG (quality 95): they come from lossy video already, and PNG would
  be ~5x larger at 5M videos' scale.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from duetgen.data.dataset import DatasetWriter
from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart
from duetgen.data.synthetic.runlog import ProgressLog, RunReport, committed_records

TEMPLATE_DIR = Path(__file__).parent / "templates"
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v"}
PROGRESS_FILE = "transitions-progress.jsonl"


@dataclass
class TransitionConfig:
    window_s: float = 5.0  # clip length (paper section 3.2, after Bagel: 5-second clips)
    stride_s: float | None = None  # distance between window starts; None = window_s (no overlap)
    scene_threshold: float = 27.0  # PySceneDetect ContentDetector threshold (its default)
    min_scene_s: float = 0.5  # shortest scene the detector may report
    cut_margin_s: float = 0.2  # skipped after a cut and before the next one (blended frames)
    sample_every_s: float = 0.5  # frames sampled inside a window for the static / dark checks
    static_threshold: float = 1.0  # mean abs diff of consecutive 64x64 gray samples (0-255) below -> static
    black_luma: float = 20.0  # mean luma (0-255) at or below which a frame is near-black
    max_black_fraction: float = 0.5  # more near-black samples than this -> near_black
    max_side: int = 1024  # stored frames are downscaled so the longer side is at most this
    max_windows_per_video: int = 64  # cap on clips from one long video
    max_video_bytes: int = 8 << 30  # larger files are skipped (too_large)
    max_frames: int = 2_000_000  # decode cap per video (~23 h at 24 fps)
    caption_batch: int = 32  # windows captioned together (across videos) in one LLM batch
    min_caption_chars: int = 10  # shorter captions are caption_failed
    shard_size: int = 500  # records per committed shard


@dataclass
class Window:
    video: str
    video_key: str
    scene: int
    first: int  # frame index of the first frame
    last: int  # frame index of the last frame
    fps: float
    samples: list[int] = field(default_factory=list)
    first_jpeg: bytes | None = None
    last_jpeg: bytes | None = None
    lumas: list[float] = field(default_factory=list)
    grays: list[np.ndarray] = field(default_factory=list)
    motion: float = 0.0

    @property
    def record_id(self) -> str:
        return f"video-{self.video_key}-{self.first:08d}"


class VideoError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- inputs
def find_videos(inputs: list[str | Path], outside: list[Path] | None = None) -> list[Path]:
    """Video files among ``inputs`` (files, or folders searched recursively), sorted, no repeats. A file in a folder
    that resolves outside it (a symlink pointing out) is not taken: it goes to ``outside`` (an audit found one read
    and stored; ``dish-prompts`` and ``adapt`` refuse such files too)."""
    out: list[Path] = []
    for x in inputs:
        p = Path(x)
        if p.is_dir():
            root = p.resolve()
            for q in sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in VIDEO_SUFFIXES):
                if q.resolve().is_relative_to(root):
                    out.append(q)
                elif outside is not None:
                    outside.append(q)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"video input {str(p)!r} does not exist")
    seen, uniq = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


def video_key(path: Path) -> str:
    """Stable id of a video file: resolved path, size and mtime (no need to hash gigabytes)."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- scenes and windows
def detect_scenes(path: Path, cfg: TransitionConfig) -> tuple[list[tuple[int, int]], float, int]:
    """([(start frame, end frame exclusive)], fps, frames decoded) with PySceneDetect's PyAV backend."""
    from scenedetect import ContentDetector, SceneManager
    from scenedetect.backends.pyav import VideoStreamAv

    import av

    logging.getLogger("pyscenedetect").setLevel(logging.ERROR)
    try:  # probe first: PySceneDetect's errors for "no video stream" are unhelpful
        with av.open(str(path)) as container:
            has_video = bool(container.streams.video)
    except Exception as e:  # av.error.*, OSError: any failure to open is bad input
        raise VideoError("undecodable", f"{type(e).__name__}: {e}") from None
    if not has_video:
        raise VideoError("no_video_stream", "the file has no video stream")
    try:
        video = VideoStreamAv(str(path))
    except Exception as e:  # VideoOpenFailure, av errors, OSError: any failure to open is bad input
        raise VideoError("undecodable", f"{type(e).__name__}: {e}") from None
    fps = float(video.frame_rate)
    if not fps or fps <= 0 or fps > 1000:
        raise VideoError("undecodable", f"implausible frame rate {fps}")
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=cfg.scene_threshold,
                                         min_scene_len=max(1, int(round(cfg.min_scene_s * fps)))))
    try:
        n = manager.detect_scenes(video, end_time=cfg.max_frames)
    except Exception as e:
        raise VideoError("undecodable", f"scene detection failed: {type(e).__name__}: {e}") from None
    if n == 0:
        raise VideoError("no_frames", "no decodable video frames")
    scenes = [(a.frame_num, b.frame_num) for a, b in manager.get_scene_list(start_in_scene=True)]
    return [(a, min(b, n)) for a, b in scenes if min(b, n) > a], fps, n


def plan_windows(video: str, key: str, scenes: list[tuple[int, int]], fps: float, cfg: TransitionConfig,
                 report: RunReport) -> list[Window]:
    """Non-overlapping (by default) windows of ``window_s`` inside each scene, with sample frames."""
    wlen = int(round(cfg.window_s * fps))
    stride = int(round((cfg.stride_s or cfg.window_s) * fps))
    margin = int(round(cfg.cut_margin_s * fps))
    step = max(1, int(round(cfg.sample_every_s * fps)))
    out: list[Window] = []
    for k, (a, b) in enumerate(scenes):
        start = a + (margin if k > 0 else 0)  # the video's own start is not a cut
        end = b - (margin if k < len(scenes) - 1 else 0)
        if end - start < wlen:
            report.count("scenes_shorter_than_window")
            continue
        for s in range(start, end - wlen + 1, stride):
            last = s + wlen - 1
            samples = sorted(set(list(range(s, last, step)) + [last]))
            out.append(Window(video, key, k, s, last, fps, samples))
            if len(out) >= cfg.max_windows_per_video:
                return out
    return out


def extract_frames(path: Path, windows: list[Window], cfg: TransitionConfig) -> int:
    """One PyAV pass: fill first/last JPEGs, sample lumas and grays. Returns frames decoded.

    A decode error after some frames (a truncated file) stops the pass; windows that needed
    later frames keep ``None`` and are dropped by the caller as ``frames_missing``.
    """
    import av
    from PIL import Image

    need: dict[int, list[tuple[Window, str]]] = {}
    for w in windows:
        need.setdefault(w.first, []).append((w, "first"))
        need.setdefault(w.last, []).append((w, "last"))
        for i in w.samples:
            need.setdefault(i, []).append((w, "sample"))
    if not need:
        return 0
    last_needed = max(need)
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no_video_stream", "the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in need:
                    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                    im = Image.fromarray(rgb)
                    small = np.asarray(im.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float32)
                    luma = float(small.mean())
                    for w, role in need[i]:
                        if role == "sample":
                            w.lumas.append(luma)
                            w.grays.append(small)
                        else:
                            setattr(w, f"{role}_jpeg", _jpeg(im, cfg.max_side))
                if i >= last_needed:
                    break
    except VideoError:
        raise
    except Exception as e:  # av.error.*: truncated or corrupt data after the frames we have
        if decoded == 0:
            raise VideoError("undecodable", f"{type(e).__name__}: {e}") from None
    if decoded == 0:
        raise VideoError("no_frames", "no decodable video frames")
    return decoded


def _jpeg(im, max_side: int) -> bytes:
    from PIL import Image

    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def window_problem(w: Window, cfg: TransitionConfig) -> tuple[str, str]:
    """("", "") if the window is usable, else (reason, detail). Sets ``w.motion``."""
    if w.first_jpeg is None or w.last_jpeg is None or len(w.grays) < len(w.samples):
        return "frames_missing", f"frames {w.first}-{w.last} not all decodable (truncated file?)"
    dark = [l <= cfg.black_luma for l in w.lumas]
    first_dark, last_dark = dark[0], dark[-1]  # samples include the first and the last frame
    if first_dark or last_dark or sum(dark) > cfg.max_black_fraction * len(dark):
        return "near_black", f"{sum(dark)}/{len(dark)} samples with mean luma <= {cfg.black_luma}"
    diffs = [float(np.abs(a - b).mean()) for a, b in zip(w.grays, w.grays[1:])]
    w.motion = float(np.mean(diffs)) if diffs else 0.0
    if w.motion < cfg.static_threshold:
        return "static", f"mean frame difference {w.motion:.2f} < {cfg.static_threshold}"
    return "", ""


# ----------------------------------------------------------------------------- run
def build_transitions(videos: list[Path], client, out_dir: str | Path, cfg: TransitionConfig,
                      report: RunReport | None = None, progress: bool = True) -> RunReport:
    """Process ``videos`` into transition records in the dataset ``out_dir``; save and return the report."""
    from duetgen.llm.templates import PromptTemplate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = report or RunReport("transitions")
    report.config.update({"model": client.model, "transitions": asdict(cfg)})
    template = PromptTemplate.load("transition_caption", root=TEMPLATE_DIR)
    committed = {r.id for r in committed_records(out_dir)}
    log = ProgressLog(out_dir / PROGRESS_FILE)
    done_videos = {e["key"] for e in log.entries()
                   if e.get("complete") and all(i in committed for i in e.get("records", []))}
    try:
        with DatasetWriter(out_dir, shard_size=cfg.shard_size, append=True, name=out_dir.name) as writer:
            _run(videos, client, writer, template, cfg, report, log, committed, done_videos, progress)
        report.extra["dataset_records"] = writer.num_records
    finally:
        report.extra["llm_totals"] = client.usage_totals
        report.save(out_dir)
    return report


def _run(videos, client, writer, template, cfg, report, log, committed, done_videos, progress) -> None:
    pending: list[Window] = []  # usable windows waiting for captions
    open_videos: dict[str, dict[str, Any]] = {}  # video key -> progress entry being built

    def flush() -> None:
        if not pending:
            return
        reqs = []
        for w in pending:
            msgs = template.render(first=w.first_jpeg, last=w.last_jpeg,
                                   seconds=f"{(w.last - w.first) / w.fps:.1f}")
            reqs.append((msgs, template.chat_kwargs()))
        results = client.chat_many(reqs, progress=False)
        for w, res in zip(pending, results):
            entry = open_videos[w.video_key]
            caption = (res.data or {}).get("caption", "").strip() if res.ok else ""
            if len(caption) < cfg.min_caption_chars:
                report.skip(f"{w.video}@{w.first / w.fps:.1f}s", "caption_failed",
                            res.error or f"caption too short: {caption!r}")
                entry["complete"] = False
                continue
            rec = Record(id=w.record_id, source="video", messages=[
                Message("user", [ImagePart(w.first_jpeg)]),
                Message("assistant", [TextPart(caption), ImagePart(w.last_jpeg)])],
                meta={"video": w.video, "video_key": w.video_key, "scene": w.scene,
                      "start_s": round(w.first / w.fps, 3), "end_s": round(w.last / w.fps, 3),
                      "first_frame": w.first, "last_frame": w.last, "fps": round(w.fps, 3),
                      "motion": round(w.motion, 3), "mean_luma": round(float(np.mean(w.lumas)), 2),
                      "caption_model": res.model, "template": template.version_key})
            try:
                writer.write(rec)
            except RecordError as e:
                report.skip(f"{w.video}@{w.first / w.fps:.1f}s", "bad_image", str(e))
                entry["complete"] = False
                continue
            entry["records"].append(rec.id)
            report.count("written")
        pending.clear()

    def close_ready() -> None:
        # a video is closed once all its windows went through flush()
        for key in list(open_videos):
            e = open_videos[key]
            if not any(w.video_key == key for w in pending):
                log.append({"key": key, "video": e["video"], "complete": e["complete"], "records": e["records"]})
                del open_videos[key]

    bar = _VideoBar(progress, len(videos))
    try:
        for path in videos:
            name = str(path)
            try:
                key = video_key(path)
            except OSError as e:
                report.skip(name, "unreadable", str(e))
                bar.advance()
                continue
            if key in done_videos:
                report.count("videos_already_done")
                bar.advance()
                continue
            report.count("videos")
            try:
                if path.stat().st_size > cfg.max_video_bytes:
                    raise VideoError("too_large", f"{path.stat().st_size:,} bytes")
                scenes, fps, _ = detect_scenes(path, cfg)
                planned = plan_windows(name, key, scenes, fps, cfg, report)
                windows = [w for w in planned if w.record_id not in committed]
                extract_frames(path, windows, cfg)
            except VideoError as e:
                report.skip(name, e.reason, e.detail)
                bar.advance()
                continue
            report.count("scenes", len(scenes))
            # records of this video committed by an earlier, interrupted run count as its output
            open_videos[key] = {"video": name, "complete": True,
                                "records": [w.record_id for w in planned if w.record_id in committed]}
            for w in windows:
                reason, detail = window_problem(w, cfg)
                if reason:
                    report.skip(f"{name}@{w.first / fps:.1f}s", reason, detail)
                    continue
                w.grays = []  # only the JPEGs are needed from here on
                pending.append(w)
                if len(pending) >= cfg.caption_batch:
                    flush()
            close_ready()
            bar.advance()
        flush()
        close_ready()
    finally:
        bar.close()


class _VideoBar:
    def __init__(self, enabled: bool, total: int):
        self.p = None
        if enabled:
            from rich.progress import Progress

            self.p = Progress()
            self.p.start()
            self.task = self.p.add_task("videos", total=total)

    def advance(self) -> None:
        if self.p is not None:
            self.p.advance(self.task)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
