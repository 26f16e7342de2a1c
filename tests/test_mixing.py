"""Weighted, seeded mixture of datasets into a stage-2 training manifest."""

import json
import os
from collections import Counter

import pytest
from typer.testing import CliRunner

from duetgen.cli import app
from duetgen.data.mixing import Mixture, allocate, build_mixture, draw, parse_mix_config
from duetgen.data.dataset import DatasetError, DatasetWriter
from duetgen.data.record import Message, Record, TextPart


def make_ds(root, name, n, shard_size=3):
    with DatasetWriter(root, shard_size=shard_size) as w:
        for i in range(n):
            w.write(Record(id=f"{name}-{i}", source=name,
                           messages=[Message("user", [TextPart(f"{name} question {i}")]),
                                     Message("assistant", [TextPart(f"{name} answer {i}")])]))
    return str(root)


@pytest.fixture()
def three(tmp_path):
    return [("video", make_ds(tmp_path / "video", "video", 10), 4.0),
            ("edit", make_ds(tmp_path / "edit", "edit", 4), 3.0),
            ("howto", make_ds(tmp_path / "howto", "howto", 7), 1.0)]


def sources(spec):
    return parse_mix_config({"datasets": [{"name": n, "path": p, "weight": w} for n, p, w in spec]})[0]


def test_allocate_sums_exactly_and_follows_weights():
    assert allocate([4, 3, 1], 40) == [20, 15, 5]
    assert sum(allocate([1, 1, 1], 100)) == 100 and allocate([1, 1, 1], 100) == [34, 33, 33]
    assert allocate([0.5, 0.25, 0.25], 3) == [1, 1, 1]  # floors 1,0,0; remainders .5 < .75 = .75
    assert allocate([1e308, 1e308], 10) == [5, 5]  # finite weights whose sum overflows (an audit: 1 + 1 of 10)
    assert allocate([1, 2, 4, 9, 4], 10) == [1, 1, 2, 4, 2]  # an exact tie (.5, .5): the earlier dataset first


def test_draw_repeats_only_in_whole_passes():
    import numpy as np

    idx = draw(4, 10, np.random.default_rng(0))
    assert len(idx) == 10
    assert sorted(idx[:4]) == [0, 1, 2, 3] and sorted(idx[4:8]) == [0, 1, 2, 3]
    assert len(set(idx[8:].tolist())) == 2  # the remainder has no repeats


def test_mixture_counts_determinism_and_reading(three, tmp_path):
    m = build_mixture(sources(three), 40, seed=7, out_path=tmp_path / "mix.json")
    assert [s["num_drawn"] for s in m["sources"]] == [20, 15, 5]
    assert m["sources"][1]["epochs"] == 3.75  # 15 draws of a 4-record dataset
    counts = Counter(k for k, _ in m["samples"])
    assert counts == {0: 20, 1: 15, 2: 5}
    # every record of "edit" is drawn 3 or 4 times (whole passes first)
    per_edit = Counter(i for k, i in m["samples"] if k == 1)
    assert set(per_edit.values()) <= {3, 4} and len(per_edit) == 4

    again = build_mixture(sources(three), 40, seed=7, out_path=tmp_path / "mix2.json")
    assert again["samples"] == m["samples"]
    other = build_mixture(sources(three), 40, seed=8, out_path=tmp_path / "mix3.json")
    assert other["samples"] != m["samples"]

    mix = Mixture(tmp_path / "mix.json")
    assert len(mix) == 40
    seen = Counter()
    for i in range(len(mix)):
        name, rec = mix[i]
        k, idx = m["samples"][i]
        assert rec.id == f"{name}-{idx}" and name == ["video", "edit", "howto"][k]
        seen[name] += 1
    assert seen == {"video": 20, "edit": 15, "howto": 5}


