"""Data engine with an LLM: captions, rewrite, reorder and dialogue against the local fake server."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "engine"))
from engine_llm import EngineResponder  # noqa: E402
from howto_site import PAGES_DIR, Site, photo  # noqa: E402

from duetgen.data.engine import EngineConfig, EngineError, run_engine  # noqa: E402
from duetgen.data.engine.fetch import FetchConfig  # noqa: E402
from duetgen.data.dataset import Dataset  # noqa: E402
from duetgen.data.record import ImagePart, TextPart  # noqa: E402
from duetgen.llm.testing import FakeOpenAIServer  # noqa: E402

PAGES = ("bathe-a-cat.html", "repot-a-plant.html", "text-only.html")


@pytest.fixture(scope="module")
def site():
    with Site() as s:
        yield s


@pytest.fixture
def llm():
    responder = EngineResponder()
    with FakeOpenAIServer(responder) as server:
        server.responder_obj = responder
        yield server


def pages_jsonl(tmp_path: Path, site: Site, names=PAGES) -> Path:
    p = tmp_path / "pages.jsonl"
    p.write_text("".join(json.dumps({"url": site.page_url(n), "html": (PAGES_DIR / n).read_text()}) + "\n" for n in names))
    return p


def config(llm, **kw) -> EngineConfig:
    return EngineConfig(fetch=FetchConfig(allow_networks=("127.0.0.0/8",), timeout_s=3.0), shard_pages=2,
                        **{"llm_url": llm.url, "llm_model": "fake-vl", **kw})


def stage(funnel, name):
    return next(s for s in funnel["stages"] if s["name"] == name)


def test_llm_mode_builds_dialogues_with_captions_and_rewrites(site, llm, tmp_path):
    inp = pages_jsonl(tmp_path, site)
    out = tmp_path / "ds"
    cache = tmp_path / "cache.sqlite"
    funnel = run_engine(inp, out, config(llm, llm_cache=str(cache)), progress=False)
    names = [s["name"] for s in funnel["stages"]]
    assert names == ["extract", "page_filter", "language", "dedup_pages", "fetch_images", "image_rules",
                     "caption_images", "dedup_images", "require_images", "clean_text", "rewrite_text", "reorder",
                     "dialogue", "write"]
    recs = {r.meta["title"]: r for r in Dataset(out)}
    assert sorted(recs) == ["How to Bathe a Cat", "Repot a Houseplant"]

    cat = recs["How to Bathe a Cat"]
    assert cat.messages[0].content == [TextPart("Can you show me: How to Bathe a Cat?")]
    answer = cat.messages[1].content
    assert answer[0] == TextPart("Here is how, step by step.")
    ds = Dataset(out)
    assert [ds.read_image_bytes(p.image, cat.id) for p in answer if isinstance(p, ImagePart)] == [photo(i) for i in range(1, 7)]
    assert cat.meta["engine"]["dialogue"] == "llm" and cat.meta["engine"]["model"] == "fake-vl"
    assert all(im["category"] == "natural_photo" and im["caption"].startswith("A photo illustrating") for im in cat.meta["images"])
    assert set(cat.meta["prompts"]) == {"caption_image", "rewrite_text", "reorder", "build_dialogue"}
    assert cat.meta["prompts"]["build_dialogue"].startswith("build_dialogue@1:")

    # the MLLM judged the author's portrait irrelevant (rules alone keep it)
    assert stage(funnel, "caption_images")["image_drops"] == {"irrelevant": 1}
    assert len(recs["Repot a Houseplant"].image_parts()) == 4

    # requests really carried the images as data URLs, and the rewritten text reached the dialogue prompt
    captions = [b for b in llm.bodies if b["messages"][0]["content"].startswith("You label images")]
    sent = [b["messages"][1]["content"][1]["image_url"]["url"] for b in captions]
    assert all(u.startswith("data:image/jpeg;base64,") for u in sent)
    assert base64.b64encode(photo(1)).decode() in {u.split(",", 1)[1] for u in sent}  # the fetched bytes, as they were
    dialogues = [b for b in llm.bodies if b["messages"][0]["content"].startswith("You turn cleaned")]
    assert any("(edited)" in p.get("text", "") for b in dialogues for p in b["messages"][1]["content"])
    assert dialogues[0]["response_format"]["type"] == "json_schema"

    seen = llm.responder_obj.seen
    n_images_captioned = stage(funnel, "caption_images")["images_in"]
    assert seen == {"caption": n_images_captioned, "rewrite": 2, "reorder": 2, "dialogue": 2}
    assert funnel["llm"]["requests"] == sum(seen.values()) and funnel["llm"]["cached"] == 0
    assert funnel["llm"]["prompt_tokens"] > 0 and funnel["llm"]["completion_tokens"] > 0

    # a rerun into a new output with the same cache costs nothing and gives the same records
    before = llm.requests
    funnel2 = run_engine(inp, tmp_path / "ds2", config(llm, llm_cache=str(cache)), progress=False)
    assert llm.requests == before and funnel2["llm"]["cached"] == funnel2["llm"]["requests"] == funnel["llm"]["requests"]
    assert [r.to_json() for r in Dataset(tmp_path / "ds2")] == [r.to_json() for r in Dataset(out)]
    assert "LLM" in (out / "funnel.html").read_text() and "cached" in (out / "funnel.html").read_text()


@pytest.mark.parametrize("mode,reason", [("lose_numbers", "llm_lost_facts"), ("wrong_count", "llm_bad_reply"),
                                         ("not_json", "llm_invalid_json")])
def test_bad_rewrites_drop_the_page_with_a_reason(site, llm, tmp_path, mode, reason):
    llm.responder_obj.rewrite_mode = mode
    funnel = run_engine(pages_jsonl(tmp_path, site, ["bathe-a-cat.html"]), tmp_path / "ds", config(llm), progress=False)
    assert stage(funnel, "rewrite_text")["page_drops"] == {reason: 1}
    assert funnel["summary"]["records_out"] == 0


def test_bad_order_and_user_image(site, llm, tmp_path):
    llm.responder_obj.reorder_mode = "bad"
    funnel = run_engine(pages_jsonl(tmp_path, site, ["bathe-a-cat.html"]), tmp_path / "a", config(llm), progress=False)
    assert stage(funnel, "reorder")["page_drops"] == {"llm_bad_reply": 1}
    llm.responder_obj.reorder_mode = "identity"
    llm.responder_obj.dialogue_user_image = True
    run_engine(pages_jsonl(tmp_path, site, ["bathe-a-cat.html"]), tmp_path / "b", config(llm), progress=False)
    rec = next(iter(Dataset(tmp_path / "b")))
    assert len(rec.messages[0].images) == 1 and len(rec.messages[1].images) == 5  # image 0 moved to the user turn


def test_api_errors_drop_items_and_the_run_goes_on(site, llm, tmp_path):
    llm.inject(*["500"] * 3)  # the first three caption requests fail (no retries configured)
    funnel = run_engine(pages_jsonl(tmp_path, site, ["bathe-a-cat.html"]), tmp_path / "ds",
                        config(llm, llm_max_retries=0, llm_concurrency=1), progress=False)
    cap = stage(funnel, "caption_images")
    assert cap["image_drops"] == {"llm_api_error": 3} and cap["llm"]["errors"] == 3
    assert funnel["summary"]["records_out"] == 1
    ds = Dataset(tmp_path / "ds")
    rec = next(iter(ds))
    # captions run before dedup, in page order: step1, step2 and its near-duplicate lost their captions
    assert [ds.read_image_bytes(p.image, rec.id) for p in rec.image_parts()] == [photo(i) for i in (3, 4, 5, 6)]


def test_a_rerun_asks_again_what_failed_and_reuses_the_rest(site, llm, tmp_path):
    """An audit: with the LLM server down, every shard got its marker, so a rerun once the server was back sent no
    request and the dropped pages and images were lost for good (the run exited 0). A shard with LLM API errors
    is built again on a rerun, its received answers from the cache, and a new address or concurrency resumes."""
    inp = pages_jsonl(tmp_path, site, ["bathe-a-cat.html"])
    run_engine(inp, tmp_path / "clean", config(llm), progress=False)
    llm.inject(*["500"] * 3)
    out = tmp_path / "ds"
    funnel = run_engine(inp, out, config(llm, llm_max_retries=0, llm_concurrency=1), progress=False)
    assert funnel["summary"]["llm_api_errors"] == 3 and funnel["summary"]["shards_retried_for_llm_errors"] == 0
    funnel = run_engine(inp, out, config(llm, llm_max_retries=0, llm_concurrency=4), progress=False)  # server back
    assert funnel["summary"]["shards_retried_for_llm_errors"] == 1 and funnel["summary"]["llm_api_errors"] == 0
    assert funnel["llm"]["cached"] > 0  # the answers the first run received
    assert [r.to_json() for r in Dataset(out)] == [r.to_json() for r in Dataset(tmp_path / "clean")]
    before = llm.requests
    assert run_engine(inp, out, config(llm), progress=False)["summary"]["shards_run_now"] == 0  # done: nothing asked
    assert llm.requests == before
    with pytest.raises(EngineError, match=r"\(llm_model changed\)"):  # what the LLM is asked does decide the output
        run_engine(inp, out, config(llm, llm_model="another-vl"), progress=False)


def test_the_cli_says_when_llm_requests_failed_and_exits_2_when_nothing_was_written(site, llm, tmp_path):
    from typer.testing import CliRunner

    from duetgen.cli import app

    llm.inject(*["500"] * 40)  # every request of the run fails
    args = ["data", "engine", "--input", str(pages_jsonl(tmp_path, site, ["bathe-a-cat.html"])), "--out",
            str(tmp_path / "ds"), "--llm", llm.url, "--model", "fake-vl", "--llm-max-retries", "0",
            "--allow-network", "127.0.0.0/8", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "wrote 0 records" in res.output and "dropped because LLM requests" in res.output
    assert "rerun the same command" in res.output
    llm.faults.clear()  # the server is back
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "wrote 1 records" in res.output and "warning" not in res.output, res.output


def test_a_request_the_server_refuses_is_final_not_retried_by_every_rerun(site, llm, tmp_path):
    """A review: a 400 (the server refusing the request itself) counted as an API error, so every rerun built its
    shard again and warned "rerun to try again". It is `llm_rejected`, and a rerun leaves the shard done."""
    inp = pages_jsonl(tmp_path, site, ["bathe-a-cat.html"])
    llm.inject("400")
    funnel = run_engine(inp, tmp_path / "ds", config(llm, llm_max_retries=0, llm_concurrency=1), progress=False)
    assert stage(funnel, "caption_images")["image_drops"].get("llm_rejected") == 1
    assert funnel["summary"]["llm_api_errors"] == 0
    funnel = run_engine(inp, tmp_path / "ds", config(llm), progress=False)
    assert funnel["summary"]["shards_run_now"] == 0
