"""`duetgen serve`'s OpenAI-compatible `/v1`: the official `openai` client against a real uvicorn server on 127.0.0.1.

Plain and streamed answers (markdown with each image inline, served by content hash), an input
image as a data: URL and as this server's own URL, a conversation sent back as markdown, usage,
OpenAI's error shape for bad requests (400 naming the field, 404 unknown model, 413 caps, 429 when
full, 504 timeout), and the bounded image store.
"""

import base64
import io
import json
import re
import time

import httpx
import openai
import pytest
import torch
from PIL import Image

from generation_model import trained_tiny_model, training_prompt
from live_server import live_server
from duetgen.data.record import ImagePart, Message, TextPart
from duetgen.infer.engine import InterleavedEngine
from duetgen.infer.pipeline import DuetGenPipeline
from duetgen.models import builder
from duetgen.models.mllm import render_prompt
from duetgen.serve.common import ServeLimits
from duetgen.serve.openai_api import ImageStore, Translator
from duetgen.serve.server import create_app

torch.set_num_threads(1)
IMAGE_LINK = re.compile(r"\n\n!\[image (\d+)\]\(([^)]+)\)\n\n")


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def prompt_length(pipe, image, text) -> int:
    """Tokens of the rendered prompt of one user turn (an image, then text)."""
    m = pipe.model
    prompt = [Message("user", [ImagePart(image), TextPart(text)])]
    return len(render_prompt(prompt, m.tokenizer, m.image_processor, InterleavedEngine.load_image).input_ids)


@pytest.fixture(scope="module")
def pipe():
    return DuetGenPipeline(trained_tiny_model(), model_id="tiny-fit")


@pytest.fixture(scope="module")
def server(pipe):
    limits = ServeLimits(max_body_bytes=1 << 20, max_image_pixels=128 * 128, max_prompt_chars=500, max_images=3,
                         max_steps=20, max_new_tokens=300)
    with live_server(create_app(pipe, limits)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def user_turn():
    """The prompt the tiny model was fitted on: a canvas (data: URL) then the text; it answers with images."""
    text, canvas = training_prompt(0)
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(canvas)}},
                                        {"type": "text", "text": text}]}


def ask(client, messages, **kwargs):
    """A chat completion of the tiny model: seed 0, 150 tokens, 2 sampler steps unless ``kwargs`` say otherwise."""
    extra = {"steps": 2, **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(**{"model": "tiny-fit", "messages": messages, "seed": 0, "max_tokens": 150,
                                             "extra_body": extra, **kwargs})


@pytest.fixture(scope="module")
def plain(client, user_turn):
    return ask(client, [user_turn])


def test_models(client, server):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("tiny-fit", "model", "duetgen")]
    assert client.models.retrieve("tiny-fit").id == "tiny-fit"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"


def test_plain_answer_is_markdown_with_served_images(plain, server, pipe, user_turn):
    assert plain.object == "chat.completion" and plain.model == "tiny-fit" and plain.id.startswith("chatcmpl-")
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    content = choice.message.content
    links = IMAGE_LINK.findall(content)
    assert links and [k for k, _ in links] == [str(k) for k in range(1, len(links) + 1)] and content.startswith("Step")
    for _, url in links:
        assert re.fullmatch(rf"{server}/v1/images/[0-9a-f]{{64}}\.png", url)
        r = httpx.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    extra = plain.model_extra["duetgen"]
    assert extra["seed"] == 0 and extra["images"] == [url for _, url in links]
    # usage: prompt_tokens is the rendered prompt, completion_tokens the sampled tokens (text + one <BOV> per image)
    usage = plain.usage
    assert usage.prompt_tokens == prompt_length(pipe, training_prompt(0)[1], user_turn["content"][1]["text"])
    assert usage.completion_tokens == extra["stats"]["new_tokens"] and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra["images"] == len(links) and usage.model_extra["image_tokens"] > 0