def test_adding_a_dataset_does_not_change_what_others_draw_for_the_same_count(three, tmp_path):
    a = build_mixture(sources(three[:2]), None, seed=1, out_path=tmp_path / "a.json")
    va = [i for k, i in a["samples"] if k == 0]
    # "video" gets 8 draws in both mixes (4/7 of 14, then 4/8 of 16) -> the very same records
    b = build_mixture(sources(three), 16, seed=1, out_path=tmp_path / "b.json")
    assert a["sources"][0]["num_drawn"] == 8 and b["sources"][0]["num_drawn"] == 8
    vb = [i for k, i in b["samples"] if k == 0]
    assert sorted(va) == sorted(vb)


def test_changed_dataset_is_refused(three, tmp_path):
    build_mixture(sources(three), 10, seed=0, out_path=tmp_path / "mix.json")
    with DatasetWriter(three[1][1], append=True) as w:
        w.write(Record(id="edit-new", messages=[Message("user", [TextPart("x")])]))
    mix = Mixture(tmp_path / "mix.json")
    with pytest.raises(DatasetError, match="'edit'.*changed"):
        for i in range(len(mix)):
            mix[i]


def test_config_errors_name_the_entry(tmp_path):
    with pytest.raises(DatasetError, match=r"datasets\[0\].weight"):
        parse_mix_config({"datasets": [{"name": "a", "path": "p", "weight": -1}]})
    with pytest.raises(DatasetError, match="unknown key"):
        parse_mix_config({"datasets": [], "ratio": 1})
    with pytest.raises(DatasetError, match="unique"):
        build_mixture(sources([("a", "x", 1), ("a", "y", 1)]), 5, 0, tmp_path / "m.json")
    with pytest.raises(DatasetError, match="not a dataset directory"):
        build_mixture(sources([("a", str(tmp_path / "nowhere"), 1)]), 5, 0, tmp_path / "m.json")


