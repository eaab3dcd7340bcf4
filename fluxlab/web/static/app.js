// fluxlab's page scripts: plain JavaScript, served by fluxlab itself. Every action goes through the public /v1 API
// (the session cookie authenticates same-origin requests); user text is only ever set as text, never as HTML.
"use strict";

const FIELDS = ["prompt", "negative", "width", "height", "steps", "guidance", "seed", "num_images", "sampler",
  "schedule", "cache", "eta", "strength", "preset", "template", "lora", "images", "init", "mask", "model",
  "upsampled_from", "lora_file"];

async function api(method, path, body, headers = {}) {
  const init = { method, credentials: "same-origin", headers: { ...headers } };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["content-type"] = "application/json"; }
  const r = await fetch(path, init);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  return { status: r.status, data };
}

// One file (or a drawn blob) uploaded through /v1/files: its id, or null after showing the error at `field`.
async function uploadFile(form, field, file, name) {
  const fd = new FormData();
  fd.append("file", file, name);
  const up = await api("POST", "/v1/files", fd);
  if (up.status === 201) return up.data.id;
  showError(form, `${field}: ${up.data ? up.data.detail : up.status}`);
  return null;
}

function el(tag, attrs = {}, text = null) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
}

// A 422 names its field the way the CLI does ("width 100 is not ...", "input.steps: ..."): show it there.
function fieldOf(message) {
  const m = /^(?:input\.)?([a-z_]+)/.exec(message || "");
  if (m && FIELDS.includes(m[1])) return m[1];
  for (const f of FIELDS) if (new RegExp("\\b" + f + "\\b").test(message)) return f;
  return "";
}

function clearErrors(form) { form.querySelectorAll(".error[data-js]").forEach((e) => e.remove()); }

// The CLI's flags in an error, as the page labels them (the server's PAGE_WORDS, in the page as JSON).
function inPageWords(message) {
  const words = document.getElementById("page-words");
  if (!words) return message;
  const map = JSON.parse(words.textContent);
  for (const flag of Object.keys(map).sort((a, b) => b.length - a.length)) {
    message = message.split(flag).join(map[flag]);
  }
  return message;
}

function showError(form, message, named = null) {
  const field = named && FIELDS.includes(named) ? named : fieldOf(message);
  const input = field && form.querySelector(`[name="${field}"]`);
  const note = el("span", { class: "error", "data-testid": "field-error", "data-field": field, "data-js": "1" },
    inPageWords(message));
  if (input) input.closest("label").appendChild(note);
  else form.prepend(note);
}

function formatEta(s) { return s == null ? "" : ` · about ${Math.max(0, Math.round(s))} s left`; }

// Live progress from a job's Server-Sent Events (EventSource reconnects by itself, with Last-Event-ID).
function follow(streamUrl, handlers) {
  const source = new EventSource(streamUrl);
  for (const [name, fn] of Object.entries(handlers)) {
    source.addEventListener(name, (ev) => fn(JSON.parse(ev.data)));
  }
  source.addEventListener("done", () => source.close());
  return source;
}

function outputLink(url) {
  const id = url.split("/").pop();
  const a = el("a", { href: `/image/${id}` });
  a.appendChild(el("img", { src: `${url}?thumb=256`, alt: "output" }));
  return a;
}

// -- generate ----------------------------------------------------------------------------------------------------
// A chosen LoRA's trigger word, offered for the prompt when the prompt lacks it.
function setupTriggers(form) {
  const row = document.getElementById("trigger-row");
  const button = document.getElementById("add-trigger");
  const missing = () => {
    const prompt = form.elements.prompt.value.toLowerCase();
    for (const pick of form.querySelectorAll("select.lora-pick")) {
      const word = pick.selectedOptions[0] ? pick.selectedOptions[0].dataset.trigger : "";
      if (word && !prompt.includes(word.toLowerCase())) return word;
    }
    return "";
  };
  const update = () => {
    const word = missing();
    row.hidden = !word;
    button.textContent = word ? `Add "${word}" to the prompt` : "";
    button.dataset.word = word;
  };
  button.addEventListener("click", () => {
    const p = form.elements.prompt;
    p.value = `${button.dataset.word} ${p.value}`.trim();
    update();
  });
  form.querySelectorAll("select.lora-pick").forEach((s) => s.addEventListener("change", update));
  form.elements.prompt.addEventListener("input", update);
  update();
}

