"""LLM client against a real local OpenAI-compatible HTTP server (duetgen.llm.testing)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import pytest
from PIL import Image

from duetgen.llm import LLMClient, PromptTemplate, TemplateError
from duetgen.llm.testing import FakeOpenAIServer

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}


def user(text, *images):
    return [{"role": "user", "content": [{"type": "text", "text": text}, *[{"type": "image", "image": i} for i in images]]}]


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


def client_for(server, **kw):
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("timeout_s", 5)
    return LLMClient(server.url, "fake-model", **kw)


def test_plain_chat_sends_openai_body_and_counts_tokens(server):
    c = client_for(server, api_key="sk-test")
    r = c.chat(user("hello there"), temperature=0.3, max_tokens=77, seed=5, top_p=0.9)
    assert r.status == "ok" and r.text == "echo: hello there" and r.data is None and not r.cached
    body = server.bodies[-1]
    assert body["model"] == "fake-model" and body["temperature"] == 0.3 and body["max_tokens"] == 77
    assert body["seed"] == 5 and body["top_p"] == 0.9 and "response_format" not in body
    assert r.usage["completion_tokens"] == 3 and r.usage["prompt_tokens"] > 0
    t = c.usage_totals
    assert t["requests"] == 1 and t["cached"] == 0 and t["completion_tokens"] == 3 and t["errors"] == 0


@pytest.mark.parametrize("fault", ["429", "500", "503", "timeout", "drop"])
def test_transient_faults_are_retried(server, fault):
    server.timeout_sleep_s = 1.0
    c = client_for(server, timeout_s=0.3)
    server.inject(fault, fault)
    r = c.chat(user("retry me"))
    assert r.status == "ok" and r.text == "echo: retry me"
    assert server.requests == 3  # two failures then success
    assert c.usage_totals["retries"] == 2


def test_retries_exhausted_is_api_error_and_not_cached(server, tmp_path):
    c = client_for(server, max_retries=2, cache_path=tmp_path / "c.sqlite")
    server.inject("500", "500", "500")
    r = c.chat(user("doomed"))
    assert r.status == "api_error" and "HTTP 500" in r.error and "3 attempts" in r.error
    assert r.transient  # it may pass later: the data engine builds its shard again on a rerun
    assert server.requests == 3 and c.usage_totals["errors"] == 1
    r2 = c.chat(user("doomed"))  # not cached: goes to the server again, which now answers
    assert r2.status == "ok" and not r2.cached and server.requests == 4


def test_client_errors_are_not_retried(server):
    c = client_for(server)
    server.inject("400")
    r = c.chat(user("bad request"))
    assert r.status == "api_error" and "HTTP 400" in r.error and "not retried" in r.error
    assert not r.transient  # the server refused the request itself: the same next time
    assert server.requests == 1


def test_malformed_response_body_is_api_error(server):
    c = client_for(server)
    server.inject("malformed_body")
    r = c.chat(user("x"))
    assert r.status == "api_error" and "malformed response body" in r.error
    assert r.transient  # a body cut short (not JSON) may pass; JSON of the wrong shape would not


def test_odd_usage_counts_and_finish_reason_count_zero_not_a_crash():
    """usage and finish_reason were read outside the reply's checks: a string count, a list, an infinite number
    raised out of chat() (an audit, session 13). They are the server's word: an odd one counts 0."""
    odd = [{"prompt_tokens": "many"}, [1], {"prompt_tokens": float("inf"), "completion_tokens": -3}, None,
           {"prompt_tokens": 7.0, "completion_tokens": True}]
    replies = iter(odd)
    with FakeOpenAIServer(lambda b: {"content": "ok", "usage": next(replies), "finish_reason": ["x"]}) as s:
        c = client_for(s)
        results = [c.chat(user(f"q{i}")) for i in range(len(odd))]
    assert [r.status for r in results] == ["ok"] * 5 and all(r.text == "ok" for r in results)
    assert [r.usage["prompt_tokens"] for r in results] == [0, 0, 0, 0, 7]
    assert [r.usage["completion_tokens"] for r in results] == [0, 0, 0, 0, 0]


