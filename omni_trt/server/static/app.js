// The omni-trt playground. It reads the model card (GET /v1/models; a 401 there is how it learns
// the server wants a key), then streams POST /v1/images/generations with fetch() and its own SSE
// parser (EventSource cannot POST), showing each partial image as it arrives, then the finals.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "omni-trt-api-key"; // sessionStorage: this tab only, gone when it closes
const state = { key: sessionStorage.getItem(KEY) || "", card: null, controller: null };

// An error already worded for the reader.
class Shown extends Error {}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function errorText(res) {
  // The server's errors carry {error: {message}}; anything else (a proxy's page) shows its status.
  let message = res.statusText || "request failed";
  try {
    const body = await res.json();
    message = body.error?.message ?? JSON.stringify(body.detail ?? body);
  } catch (_) { /* not JSON */ }
  return `${res.status}: ${message}`;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

// ---- the model card ----

async function loadModel() {
  let res;
  try {
    res = await fetch("/v1/models", { headers: headers(false) });
  } catch (e) {
    $("model").textContent = "Cannot reach the server.";
    showError(e.message);
    return;
  }
  if (res.status === 401) {
    $("model").textContent = "This server needs an API key.";
    $("key-form").hidden = false;
    if (state.key) showError(await errorText(res)); // the key given is wrong
    return;
  }
  if (!res.ok) {
    showError(await errorText(res));
    return;
  }
  const card = (await res.json()).data[0];
  if (!card.ready) {
    $("model").textContent = `${card.id}: the model is loading…`;
    setTimeout(loadModel, 2000);
    return;
  }
  state.card = card;
  showError("");
  $("model").textContent = `${card.id} (${card.family}, ${card.runtime} on ${card.device}). Sizes: ${card.sizes}.`;
  fillSizes(card);
  $("cache-box").hidden = card.cache?.backend !== "mag_cache"; // the switch only where the server runs a step cache
  if (card.input_images === "required") {
    // An edit-only model: the form will not submit without an image, instead of a 400 after the fact.
    $("inputs").required = true;
    $("inputs-hint").textContent = "Required: this model only edits images (/v1/images/edits); the prompt says how.";
  }
  if ($("steps").value === "") $("steps").value = card.defaults.num_inference_steps; // keep what the user typed
}

function sizeChoices(card) {
  // A few sizes inside the card's ranges, the default among them, smallest first.
  const lim = card.size_limits;
  const [dw, dh] = card.defaults.size.split("x").map(Number);
  const m = lim.multiple_of;
  const snap = (v) => Math.round(v / m) * m;
  const fits = (w, h) => w % m === 0 && h % m === 0 && w >= lim.min_width && w <= lim.max_width
    && h >= lim.min_height && h <= lim.max_height;
  const out = [];
  const add = (w, h) => {
    const s = `${w}x${h}`;
    if (fits(w, h) && !out.includes(s)) out.push(s);
  };
  const low = Math.max(lim.min_width, lim.min_height);
  for (const side of [low, 128, 256, 512, 768, 1024, 1536, 2048]) add(side, side);
  add(dw, dh);
  add(dw, snap(dh * 3 / 4)); // landscape and portrait at the default's width
  add(snap(dw * 3 / 4), dh);
  if (!out.length) add(lim.min_width, lim.min_height); // an engine profile with no square in it
  const area = (s) => s.split("x").reduce((a, b) => a * b);
  return out.sort((a, b) => area(a) - area(b) || a.localeCompare(b));
}

function fillSizes(card) {
  const select = $("size");
  const keep = select.value;
  select.replaceChildren();
  for (const s of sizeChoices(card)) {
    const label = s === card.defaults.size ? `${s} (default)` : s;
    select.append(new Option(label, s, false, s === card.defaults.size));
  }
  select.append(new Option("auto (the model's default)", "auto"));
  if ([...select.options].some((o) => o.value === keep && keep !== "auto")) select.value = keep;
}

// ---- server-sent events over fetch ----

async function* sseEvents(body) {
  // Yields {event, data} per event; comments (the server's keep-alives) are skipped.
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", event = "message", data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop(); // an unfinished line waits for the next chunk
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield { event, data: data.join("\n") };
          event = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") event = value;
          else if (field === "data") data.push(value);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // leaving early (an error event, Stop) closes the stream
  }
}

// ---- one generation ----

function figureFor(index, total) {
  const fig = document.createElement("figure");
  fig.dataset.index = index;
  fig.dataset.state = "waiting";
  const img = document.createElement("img");
  img.alt = `Image ${index + 1} of ${total}, waiting`;
  const caption = document.createElement("figcaption");
  const text = document.createElement("span");
  text.textContent = "waiting…";
  const link = document.createElement("a");
  link.hidden = true;
  link.textContent = "Download";
  caption.append(text, " ", link);
  fig.append(img, caption);
  return fig;
}