// "Upsample prompt": POST /v1/upsamples rewrites the prompt with the model's text encoder; the rewrite replaces
// the prompt (editable) and the words as written go with the prediction as upsampled_from.
function setupUpsample(form, model) {
  const button = document.getElementById("upsample");
  document.getElementById("upsample-row").hidden = false;
  button.addEventListener("click", async () => {
    clearErrors(form);
    const written = form.elements.upsampled_from.value || form.elements.prompt.value;
    const input = { prompt: form.elements.prompt.value };
    const seed = form.elements.seed.value.trim();
    if (/^\d+$/.test(seed)) input.seed = parseInt(seed, 10);
    button.disabled = true;
    button.textContent = "Upsampling…";
    const r = await api("POST", "/v1/upsamples", { model: model.value, input }, { Prefer: "wait=300" });
    button.disabled = false;
    button.textContent = "Upsample prompt";
    if (r.status !== 201) {  // shown beside the prompt unless it names another field
      const message = r.data ? String(r.data.detail) : `error ${r.status}`;
      showError(form, fieldOf(message) ? message : `prompt: ${message}`);
      return;
    }
    if (r.data.status !== "succeeded") { showError(form, `prompt: ${r.data.error || r.data.status}`); return; }
    form.elements.prompt.value = r.data.output.prompts[0];
    form.elements.upsampled_from.value = written;
  });
  form.elements.prompt.addEventListener("input", () => {  // cleared, the prompt is the user's own again
    if (!form.elements.prompt.value.trim()) form.elements.upsampled_from.value = "";
  });
}

// -- inputs shown as thumbnails, each removable; the inpainting mask drawn on the init image -----------------------
// A file input's chosen files appear as thumbnails with a Remove button (the input's FileList is rebuilt without
// the removed one); a kept upload (from Reuse or "Send to") is its thumbnail with a Remove button that unchecks it.
function setupPicks(form, onChange) {
  for (const box of form.querySelectorAll(".inputs")) {
    const input = box.querySelector('input[type="file"]');
    const thumbs = box.querySelector(".picked");
    const removeButton = (label, onClick) => {
      const b = el("button", { type: "button", class: "remove", "data-testid": "remove", "aria-label": `remove ${label}` },
        "Remove");
      b.addEventListener("click", onClick);
      return b;
    };
    const drop = (kept) => { kept.querySelector('input[type="checkbox"]').checked = false; kept.hidden = true; };
    for (const kept of thumbs.querySelectorAll(".kept")) {
      kept.querySelector('input[type="checkbox"]').closest("label").hidden = true;
      kept.appendChild(removeButton(kept.querySelector("img").alt, () => { drop(kept); onChange(); }));
    }
    const show = () => {
      thumbs.querySelectorAll(".chosen").forEach((e) => e.remove());
      Array.from(input.files || []).forEach((f, i) => {
        const pick = el("span", { class: "pick chosen", "data-testid": "picked" });
        pick.appendChild(el("img", { src: URL.createObjectURL(f), alt: f.name, width: 64, height: 64 }));
        pick.appendChild(removeButton(f.name, () => {
          const keep = new DataTransfer();
          Array.from(input.files).forEach((g, j) => { if (j !== i) keep.items.add(g); });
          input.files = keep.files;
          show();
        }));
        thumbs.appendChild(pick);
      });
      if (!input.multiple && input.files.length) thumbs.querySelectorAll(".kept").forEach(drop);  // a new one replaces it
      onChange();
    };
    input.addEventListener("change", show);
  }
}