def test_api_refusal_is_its_own_status_not_retried_and_cached(tmp_path):
    # OpenAI structured outputs refuse with content null and message.refusal set.
    reply = {"refusal": "I can't help with that."}
    with FakeOpenAIServer(lambda body: reply if "forbidden" in str(body["messages"]) else "fine") as s:
        c = client_for(s, cache_path=tmp_path / "c.sqlite")
        r = c.chat(user("something forbidden"), json_schema=SCHEMA)
        assert r.status == "refusal" and not r.ok and r.text == "I can't help with that."
        assert r.data is None and "refused" in r.error and not r.cached
        assert s.bodies[-1]["messages"] and s.requests == 1  # a refusal is an answer: no retry
        t = c.usage_totals
        assert t["refusals"] == 1 and t["errors"] == 0 and t["retries"] == 0 and t["invalid_json"] == 0
        again = c.chat(user("something forbidden"), json_schema=SCHEMA)
        assert again.status == "refusal" and again.cached and again.text == r.text and s.requests == 1
        assert c.chat(user("allowed"), json_schema=SCHEMA).status == "invalid_json"  # "fine" is not JSON
        c.close()
        # a fresh client on the same file (another process) gets the refusal from the cache too
        c2 = client_for(s, cache_path=tmp_path / "c.sqlite")
        r2 = c2.chat(user("something forbidden"), json_schema=SCHEMA)
        assert r2.status == "refusal" and r2.cached and s.requests == 2
        c2.close()


def test_cache_file_from_before_refusals_gains_the_column(tmp_path):
    import sqlite3

    from duetgen.llm.cache import ResponseCache

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, template_version TEXT NOT NULL,"
                " text TEXT NOT NULL, usage TEXT NOT NULL, created REAL NOT NULL)")
    con.execute("INSERT INTO responses VALUES ('k', 'm', 't', 'old answer', '{\"prompt_tokens\": 3}', 0)")
    con.commit()
    con.close()
    cache = ResponseCache(path)
    assert cache.get("k") == ("old answer", {"prompt_tokens": 3}, False)
    cache.put("k2", model="m", template_version="t", text="no", usage={}, refusal=True)
    assert cache.get("k2").refusal and len(cache) == 2
    cache.close()


def test_connection_refused_is_api_error():
    s = FakeOpenAIServer().start()
    url = s.url
    s.stop()  # nothing listens there any more
    c = LLMClient(url, "m", max_retries=1, backoff_base_s=0.01, timeout_s=2)
    r = c.chat(user("anyone?"))
    assert r.status == "api_error" and "connection error" in r.error


def test_retry_after_is_respected(server):
    server.retry_after = "0.6"
    c = client_for(server)
    server.inject("429")
    t0 = time.perf_counter()
    r = c.chat(user("slow down"))
    assert r.ok and time.perf_counter() - t0 >= 0.6


