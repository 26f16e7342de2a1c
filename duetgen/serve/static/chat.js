// DuetGen chat page: sends the conversation to /api/generate/stream and renders the server-sent
// events as they arrive (text deltas, one progress bar per image, the image when it is drawn).
// Model text is only ever inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];      // the conversation in API form: {role, content: [{type, text} | {type, image}]}
let attachments = [];    // data URLs of images to send with the next prompt

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function bubble(role) {
  const msg = el("div", "msg " + role);
  msg.appendChild(el("div", "role", role));
  const body = el("div", "bubble");
  msg.appendChild(body);
  $("conversation").appendChild(msg);
  return body;
}

function figure(src, caption, cls) {
  const fig = el("figure");
  const img = el("img", cls);
  img.src = src;
  img.alt = caption;
  fig.appendChild(img);
  fig.appendChild(el("figcaption", null, caption));
  return fig;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

$("image-input").addEventListener("change", async (ev) => {
  for (const file of ev.target.files) {
    const url = await readFile(file);
    attachments.push(url);
    const thumb = el("img");
    thumb.src = url;
    thumb.alt = file.name;
    thumb.className = "attachment";
    $("attachments").appendChild(thumb);
  }
  ev.target.value = "";
});

$("new-chat").addEventListener("click", () => {
  history.length = 0;
  attachments = [];
  $("conversation").textContent = "";
  $("attachments").textContent = "";
  setStatus("");
});

function settings() {
  const body = { seed: parseInt($("seed").value || "0", 10), temperature: parseFloat($("temperature").value || "0") };
  if ($("steps").value) body.num_steps = parseInt($("steps").value, 10);
  if ($("guidance").value) body.guidance_scale = parseFloat($("guidance").value);
  return body;
}

// Parse a text/event-stream body: yields {event, data} objects.
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { event, data: JSON.parse(data) };
    }
  }
}

$("composer").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text && attachments.length === 0) { setStatus("Type a prompt first.", true); return; }

  // 1. the user's turn: images first, then the text (the layout the model was trained on)
  const userContent = attachments.map((url) => ({ type: "image", image: url }));
  if (text) userContent.push({ type: "text", text });
  const userBubble = bubble("user");
  attachments.forEach((url, i) => userBubble.appendChild(figure(url, "input image " + (i + 1), "input")));
  if (text) userBubble.appendChild(el("div", "text", text));
  const request = { messages: history.concat([{ role: "user", content: userContent }]), ...settings() };
  attachments = [];
  $("attachments").textContent = "";
  $("prompt").value = "";
  $("send").disabled = true;
  setStatus("generating…");

  // 2. the answer, drawn as the events arrive
  const answer = bubble("assistant");
  const answerContent = [];
  let textNode = null;
  const figures = {};
  try {
    const response = await fetch("/api/generate/stream", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
    });
    if (!response.ok) {
      let detail = response.statusText;
      try { const body = await response.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (e) {}
      throw new Error(response.status + ": " + detail);
    }
    for await (const { event, data } of serverEvents(response)) {
      if (event === "text") {
        if (!textNode) { textNode = el("div", "text", ""); answer.appendChild(textNode); answerContent.push({ type: "text", text: "" }); }
        textNode.textContent += data.text;
        answerContent[answerContent.length - 1].text += data.text;
      } else if (event === "image_started") {
        textNode = null;
        const fig = el("figure");
        const holder = el("div", "placeholder", "drawing…");
        const bar = el("progress");
        fig.appendChild(holder);
        fig.appendChild(bar);
        fig.appendChild(el("figcaption", null, "image " + (data.index + 1) + " (" + data.width + "x" + data.height + ")"));
        answer.appendChild(fig);
        figures[data.index] = { fig, holder, bar };
      } else if (event === "step") {
        const f = figures[data.index];
        f.bar.max = data.num_steps;
        f.bar.value = data.step;
      } else if (event === "image_done") {
        const f = figures[data.index];
        const img = el("img", "generated");
        img.src = data.image;
        img.alt = "generated image " + (data.index + 1);
        f.fig.replaceChild(img, f.holder);
        f.bar.remove();
        answerContent.push({ type: "image", image: data.image });
      } else if (event === "finished") {
        setStatus(data.stats.images + " image(s), " + data.stats.new_tokens + " tokens, " + data.finish_reason +
                  ", " + data.stats.total_s.toFixed(2) + " s");
        history.push({ role: "user", content: userContent });
        history.push({ role: "assistant", content: answerContent });
      } else if (event === "error") {
        throw new Error(data.detail);
      }
    }
  } catch (err) {
    answer.appendChild(el("div", "error", "error: " + err.message));
    setStatus(String(err.message), true);
  } finally {
    $("send").disabled = false;
  }
});

fetch("/api/model").then((r) => r.json()).then((info) => {
  $("model-info").textContent = info.model + " · preset " + info.preset + " · images " +
    info.image_size.join("x") + " · " + info.num_steps + " steps";
}).catch(() => { $("model-info").textContent = "model info unavailable"; });