// The mask editor: the init image with the painting over it. Two canvases at the init's size take every stroke:
// `layer` is the mask itself (opaque: black, white where painted: what is uploaded, exact under Invert), `tint` the
// same strokes in a colour on transparent, shown over the image (white strokes would vanish on a white picture).
function setupMask(form) {
  const editor = document.getElementById("mask-editor");
  const row = document.getElementById("mask-row");
  const view = document.getElementById("mask-view");
  const size = document.getElementById("mask-size");
  const layer = document.createElement("canvas");
  const tint = document.createElement("canvas");
  const TINT = [230, 0, 120];  // the strokes' colour on the image (RGB)
  const state = { image: null, painted: false, erase: false, source: "" };
  const paint = () => {
    const ctx = view.getContext("2d");
    ctx.globalAlpha = 1;
    ctx.drawImage(state.image, 0, 0, view.width, view.height);
    ctx.globalAlpha = 0.55;
    ctx.drawImage(tint, 0, 0);
    ctx.globalAlpha = 1;
  };
  const blank = () => {
    const ctx = layer.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, layer.width, layer.height);
    tint.getContext("2d").clearRect(0, 0, tint.width, tint.height);
    state.painted = false;
  };
  const initSource = () => {  // the chosen init file, else the kept init upload
    const file = (form.elements.init.files || [])[0];
    if (file) return URL.createObjectURL(file);
    const kept = form.querySelector('input[name="keep_init"]:checked');
    return kept ? `/v1/files/${kept.value}/content` : "";
  };
  const load = (open) => {
    const src = initSource();
    row.hidden = !src || !editor.hidden;
    if (!src) { editor.hidden = true; state.image = null; state.painted = false; return; }
    if (src === state.source) { if (open) { editor.hidden = false; row.hidden = true; } return; }
    state.source = src;
    const img = new Image();
    img.onload = () => {
      state.image = img;
      view.width = layer.width = tint.width = img.naturalWidth;
      view.height = layer.height = tint.height = img.naturalHeight;
      size.max = String(Math.max(8, Math.round(Math.max(img.naturalWidth, img.naturalHeight) / 2)));
      size.value = String(Math.max(1, Math.round(Math.max(img.naturalWidth, img.naturalHeight) / 12)));
      blank();
      paint();
      if (open) { editor.hidden = false; row.hidden = true; }
    };
    img.src = src;
  };
  document.getElementById("draw-mask").addEventListener("click", () => { editor.hidden = false; row.hidden = true; });
  const tool = (erase) => {
    state.erase = erase;
    document.getElementById("mask-brush").setAttribute("aria-pressed", String(!erase));
    document.getElementById("mask-eraser").setAttribute("aria-pressed", String(erase));
  };
  document.getElementById("mask-brush").addEventListener("click", () => tool(false));
  document.getElementById("mask-eraser").addEventListener("click", () => tool(true));
  document.getElementById("mask-clear").addEventListener("click", () => { blank(); paint(); });
  document.getElementById("mask-invert").addEventListener("click", () => {
    const ctx = layer.getContext("2d");
    const px = ctx.getImageData(0, 0, layer.width, layer.height);
    const shown = tint.getContext("2d").createImageData(tint.width, tint.height);
    for (let i = 0; i < px.data.length; i += 4) {
      const v = 255 - px.data[i];
      px.data[i] = px.data[i + 1] = px.data[i + 2] = v;
      shown.data.set([...TINT, v], i);
    }
    ctx.putImageData(px, 0, 0);
    tint.getContext("2d").putImageData(shown, 0, 0);
    state.painted = true;
    paint();
  });
  let last = null;
  const at = (ev) => {  // the pointer in the init image's pixels (the canvas is shown scaled)
    const r = view.getBoundingClientRect();
    return [(ev.clientX - r.left) * view.width / r.width, (ev.clientY - r.top) * view.height / r.height];
  };
  const stroke = (to) => {
    const from = last || to;
    for (const [canvas, colour, op] of [[layer, state.erase ? "#000" : "#fff", "source-over"],
                                        [tint, `rgb(${TINT})`, state.erase ? "destination-out" : "source-over"]]) {
      const ctx = canvas.getContext("2d");
      ctx.globalCompositeOperation = op;
      ctx.strokeStyle = colour;
      ctx.lineWidth = Number(size.value);
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath(); ctx.moveTo(from[0], from[1]); ctx.lineTo(to[0], to[1]); ctx.stroke();
      ctx.globalCompositeOperation = "source-over";
    }
    last = to;
    state.painted = true;
    paint();
  };
  view.addEventListener("pointerdown", (ev) => { if (!state.image) return; view.setPointerCapture(ev.pointerId); last = null; stroke(at(ev)); });
  view.addEventListener("pointermove", (ev) => { if (last) stroke(at(ev)); });
  const end = () => { last = null; };
  view.addEventListener("pointerup", end);
  view.addEventListener("pointercancel", end);
  load(editor.dataset.open === "1");
  return {
    refresh: () => load(false),
    // The drawn mask as a PNG, when there is one to send (painted, open, and no mask file or kept mask given).
    blob: () => new Promise((resolve) => {
      const given = (form.elements.mask.files || []).length || form.querySelector('input[name="keep_mask"]:checked');
      if (!state.image || !state.painted || editor.hidden || given) { resolve(null); return; }
      layer.toBlob(resolve, "image/png");
    }),
  };
}