def test_strict_json_valid_invalid_and_schema_mismatch(tmp_path):
    replies = {"good": '{"answer": "yes"}', "notjson": 'Sure! {"answer": "yes"}',
               "fenced": '```json\n{"answer": "yes"}\n```', "wrong": '{"answer": 3}', "extra": '{"answer": "a", "x": 1}',
               "huge": '{"answer": ' + "9" * 5000 + "}", "deep": "[" * 3000 + "]" * 3000}

    def responder(body):
        return replies[body["messages"][-1]["content"][0]["text"]]

    with FakeOpenAIServer(responder) as s:
        c = client_for(s)
        r = c.chat(user("good"), json_schema=SCHEMA)
        assert r.status == "ok" and r.data == {"answer": "yes"}
        rf = s.bodies[-1]["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == SCHEMA
        for name in ("notjson", "fenced"):
            r = c.chat(user(name), json_schema=SCHEMA)
            assert r.status == "invalid_json" and r.data is None and "not JSON" in r.error, name
            assert r.text == replies[name]
        r = c.chat(user("wrong"), json_schema=SCHEMA)
        assert r.status == "invalid_json" and "answer" in r.error and "string" in r.error
        r = c.chat(user("extra"), json_schema=SCHEMA)
        assert r.status == "invalid_json" and "Additional properties" in r.error
        # json's own ValueError (an integer of over 4,300 digits) and RecursionError crashed the call
        r = c.chat(user("huge"), json_schema=SCHEMA)
        assert r.status == "invalid_json" and "not readable JSON" in r.error and "4300" in r.error
        r = c.chat(user("deep"), json_schema=SCHEMA)
        assert r.status == "invalid_json" and "nested too deeply" in r.error
        assert c.usage_totals["invalid_json"] == 6


def test_truncated_json_reply_says_so():
    with FakeOpenAIServer(lambda b: {"content": '{"answer": "yes', "finish_reason": "length"}) as s:
        r = client_for(s).chat(user("q"), json_schema=SCHEMA, max_tokens=3)
        assert r.status == "invalid_json" and "finish_reason=length" in r.error


def test_cache_hits_on_rerun_and_keys_on_every_setting(server, tmp_path):
    path = tmp_path / "cache.sqlite"
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    c = client_for(server, cache_path=path)
    first = c.chat(user("cache me", img), temperature=0.0)
    assert first.ok and not first.cached and server.requests == 1
    again = c.chat(user("cache me", img.copy()), temperature=0.0)
    assert again.cached and again.text == first.text and again.usage == first.usage and server.requests == 1
    # every part of the key matters
    c.chat(user("cache me", img), temperature=0.7)
    c.chat(user("cache me", img), template_version="t@2")
    c.chat(user("cache me", img), seed=1)
    c.chat(user("cache me", img), max_tokens=5)
    c.chat(user("cache me", Image.new("RGB", (8, 8), (200, 10, 11))))  # one pixel value differs
    c.chat(user("cache me!", img))
    assert server.requests == 7
    # a fresh client on the same file (a rerun of the program) costs nothing
    c2 = client_for(server, cache_path=path)
    assert c2.chat(user("cache me", img)).cached and server.requests == 7
    assert c2.usage_totals == {**c2.usage_totals, "requests": 1, "cached": 1, "prompt_tokens": 0}
    other_model = LLMClient(server.url, "other-model", cache_path=path)
    assert not other_model.chat(user("cache me", img)).cached and server.requests == 8


def test_invalid_json_reply_is_cached_as_the_models_answer(tmp_path):
    with FakeOpenAIServer(lambda b: "not json") as s:
        c = client_for(s, cache_path=tmp_path / "c.sqlite")
        assert c.chat(user("q"), json_schema=SCHEMA).status == "invalid_json"
        r = c.chat(user("q"), json_schema=SCHEMA)
        assert r.status == "invalid_json" and r.cached and s.requests == 1


def test_concurrency_bound_holds_and_order_is_kept(tmp_path):
    with FakeOpenAIServer(latency_s=0.15) as s:
        c = client_for(s, max_concurrency=3, cache_path=tmp_path / "c.sqlite")
        reqs = [(user(f"q{i}"), {}) for i in range(12)]
        results = c.chat_many(reqs, progress=False)
        assert [r.text for r in results] == [f"echo: q{i}" for i in range(12)]
        # bounded, and actually parallel (the server counts requests in flight; no wall-clock
        # bound here: timings belong in benchmarks/, this machine is shared and noisy)
        assert s.max_in_flight == 3
        # rerun: all cached, concurrent cache reads and writes were safe
        again = c.chat_many(reqs, progress=True)
        assert all(r.cached for r in again) and s.requests == 12


def test_amap_in_callers_event_loop(server):
    c = client_for(server, max_concurrency=4)

    async def main():
        out = await c.amap([(user(f"a{i}"), {"temperature": 0.1}) for i in range(6)])
        await c.aclose()
        return out

    out = asyncio.run(main())
    assert [r.text for r in out] == [f"echo: a{i}" for i in range(6)]
    with pytest.raises(RuntimeError, match="inside an event loop"):
        async def inside():
            c.chat(user("x"))
        asyncio.run(inside())


def test_images_arrive_as_data_urls(server):
    pil = Image.new("RGB", (5, 4), (1, 2, 3))
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (9, 9, 9)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    c = client_for(server)
    assert c.chat(user("look", pil, jpeg)).ok
    parts = server.bodies[-1]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    png_url, jpg_url = parts[1]["image_url"]["url"], parts[2]["image_url"]["url"]
    assert png_url.startswith("data:image/png;base64,") and jpg_url.startswith("data:image/jpeg;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(png_url.split(",", 1)[1])))
    assert back.size == (5, 4) and back.getpixel((0, 0)) == (1, 2, 3)
    assert base64.b64decode(jpg_url.split(",", 1)[1]) == jpeg  # sent as-is, not re-encoded


def test_bad_messages_raise_naming_the_part(server):
    c = client_for(server)
    with pytest.raises(ValueError, match=r"content\[1\].*pathlib.Path"):
        c.chat(user("x", "images/ab.png"))
    with pytest.raises(ValueError, match=r"not a readable image"):
        c.chat(user("x", b"definitely not an image"))
    with pytest.raises(ValueError, match="unknown part type"):
        c.chat([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="http"):
        LLMClient("file:///etc", "m")


def test_prompt_template_load_render_and_version(tmp_path, server):
    t = PromptTemplate.load("example_json")
    assert t.name == "example_json" and t.version == "1" and t.fields() == {"question", "images"}
    img = Image.new("RGB", (4, 4))
    msgs = t.render(question="Why {is} the sky blue?", images=[img, img])
    assert msgs[0]["role"] == "system" and msgs[1]["content"][0]["text"] == "Question: Why {is} the sky blue?"
    assert [p["type"] for p in msgs[1]["content"]] == ["text", "image", "image"]
    with pytest.raises(TemplateError, match=r"missing field\(s\) \['images'\]"):
        t.render(question="q")
    with pytest.raises(TemplateError, match=r"unknown field\(s\) \['qestion'\]"):
        t.render(qestion="q", question="q", images=[])
    with pytest.raises(TemplateError, match="plain name"):
        PromptTemplate.load("../../etc/passwd")
    # editing the content without bumping the version still changes the cache key part
    d = {"name": "t", "version": "1", "user": "Say {word}"}
    (tmp_path / "t.json").write_text(json.dumps(d))
    t1 = PromptTemplate.load("t", root=tmp_path)
    (tmp_path / "t.json").write_text(json.dumps({**d, "user": "Say {word}!"}))
    t2 = PromptTemplate.load("t", root=tmp_path)
    assert t1.version_key.startswith("t@1:") and t1.version_key != t2.version_key
    (tmp_path / "bad.json").write_text(json.dumps({"name": "b", "version": "1", "user": "x",
                                                     "json_schema": {"type": "nonsense"}}))
    with pytest.raises(TemplateError, match="not a valid schema"):
        PromptTemplate.load("bad", root=tmp_path)
    kw = t.chat_kwargs()
    assert kw["json_schema"] == t.json_schema and kw["template_version"] == t.version_key and kw["max_tokens"] == 256


# ----------------------------------------------------------------------------- issue 15: total deadline, reply cap
def test_timeout_is_a_total_deadline_against_a_server_that_drips_bytes(server):
    """Issue 15 item 7: httpx timeouts are per read; a reply dripping one byte per 50 ms held a 1 s request for 6 s."""
    server.inject("drip")
    client = client_for(server, timeout_s=1.0, max_retries=0)
    t0 = time.perf_counter()
    r = client.chat(user("hi"))
    elapsed = time.perf_counter() - t0
    client.close()
    assert r.status == "api_error" and "within the 1 s deadline" in r.error
    assert 0.9 < elapsed < 1.6, elapsed


@pytest.mark.parametrize("fault", ["huge", "huge_declared"])
def test_reply_over_the_byte_cap_is_an_api_error_read_only_up_to_the_cap(server, fault):
    """Issue 15 item 8: 100 MB replies, two at a time, took a judge run to 2.15 GB; now each is cut at the cap."""
    import tracemalloc

    server.inject(fault, fault)
    client = client_for(server, max_retries=2, max_reply_bytes=1 << 20)
    tracemalloc.start()
    try:
        results = client.chat_many([(user("a"), {}), (user("b"), {})], progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        client.close()
    assert [r.status for r in results] == ["api_error", "api_error"]
    assert all("over the cap of 1,048,576 bytes" in r.error or "larger than the cap of 1,048,576 bytes" in r.error
               for r in results), [r.error for r in results]
    assert server.requests == 2  # not retried: the same request would bring the same reply
    assert peak < 16 << 20, f"peak {peak:,} bytes of Python memory for two 64 MB replies"