def test_stream_matches_plain(client, plain, user_turn):
    chunks = list(ask(client, [user_turn], stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == plain.choices[0].message.content  # same seed, same answer, same image URLs
    n_images = len(IMAGE_LINK.findall(plain.choices[0].message.content))
    assert sum(bool(IMAGE_LINK.fullmatch(d)) for d in deltas) == n_images  # each image arrives whole, in one chunk
    assert len(deltas) > 5  # text streams in pieces
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_conversation_continues_with_own_urls_and_data_urls(client, plain, user_turn, server, pipe):
    answer = plain.choices[0].message.content
    first_image = IMAGE_LINK.findall(answer)[0][1]
    again = {"role": "user", "content": "Again please."}
    # the answer sent back as it came (markdown with this server's URLs): its images count against the cap of 3
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "tiny-fit", "seed": 0, "max_tokens": 5, "messages": [user_turn, {"role": "assistant", "content": answer}, again]})
    n_images = 1 + len(IMAGE_LINK.findall(answer))
    assert n_images > 3 and r.status_code == 413
    assert r.json()["error"] == {"message": f"{n_images} images, over the cap of 3", "type": "invalid_request_error",
                                 "param": "messages", "code": None}
    # one earlier image, referenced by this server's URL, as an input image
    reply = ask(client, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": first_image}},
                                                       {"type": "text", "text": user_turn["content"][1]["text"]}]}])
    picture = Image.open(io.BytesIO(httpx.get(first_image).content))
    assert reply.usage.prompt_tokens == prompt_length(pipe, picture, user_turn["content"][1]["text"])
    data = ask(client, [user_turn], extra_body={"image_output": "data_url", "max_images": 1})
    links = IMAGE_LINK.findall(data.choices[0].message.content)
    assert len(links) == 1 and links[0][1].startswith("data:image/png;base64,")
    assert data.choices[0].finish_reason == "length" and data.model_extra["duetgen"]["finish_reason"] == "max_images"


def test_assistant_markdown_round_trip(server):
    store = ImageStore(1 << 20, 60)
    translator = Translator(ServeLimits(), store)
    picture = Image.new("RGB", (8, 8), (200, 10, 10))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    sha = store.put(buf.getvalue())
    text = (f"Step 1: red.\n\n![image 1](http://h:1/v1/images/{sha}.png)\n\nStep 2.\n\n![image 2]({data_url(picture)})\n\n"
            "Done. ![logo](https://example.com/x.png) ![theirs](http://other:1/v1/images/" + "0" * 64 + ".png)")
    parts = translator.assistant_text(text, "messages[1].content", "h:1")
    kinds = [type(p).__name__ for p in parts]
    assert kinds == ["TextPart", "ImagePart", "TextPart", "ImagePart", "TextPart"]
    assert [p.text for p in parts if isinstance(p, TextPart)] == ["Step 1: red.", "Step 2.", "Done. ![logo](https://example.com/x.png) ![theirs](http://other:1/v1/images/" + "0" * 64 + ".png)"]
    assert parts[1].image.getpixel((0, 0)) == (200, 10, 10)