function setupGenerate() {
  const form = document.getElementById("generate");
  const model = form.querySelector('[name="model"]');
  const negative = document.getElementById("negative-field");
  const aspect = document.getElementById("aspect");
  const toggleNegative = () => {  // and the model's own defaults as placeholders, its size presets, its state
    const opt = model.selectedOptions[0];
    negative.hidden = !opt || opt.dataset.guidanceMode !== "cfg";
    for (const name of ["width", "height", "steps", "guidance"]) {
      form.elements[name].placeholder = opt ? opt.dataset[name] || "" : "";
    }
    document.getElementById("model-note").textContent = opt ? opt.dataset.note || "" : "";
    const keep = aspect.value;
    aspect.replaceChildren(aspect.options[0]);
    for (const entry of (opt && opt.dataset.sizes ? opt.dataset.sizes.split(",") : [])) {
      const [name, wh] = entry.split("=");
      aspect.appendChild(el("option", { value: wh }, `${name} (${wh})`));
    }
    aspect.value = Array.from(aspect.options).some((o) => o.value === keep) ? keep : "";
  };
  model.addEventListener("change", toggleNegative);
  toggleNegative();
  const dice = document.getElementById("dice");
  dice.hidden = false;  // without JavaScript an empty seed is the random one
  dice.addEventListener("click", () => {
    form.querySelector('[name="seed"]').value = String(Math.floor(Math.random() * 4294967296));
  });
  aspect.addEventListener("change", (ev) => {
    if (!ev.target.value) return;
    const [w, h] = ev.target.value.split("x");
    form.querySelector('[name="width"]').value = w;
    form.querySelector('[name="height"]').value = h;
  });
  setupUpsample(form, model);
  setupTriggers(form);
  const mask = setupMask(form);
  setupPicks(form, () => mask.refresh());
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form);
    const input = {};
    for (const name of ["prompt", "negative", "sampler", "schedule", "cache", "preset", "template", "upsampled_from"]) {
      const v = form.elements[name].value;
      if (v !== "" && !(name === "negative" && negative.hidden)) input[name] = v;
    }
    for (const name of ["width", "height", "steps", "seed", "num_images"]) {
      const v = form.elements[name].value.trim();
      if (v !== "") input[name] = /^-?\d+$/.test(v) ? parseInt(v, 10) : v;
    }
    for (const name of ["guidance", "strength", "eta"]) {
      const v = form.elements[name].value.trim();
      if (v !== "") input[name] = isNaN(Number(v)) ? v : Number(v);
    }
    const stack = [];
    for (const pick of form.querySelectorAll("select.lora-pick")) {  // lora, lora_2, ...: each with its scale
      const scale = form.elements[pick.name.replace("lora", "lora_scale")].value || "1";
      if (pick.value) stack.push({ name: pick.value, scale: Number(scale) });
    }
    const file = (form.elements.lora_file.files || [])[0];
    if (file) {  // an uploaded LoRA joins the stack at scale 1
      const id = await uploadFile(form, "lora_file", file, file.name);
      if (!id) return;
      stack.push({ name: id, scale: 1 });
    }
    if (stack.length) input.lora = stack;
    for (const name of ["images", "init", "mask"]) {
      const files = Array.from(form.elements[name].files || []);
      const ids = [];
      for (const f of files) {
        const id = await uploadFile(form, name, f, f.name);
        if (!id) return;
        ids.push(id);
      }
      // kept uploads, by id: a new init or mask replaces the kept one; new reference images join the kept ones
      const kept = Array.from(form.querySelectorAll(`input[name="keep_${name}"]:checked`), (k) => k.value);
      const all = name === "images" ? [...kept, ...ids] : (ids.length ? ids : kept);
      if (all.length) input[name] = name === "images" ? all : all[0];
    }
    const drawn = await mask.blob();
    if (drawn) {
      input.mask = await uploadFile(form, "mask", drawn, "mask.png");
      if (!input.mask) return;
    }
    const r = await api("POST", "/v1/predictions", { model: model.value, input });
    if (r.status !== 201) {  // every problem at once, each beside its field
      const all = r.status === 422 ? await api("POST", "/v1/predictions/validate", { model: model.value, input }) : null;
      const errors = all && all.status === 200 && all.data.errors.length ? all.data.errors : null;
      if (!errors) { showError(form, r.data ? r.data.detail : `error ${r.status}`); return; }
      for (const e of errors) showError(form, e.detail, e.field);
      return;
    }
    watchPrediction(r.data);
  });
}

