"""Training logs: JSONL metrics (resume-trimmed), TensorBoard scalars read back, sample pages."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from duetgen.data.dataset import DatasetWriter
from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.train.logging import MetricsLogger, read_metrics, write_samples_html


def test_jsonl_and_tensorboard_get_every_step_and_a_resume_trims_the_lost_ones(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, total_steps=10, progress=False) as log:
        for step in range(1, 7):
            entry = log.log(step, loss=torch.tensor(1.0 / step), lr=1e-3 * step, items=100, grad_norm=0.5)
            time.sleep(0.001)
        log.log_scalars(6, "eval", accuracy=0.75)
    assert "tok_per_s" not in read_metrics(tmp_path / "metrics.jsonl")[0]  # the first call only starts the clock
    assert entry["tok_per_s"] > 0 and entry["loss"] == pytest.approx(1 / 6)

    # a run killed after step 6 resumes from its step-4 checkpoint: steps 5-6 are redone, not doubled
    with MetricsLogger(tmp_path, total_steps=10, start_step=4, progress=False) as log:
        for step in range(5, 8):
            log.log(step, loss=10.0 + step, lr=1.0)
    got = read_metrics(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in got] == [1, 2, 3, 4, 5, 6, 7]
    assert [e["loss"] for e in got[4:]] == [15.0, 16.0, 17.0]

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tok_per_s", "eval/accuracy"} <= tags
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert losses[2] == pytest.approx(0.5)
    assert losses[5] == pytest.approx(15.0)  # the purged first-run value is gone


def test_disabled_logger_is_a_no_op_and_bad_values_are_named(tmp_path):
    log = MetricsLogger(tmp_path / "off", total_steps=3, enabled=False)
    assert log.log(1, loss=1.0, lr=1.0) == {}
    log.close()
    assert not (tmp_path / "off").exists()
    with MetricsLogger(tmp_path, total_steps=3, progress=False, tensorboard=False) as log:
        with pytest.raises(TypeError, match="metric 'loss'"):
            log.log(1, loss="high", lr=1.0)
    with pytest.raises(ValueError, match="start_step"):
        MetricsLogger(tmp_path, total_steps=3, start_step=5)


def test_a_truncated_last_line_from_a_kill_is_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    MetricsLogger(tmp_path, total_steps=5, start_step=1, progress=False, tensorboard=False).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]


def test_samples_page_writes_in_memory_images_links_dataset_images_and_escapes_text(tmp_path):
    canvas = Image.new("RGB", (16, 16), (220, 40, 40))
    with DatasetWriter(tmp_path / "ds") as w:
        stored = w.add_image(Image.new("RGB", (8, 8), (40, 90, 220)))
        w.write(Record(id="r0", messages=[Message("user", [TextPart("hi"), ImagePart(stored)])]))
    from duetgen.data.dataset import Dataset

    rec = Record(id="gen-<1>", source="step-100", messages=[
        Message("user", [TextPart("Draw <b>a red square</b>"), ImagePart(stored)]),
        Message("assistant", [TextPart("Step 1: done."), ImagePart(canvas)])])
    page = write_samples_html(tmp_path / "samples" / "step-0000100.html", [rec], title="samples at step 100",
                              dataset=Dataset(tmp_path / "ds"))
    html = page.read_text()
    assert "Draw &lt;b&gt;a red square&lt;/b&gt;" in html and "<b>a red square" not in html
    assert "gen-&lt;1&gt;" in html
    png = tmp_path / "samples" / "step-0000100_files" / "0000-01-01.png"
    assert Image.open(png).getpixel((3, 3)) == (220, 40, 40)
    assert 'src="step-0000100_files/0000-01-01.png"' in html
    assert f'src="../ds/{stored}"' in html

    no_ds = write_samples_html(tmp_path / "p2.html", [rec], title="t")
    assert "no dataset was given" in no_ds.read_text()  # shown in place, the page still renders
    with pytest.raises(Exception, match="not an image"):
        write_samples_html(tmp_path / "p3.html", [Record(id="x", messages=[Message("assistant", [ImagePart(3)])])],
                           title="t")