def png_header_only(width: int, height: int) -> str:
    """A PNG whose header claims width x height and holds no pixel data (nothing needs decoding to refuse it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return "data:image/png;base64," + base64.b64encode(png + chunk(b"IEND", b"")).decode()


@pytest.mark.parametrize("patch, status, param, message", [
    ({"model": "gpt-4o"}, 404, "model", "does not exist"),
    ({"n": 2}, 400, "n", "one answer per request"),
    ({"stop": ["\n"]}, 400, "stop", "not supported"),
    ({"max_tokens": 5000}, 400, "max_tokens", "over the cap of 300"),
    ({"temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"extra_body": {"steps": 500}}, 400, "steps", "over the cap of 20"),
    ({"extra_body": {"image_size": [30, 32]}}, 400, "image_size", "multiples of 4"),
    ({"extra_body": {"colour": "red"}}, 400, "colour", "unrecognized request argument"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "Input should be"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}]},
     400, "messages[0].content[0].image_url.url", "fetches no other URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/v1/images/" + "0" * 64 + ".png"}}]}]},
     400, "messages[0].content[0].image_url.url", "no longer kept"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]},
     400, "messages[0].content[0].image_url.url", "not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (200, 200)))}}]}]},
     413, "messages[0].content[0].image_url.url", "over the cap of 16,384"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_header_only(20000, 20000)}}]}]},
     413, "messages[0].content[0].image_url.url", "decompression bomb"),  # PIL's own check fires first: 413 too
    # a content part's schema errors name the field once (pydantic puts the part's tag before it: text.text)
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0].image_url.url", "Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     400, "messages[0].content[0].text", "valid string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "q"}}]}]},
     400, "messages[0].content[0].image_url.detail", "Input should be"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed when stream is true"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (1, 300)))}}]}]},
     400, "messages[0].content[0].image_url.url", "aspect ratio over 200"),  # named at the image, not "messages"
    ({"messages": [{"role": "user", "content": "x" * 501}]}, 413, "messages", "over the cap of 500"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "messages", "empty"),
])
def test_bad_request_openai_error_shape(client, server, patch, status, param, message):
    kwargs = {"messages": [{"role": "user", "content": "Draw a red circle."}], **patch}
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, **kwargs)
    assert e.value.status_code == status, e.value.body
    assert e.value.body["param"] == param and message in e.value.body["message"], e.value.body
    assert e.value.body["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert httpx.get(f"{server}/api/health").json()["status"] == "ok"  # the server keeps serving


def test_refused_before_the_model_with_the_field_named(server, pipe):
    """Inputs that used to reach the model and fail there (500) or pass unchecked: 4xx naming the field."""
    def post(raw: str):
        return httpx.post(f"{server}/v1/chat/completions", content=raw.encode(),
                          headers={"content-type": "application/json"}, timeout=60)
    max_h, _ = pipe.model.max_image_side
    m = pipe.model.pixel_multiple
    base = '"model": "tiny-fit", "max_tokens": 5, "messages": [{"role": "user", "content": "Draw a red circle."}]'
    r = post('{%s, "image_size": [%d, %d]}' % (base, max_h + m, m))  # within the server's caps, past the DiT's grid
    assert r.status_code == 400 and r.json()["error"]["param"] == "image_size", r.text
    assert "this model draws at most" in r.json()["error"]["message"]
    r = post('{"model": "tiny-fit", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text
    assert "lone surrogate" in r.json()["error"]["message"]
    r = post('{%s, "guidance": Infinity}' % base)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance", r.text
    r = post('{"model": "tiny-fit", "messages": [{"role": "user", "content": "x", "colour": 1}]}')
    assert r.status_code == 400 and "colour" in r.json()["error"]["param"], r.text
    r = post('{%s, "stop": "%s"}' % (base, "x" * 10000))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop" and len(r.text) < 500
    for field, value in (("seed", '"5"'), ("seed", "true"), ("stream", '"yes"'), ("image_size", "[64.0, 64]")):
        r = post('{%s, "%s": %s}' % (base, field, value))  # no silent coercion: OpenAI's API refuses these too
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(field), (field, r.text)
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}
    r = post(json.dumps({"model": "tiny-fit", "messages": [{"role": "user", "content": [broken] * 4}]}))
    assert r.status_code == 413 and "4 images, over the cap of 3" in r.json()["error"]["message"]  # counted first
    for top in ("1e-300", "1e-38"):  # float32 gives up on these; sampling does not
        r = post('{%s, "temperature": %s}' % (base, top))
        assert r.status_code == 200, r.text
    r = post('{%s, "temperature": 1, "top_p": 1e-300}' % base)
    assert r.status_code == 200, r.text


def test_body_cap_and_broken_json_in_openai_shape(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{" + b" " * (2 << 20) + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the cap" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_invalid"
    message = r.json()["error"]["message"]  # says where (was "...not valid JSON: " and nothing more)
    assert message.startswith("the request body is not valid JSON at offset 1") and not message.endswith(": ")
    r = httpx.get(f"{server}/v1/images/{'0' * 64}.png")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.post(f"{server}/api/generate", content=b"{nope", headers={"content-type": "application/json"}).status_code == 422  # /api as it was


def test_queue_full_429_cancel_and_timeout(user_turn, caplog):
    # a random tiny MLLM (seed 1) writes text until max_tokens: long enough to see the queue full
    slow_pipe = DuetGenPipeline(builder.build("tiny", seed=1), model_id="tiny-random")
    slow = {"model": "tiny-random", "messages": [{"role": "user", "content": "Draw a red circle."}], "max_tokens": 3000, "seed": 0}
    with live_server(create_app(slow_pipe, ServeLimits(queue_size=0, max_new_tokens=3000))) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = c.chat.completions.create(stream=True, **slow)
        next(stream), next(stream)  # role chunk, first text: the generation runs
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(**{**slow, "max_tokens": 5})
        assert e.value.response.headers["retry-after"] == "5" and "busy" in e.value.body["message"]
        stream.close()  # the client leaves: its generation stops and the model is free
        left = time.monotonic()
        while httpx.get(f"{url}/api/health").json()["running"] and time.monotonic() - left < 30:
            time.sleep(0.02)
        assert time.monotonic() - left < 10 and httpx.get(f"{url}/api/health").json()["running"] == 0
        # a JSON (not streamed) answer whose client gives up is cancelled too: the model is free again at once
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=slow, timeout=1.0)
        left = time.monotonic()
        while httpx.get(f"{url}/api/health").json()["running"] and time.monotonic() - left < 30:
            time.sleep(0.02)
        assert time.monotonic() - left < 5, "the abandoned generation kept the model"
        assert not [r for r in caplog.records if "generation failed" in r.getMessage()]  # a client leaving is no failure
    with live_server(create_app(slow_pipe, ServeLimits(queue_size=1, max_new_tokens=3000))) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        running = c.chat.completions.create(stream=True, **slow)
        next(running)
        waiting = httpx.Client(timeout=120)  # a stream waiting in the queue whose client leaves frees its place
        w = waiting.stream("POST", f"{url}/v1/chat/completions", json={**slow, "stream": True})
        w.__enter__()
        w.__exit__(None, None, None)
        waiting.close()
        left = time.monotonic()
        while httpx.get(f"{url}/api/health").json()["waiting"] and time.monotonic() - left < 30:
            time.sleep(0.02)
        assert httpx.get(f"{url}/api/health").json() | {"status": "ok"} == {
            "status": "ok", "model": "tiny-random", "running": 1, "waiting": 0}
        running.close()
    with live_server(create_app(slow_pipe, ServeLimits(request_timeout_s=0.3, max_new_tokens=3000))) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(**slow)
        assert e.value.status_code == 504 and "longer than 0.3 s" in e.value.body["message"]
        with pytest.raises(openai.APIError) as e:  # streamed: the error arrives as an event
            list(c.chat.completions.create(stream=True, **slow))
        assert "longer than 0.3 s" in e.value.message


def test_image_store_bounds():
    store = ImageStore(max_bytes=25, ttl_s=0.2)
    a, b = store.put(b"a" * 10), store.put(b"b" * 10)
    assert store.get(a) == b"a" * 10
    c = store.put(b"c" * 10)  # 30 bytes: the oldest goes
    assert store.get(a) is None and store.get(b) and store.get(c)
    assert store.put(b"b" * 10) == b  # the same bytes: the same name
    time.sleep(0.25)
    assert store.get(b) is None and store.get(c) is None