const SEND_TO = [["img2img", "Send to img2img"], ["inpaint", "Send to inpaint"], ["reference", "Use as reference"]];

// A finished image as the result panel shows it: large, with its seed, size and time, Download and Reuse.
function resultFigure(url, seed) {
  const figure = el("figure", { "data-testid": "result" });
  const link = outputLink(url);
  const img = link.firstChild;
  img.src = url;  // the image itself, not a thumbnail
  figure.appendChild(link);
  const cap = el("figcaption");
  const said = el("span", {}, seed !== undefined ? `seed ${seed} · ` : "");
  img.addEventListener("load", () => { said.textContent += `${img.naturalWidth}x${img.naturalHeight} · `; });
  cap.appendChild(said);
  const id = url.split("?")[0].split("/").pop();
  cap.appendChild(el("a", { href: url, download: `${id}.png` }, "Download"));
  cap.appendChild(el("a", { href: `/?from=${id}`, "data-testid": "result-reuse" }, "Reuse"));
  for (const [mode, label] of SEND_TO) cap.appendChild(el("a", { href: `/?from=${id}&send=${mode}`, "data-testid": `send-${mode}` }, label));
  figure.appendChild(cap);
  return figure;
}

function watchPrediction(job) {
  const live = document.getElementById("live");
  live.hidden = false;
  const bar = live.querySelector("progress");
  const text = document.getElementById("progress-text");
  const preview = document.getElementById("preview");
  const results = document.getElementById("results");
  const history = document.getElementById("history");
  const cancel = document.getElementById("cancel");
  bar.value = 0;
  text.textContent = "queued";
  preview.hidden = true;
  for (const figure of Array.from(results.children).reverse()) history.prepend(figure);  // this visit's earlier ones
  document.getElementById("history-box").hidden = history.children.length === 0;
  cancel.hidden = false;
  cancel.onclick = () => api("POST", `/v1/predictions/${job.id}/cancel`);
  let started = false;
  const where = async () => {  // while it waits: its place in the queue, and whether the queue is paused
    if (started) return;
    const q = await api("GET", "/v1/queue");
    if (started || q.status !== 200) return;
    const i = q.data.pending.findIndex((p) => p.id === job.id);
    if (i >= 0) {
      text.textContent = `queued: position ${i + 1} of ${q.data.pending.length}` +
        (q.data.paused ? " · the queue is paused" : "");
    }
    setTimeout(where, 1000);
  };
  where();
  const input = job.input || {};
  follow(job.urls.stream, {
    status: (d) => {
      if (d.status === "starting" && !d.loading) return;  // still waiting: the queue line stays
      started = true;
      text.textContent = d.status + (d.loading ? ` (loading ${d.loading})` : "");
      if (d.status === "succeeded") preview.hidden = true;  // the image replaces it
    },
    progress: (d) => {
      started = true;
      bar.max = d.total * (d.images || 1);
      bar.value = (d.image || 0) * d.total + d.step;
      text.textContent = `step ${d.step}/${d.total}` + (d.images > 1 ? ` · image ${d.image + 1}/${d.images}` : "") +
        formatEta(d.eta_s);
    },
    preview: (d) => { preview.src = `${d.url}&t=${Date.now()}`; preview.hidden = false; },
    output: (d) => {
      results.appendChild(resultFigure(d.url, d.seed !== undefined ? d.seed : (input.seeds || [])[d.index]));
    },
    done: async (d) => {
      started = true;
      cancel.hidden = true;
      text.textContent = d.status + (d.error ? `: ${d.error}` : "");
      if (d.status !== "succeeded") return;
      bar.value = bar.max;
      preview.hidden = true;  // the image replaces it
      const j = await api("GET", `/v1/predictions/${job.id}`);
      const seconds = j.status === 200 && j.data.metrics ? j.data.metrics.predict_time : null;
      if (seconds != null) text.textContent = `succeeded in ${seconds.toFixed(1)} s`;
    },
  });
}