function show(fig, event, data, run) {
  const img = fig.querySelector("img");
  const [w, h] = data.size.split("x").map(Number);
  img.width = w;
  img.height = h;
  img.classList.toggle("pixelated", w < 256 || h < 256);
  const url = `data:image/${data.output_format};base64,${data.b64_json}`;
  const i = Number(fig.dataset.index);
  const text = fig.querySelector("span");
  if (event.endsWith(".partial_image")) {
    fig.dataset.state = "preview";
    img.alt = `Image ${i + 1} of ${run.n}, preview ${data.partial_image_index + 1}`;
    text.textContent = `preview ${data.partial_image_index + 1} of ${run.partials}`;
  } else {
    fig.dataset.state = "final";
    img.alt = `Image ${i + 1} of ${run.n}, final`;
    const steps = data.denoise_steps;
    text.textContent = `final, ${data.size}` + (steps ? `, steps computed ${steps.computed} / reused ${steps.reused}` : "");
    const link = fig.querySelector("a");
    const ext = data.output_format === "jpeg" ? "jpg" : data.output_format;
    link.href = url;
    link.download = `omni-trt-${run.seed ?? data.created_at}-${i + 1}.${ext}`;
    link.hidden = false;
  }
  img.src = url;
}

function progress(run) {
  const secs = (t) => ((t - run.t0) / 1000).toFixed(2) + " s";
  const parts = [`${run.previews} preview${run.previews === 1 ? "" : "s"}`, `${run.finals} of ${run.n} images`];
  if (run.first !== null) parts.push(`first event after ${secs(run.first)}`);
  if (run.finals === run.n) parts.push(`done in ${secs(run.last)}`);
  if (run.usage) {
    parts.push(`usage: ${run.usage.input_tokens} input tokens, ${run.output_tokens} output tokens`);
  }
  $("progress").textContent = parts.join(" · ");
  const images = $("images");
  images.dataset.previews = run.previews;
  images.dataset.finals = run.finals;
}

function requestBody() {
  const body = { prompt: $("prompt").value, stream: true, n: Number($("n").value), partial_images: Number($("partials").value) };
  const negative = $("negative").value.trim();
  if (negative) body.negative_prompt = negative;
  if ($("size").value) body.size = $("size").value;
  if ($("steps").value !== "") body.num_inference_steps = Number($("steps").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (!$("cache-box").hidden && !$("cache").checked) body.cache = false;
  return body;
}

function imageRequest(body, files) {
  // [url, fetch options]: a generation as JSON, or with input images an edit as multipart (as
  // OpenAI's SDK sends it: one file in `image`, several in `image[]`).
  if (!files.length) {
    return ["/v1/images/generations", { method: "POST", headers: headers(true), body: JSON.stringify(body) }];
  }
  const form = new FormData();
  for (const [k, v] of Object.entries(body)) form.append(k, String(v));
  for (const f of files) form.append(files.length === 1 ? "image" : "image[]", f, f.name);
  return ["/v1/images/edits", { method: "POST", headers: headers(false), body: form }];
}

function busy(on) {
  $("go").disabled = on;
  $("stop").disabled = !on;
  $("images").setAttribute("aria-busy", on ? "true" : "false");
}

async function generate(ev) {
  ev.preventDefault();
  if (state.controller) return;
  showError("");
  const body = requestBody();
  const steps = body.num_inference_steps ?? state.card?.defaults.num_inference_steps ?? Infinity;
  const run = { n: body.n, partials: Math.min(body.partial_images, steps - 1), seed: body.seed, previews: 0, finals: 0,
                usage: null, output_tokens: 0, t0: performance.now(), first: null, last: null };
  const figures = Array.from({ length: run.n }, (_, i) => figureFor(i, run.n));
  $("images").replaceChildren(...figures);
  progress(run);
  state.controller = new AbortController();
  busy(true);
  try {
    const [url, options] = imageRequest(body, [...$("inputs").files]);
    const res = await fetch(url, { ...options, signal: state.controller.signal });
    // An invalid request is a JSON 4xx before any event.
    if (!res.ok || !(res.headers.get("content-type") || "").startsWith("text/event-stream")) {
      if (res.status === 401) askForKey();
      throw new Shown(await errorText(res));
    }
    for await (const { event, data } of sseEvents(res.body)) {
      const payload = JSON.parse(data);
      if (event === "error") {
        const err = payload.error || {};
        throw new Shown(`${err.code ?? "error"}: ${err.message ?? data}`);
      }
      if (!event.endsWith(".partial_image") && !event.endsWith(".completed")) continue;
      run.first ??= performance.now();
      const fig = figures[payload.image_index ?? 0];
      if (!fig) continue;
      if (event.endsWith(".partial_image")) {
        run.previews += 1;
      } else {
        run.finals += 1;
        run.last = performance.now();
        run.usage = payload.usage;
        run.output_tokens += payload.usage.output_tokens; // each completed event counts its own image
      }
      show(fig, event, payload, run);
      progress(run);
    }
    if (run.finals < run.n) throw new Shown("The stream ended before every image was done.");
  } catch (e) {
    if (e.name === "AbortError") $("progress").textContent = "Stopped: the server stops the work.";
    else showError(e instanceof Shown ? e.message : `The request failed: ${e.message}`);
  } finally {
    state.controller = null;
    busy(false);
  }
}

function useKey(ev) {
  ev.preventDefault();
  state.key = $("key").value.trim();
  if (state.key) sessionStorage.setItem(KEY, state.key);
  else sessionStorage.removeItem(KEY);
  loadModel();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = state.key;
  $("key-form").addEventListener("submit", useKey);
  $("generate").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("generate").requestSubmit();
  });
  loadModel();
});