def test_cli_mix_with_config_and_flags(three, tmp_path):
    cfg = {"seed": 3, "num_samples": 21, "datasets": [{"name": n, "path": p, "weight": w} for n, p, w in three]}
    (tmp_path / "mix.config.json").write_text(json.dumps(cfg))
    runner = CliRunner()
    res = runner.invoke(app, ["data", "mix", "--config", str(tmp_path / "mix.config.json"), "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert len(Mixture(tmp_path / "m.json")) == 21
    res = runner.invoke(app, ["data", "mix", "--out", str(tmp_path / "m2.json"), "--seed", "3", "--num-samples", "21"]
                        + sum([["--dataset", f"{n}={p}:{w}"] for n, p, w in three], []))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m2.json").read_text())["samples"] == json.loads((tmp_path / "m.json").read_text())["samples"]
    res = runner.invoke(app, ["data", "mix", "--out", str(tmp_path / "m3.json"), "--dataset", "broken"])
    assert res.exit_code == 2 and "NAME=PATH:WEIGHT" in res.output
    # an audit: a FIFO as --config hung the command; --out "" (a folder) was a traceback
    os.mkfifo(tmp_path / "fifo")
    res = runner.invoke(app, ["data", "mix", "--config", str(tmp_path / "fifo"), "--out", str(tmp_path / "m4.json")])
    assert res.exit_code == 2 and "not a regular file" in res.output
    res = runner.invoke(app, ["data", "mix", "--config", str(tmp_path / "mix.config.json"), "--out", ""])
    assert res.exit_code == 2 and "is empty" in res.output  # (session 14: refused as empty, not read as ".")
    res = runner.invoke(app, ["data", "mix", "--config", str(tmp_path / "mix.config.json"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in res.output


def test_a_negative_seed_or_a_mix_too_large_to_build_is_refused_by_name(three, tmp_path):
    """An audit: seed -1 passed the checks and raised in numpy (a traceback); 10^9 samples ran into a MemoryError."""
    with pytest.raises(DatasetError, match="seed must be a non-negative integer"):
        build_mixture(sources(three), 10, seed=-1, out_path=tmp_path / "m.json")
    with pytest.raises(DatasetError, match="'seed' must be a non-negative integer"):
        parse_mix_config({"seed": -1, "datasets": [{"name": n, "path": p, "weight": w} for n, p, w in three]})
    with pytest.raises(DatasetError, match="over the cap of 50,000,000"):
        build_mixture(sources(three), 50_000_001, seed=0, out_path=tmp_path / "m.json")



def test_a_mixture_reads_as_every_dataset_reader_does(three, tmp_path):
    """An audit: the mixture reader skipped the readers' checks (a shard linked out of its root read another
    dataset's records, a FIFO shard hung it, a sample [-1, 0] read the last source); `--out` could replace a
    source's manifest; a weight of 10**400 was a traceback."""
    import os

    m = build_mixture(sources(three), 12, seed=1, out_path=tmp_path / "mix.json")
    mix = Mixture(tmp_path / "mix.json")
    assert len([mix[i] for i in range(len(mix))]) == 12
    video = tmp_path / "video"
    shard = video / "shards" / "part-00000.jsonl"
    (tmp_path / "elsewhere.jsonl").write_text(shard.read_text().replace("video question", "SECRET"))
    shard.unlink()
    shard.symlink_to(tmp_path / "elsewhere.jsonl")
    first_video = next(i for i, (k, idx) in enumerate(m["samples"]) if k == 0 and idx < 3)
    with pytest.raises(DatasetError, match="resolves outside the dataset root"):
        Mixture(tmp_path / "mix.json")[first_video]
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(DatasetError, match="not a regular file"):
        Mixture(tmp_path / "mix.json")[first_video]
    doc = json.loads((tmp_path / "mix.json").read_text())
    doc["samples"][0] = [-1, 0]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"samples\[0\] = \[-1, 0\] is not \[source, record\]"):
        Mixture(tmp_path / "bad.json")[0]
    for src in ({"num_records": 1}, {**doc["sources"][0], "num_records": "1"}, [1]):
        (tmp_path / "bad.json").write_text(json.dumps({**doc, "sources": [src]}))
        with pytest.raises(DatasetError, match=r"sources\[0\] is not a source of `duetgen data mix`"):
            Mixture(tmp_path / "bad.json")  # KeyError / TypeError in training before
    (tmp_path / "huge.json").write_text('{"format": "duetgen-mix", "n": ' + "9" * 5000 + "}")
    with pytest.raises(DatasetError, match="is not readable JSON.*4300"):  # (json's ValueError: a traceback)
        Mixture(tmp_path / "huge.json")
    with pytest.raises(DatasetError, match="lies inside the dataset 'edit'"):
        build_mixture(sources(three), 12, seed=1, out_path=tmp_path / "edit" / "manifest.json")
    assert (tmp_path / "edit" / "manifest.json").read_text().startswith("{")
    with pytest.raises(DatasetError, match="weight must be a positive number up to 1e308"):
        parse_mix_config({"datasets": [{"name": "a", "path": "p", "weight": 10 ** 400}]})


def test_a_mixture_refuses_an_over_long_line_by_name_and_reads_roots_resolved(three, tmp_path, monkeypatch):
    import duetgen.data.mixing as mixing

    build_mixture(sources(three), 12, seed=1, out_path=tmp_path / "mixes" / "mix.json")
    mix = Mixture(tmp_path / "mixes" / "mix.json")
    assert all(ds_root == ds_root.resolve() for ds_root in (mix.dataset(k).root for k in range(3)))
    monkeypatch.setattr(mixing, "MAX_RECORD_LINE_BYTES", 30)  # every line of these datasets is longer
    with pytest.raises(DatasetError, match=r"part-0000\d.jsonl:1: a record over the cap of 30 bytes"):
        Mixture(tmp_path / "mixes" / "mix.json")[0]