// -- a job's page (prediction, grid, batch) ----------------------------------------------------------------------
function setupJob() {
  const body = document.body;
  const bar = document.querySelector("progress");
  const text = document.getElementById("progress-text");
  const status = document.getElementById("status");
  const preview = document.getElementById("preview");
  const results = document.getElementById("results");
  if (["succeeded", "failed", "canceled"].includes(status.textContent)) return;
  follow(body.dataset.stream, {
    status: (d) => { status.textContent = d.status; },
    progress: (d) => {
      if (d.step !== undefined) { bar.max = d.total; bar.value = d.step; text.textContent = `step ${d.step}/${d.total}` + formatEta(d.eta_s); }
      else if (d.done_bytes !== undefined) {
        bar.max = Math.max(d.total_bytes, 1); bar.value = d.done_bytes;
        text.textContent = `${(d.done_bytes / 1e9).toFixed(2)} of ${(d.total_bytes / 1e9).toFixed(2)} GB` + formatEta(d.eta_s);
      }
      else { bar.max = d.total; bar.value = d.done; text.textContent = `${d.done}/${d.total}`; }
    },
    preview: (d) => { preview.src = `${d.url}&t=${Date.now()}`; preview.hidden = false; },
    output: (d) => { if (d.kind === "image" || d.kind === "cell") results.appendChild(outputLink(d.url)); },
    done: () => window.setTimeout(() => window.location.reload(), 300),
  });
}

// -- a training's page: the loss chart and live progress ---------------------------------------------------------
// The same chart the server draws (web/chart.py): raw losses faint, their debiased moving average (0.9) over
// them, step and loss axes, linear or log (the canvas's data-scale).
function drawLoss(canvas, losses) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 56, bottom = 28, top = 10, right = 10;
  const css = getComputedStyle(document.body);
  ctx.clearRect(0, 0, w, h);
  canvas.dataset.points = String(losses.length);
  if (!losses.length) return;
  const log = canvas.dataset.scale === "log";
  const f = (v) => (log ? Math.log10(Math.max(v, 1e-12)) : v);
  const ys = losses.map(f);
  const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
  const px = (i) => left + (w - left - right) * (losses.length > 1 ? i / (losses.length - 1) : 0);
  const py = (y) => top + (h - top - bottom) * (1 - (y - lo) / span);
  const smooth = [];
  let last = 0, norm = 0;
  for (const v of losses) { last = 0.9 * last + 0.1 * v; norm = 0.9 * norm + 0.1; smooth.push(last / norm); }
  canvas.dataset.smoothed = String(smooth.length);
  ctx.strokeStyle = css.getPropertyValue("--field-line") || "#8a919c";
  ctx.beginPath(); ctx.moveTo(left, top); ctx.lineTo(left, h - bottom); ctx.lineTo(w - right, h - bottom); ctx.stroke();
  const accent = css.getPropertyValue("--accent-line") || "#2445a8";
  for (const [values, alpha, width] of [[losses, 0.35, 1], [smooth, 1, 2]]) {
    ctx.strokeStyle = accent; ctx.globalAlpha = alpha; ctx.lineWidth = width;
    ctx.beginPath();
    values.forEach((v, i) => { if (i === 0) ctx.moveTo(px(i), py(f(v))); else ctx.lineTo(px(i), py(f(v))); });
    ctx.stroke();
  }
  ctx.globalAlpha = 1; ctx.lineWidth = 1;
  ctx.fillStyle = css.getPropertyValue("--muted") || "#4a4f57";
  ctx.font = "11px system-ui";
  const shown = (y) => (log ? 10 ** y : y).toPrecision(4);
  ctx.fillText(shown(hi), 2, top + 10);
  ctx.fillText(shown(lo), 2, h - bottom);
  ctx.fillText(log ? "log10 loss" : "loss", 2, h / 2);
  ctx.fillText("step 1", left, h - 6);
  ctx.fillText(`step ${losses.length}`, w - right - 70, h - 6);
}

async function setupTraining() {
  const body = document.body;
  const canvas = document.getElementById("loss");
  const bar = document.querySelector("progress");
  const text = document.getElementById("progress-text");
  const status = document.getElementById("status");
  const samples = document.getElementById("samples");
  canvas.hidden = false;  // the live chart takes the server-drawn one's place
  document.getElementById("loss-svg").hidden = true;
  let losses = (canvas.dataset.losses || "").split(",").filter((x) => x !== "").map(Number);
  const r = await api("GET", `/v1/trainings/${body.dataset.job}/loss`);
  if (r.status === 200) losses = r.data.steps.map((s) => s.loss);
  drawLoss(canvas, losses);
  if (["succeeded", "failed", "canceled"].includes(status.textContent)) return;
  follow(body.dataset.stream, {
    status: (d) => { status.textContent = d.status; },
    progress: async (d) => {
      bar.max = d.total; bar.value = d.step;
      text.textContent = `step ${d.step}/${d.total} · loss ${Number(d.loss).toFixed(4)}` + formatEta(d.eta_s);
      if (d.step === losses.length + 1) losses.push(Number(d.loss));
      else {  // progress events come at most ~4 a second: fetch the steps in between
        const all = await api("GET", `/v1/trainings/${body.dataset.job}/loss`);
        if (all.status === 200) losses = all.data.steps.map((s) => s.loss);
      }
      drawLoss(canvas, losses);
    },
    output: (d) => {  // a sample, labelled with its step and its prompt (the prompts go round at each step)
      if (d.kind !== "sample") return;
      const prompts = JSON.parse(samples.dataset.prompts || "[]");
      const figure = el("figure", { "data-testid": "sample-figure" });
      figure.appendChild(el("img", { src: d.url, alt: `sample at step ${d.step}`, "data-testid": "sample" }));
      const prompt = prompts.length ? prompts[(d.index || 0) % prompts.length] : "";
      figure.appendChild(el("figcaption", { "data-testid": "sample-label" }, `step ${d.step}` + (prompt ? ` · ${prompt}` : "")));
      samples.appendChild(figure);
    },
    done: () => window.setTimeout(() => window.location.reload(), 300),
  });
}

// -- the queue: follows GET /v1/queue as an event stream; on each change the server's own rendering of the list
// replaces the one shown (one template for both), so nothing reloads under a Cancel click while nothing changes.
function setupQueue() {
  const section = document.querySelector("main section.card");
  let first = true;
  const source = new EventSource("/v1/queue");
  source.addEventListener("queue", async () => {
    if (first) { first = false; return; }  // the state the page was rendered with
    const r = await fetch("/queue", { credentials: "same-origin" });
    if (!r.ok) return;
    const fresh = new DOMParser().parseFromString(await r.text(), "text/html").querySelector("main section.card");
    if (fresh) section.replaceChildren(...Array.from(fresh.childNodes, (n) => document.importNode(n, true)));
    section.dataset.updates = String(Number(section.dataset.updates || 0) + 1);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "generate") setupGenerate();
  else if (page === "job") setupJob();
  else if (page === "training") setupTraining();
  else if (page === "queue") setupQueue();
  // A page that is waiting for a job (a dataset being captioned) reloads itself, as its <noscript> refresh does.
  const reload = Number(document.body.dataset.reload || 0);
  if (reload > 0) setTimeout(() => location.reload(), reload * 1000);
});
