// The page: choices from GET /v1/models/{m} (the server's registries), one streamed
// explain call per image, and the overlays, masks and boxes redrawn here when a slider
// moves. Everything comes from this server; nothing is fetched from elsewhere.
import { ApiError, explainStream, fileBase64, getJson } from "./api.js";
import * as px from "./render.js";

const $ = (id) => document.getElementById(id);
const OUTLINE = [255, 255, 255];
const BOX = "#ffd400";
const state = {
  info: null,
  file: null,
  b64: null,
  bitmap: null,
  pixels: new Map(), // "w x h" -> ImageData of the image at that size
  cards: [],
  controller: null,
  clientMask: false,
  token: sessionStorage.getItem("saliency-token") || "",
};

function say(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`;
}

function sayError(error) {
  if (error instanceof ApiError) {
    say(`${error.code}: ${error.message}`, "error");
    if (error.status === 401) $("token-row").hidden = false;
  } else if (error.name !== "AbortError") {
    say(String(error), "error");
  }
}

function element(tag, props = {}, children = []) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children);
  return el;
}

// ---- choices, from the model's description ----

function paramInput(owner, param) {
  const id = `${owner}.${param.name}`;
  let input;
  if (param.type === "bool") {
    input = element("input", { type: "checkbox", checked: param.default === "true" });
  } else if (param.choices.length) {
    input = element("select", {}, param.choices.map((c) => element("option", { value: c, textContent: c })));
    input.value = param.default;
  } else if (param.type === "int" || param.type === "float") {
    input = element("input", { type: "number", value: param.default, step: param.type === "int" ? "1" : "any" });
    if (param.minimum !== undefined) input.min = param.minimum;
    if (param.maximum !== undefined) input.max = param.maximum;
  } else {
    input = element("input", { type: "text", value: param.default });
  }
  input.dataset.param = param.name;
  input.dataset.default = param.default;
  input.id = id;
  return element("label", { className: "param", title: param.doc }, [param.name, input]);
}

function changedParams(container) {
  const params = {};
  for (const input of container.querySelectorAll("[data-param]")) {
    const value = input.type === "checkbox" ? String(input.checked) : input.value;
    if (value !== input.dataset.default) params[input.dataset.param] = value;
  }
  return params;
}

function choice(kind, entry, checked, disabled, reason) {
  const box = element("input", { type: "checkbox", value: entry.name, checked, disabled });
  box.dataset.kind = kind;
  const label = element("label", { className: "choice", title: reason || entry.description }, [
    box,
    element("span", { textContent: entry.name }),
  ]);
  const row = element("div", { className: disabled ? "entry disabled" : "entry" }, [label]);
  if (entry.params && entry.params.length && kind === "method") {
    const details = element("details", {}, [element("summary", { textContent: "params" })]);
    details.append(...entry.params.map((p) => paramInput(entry.name, p)));
    row.append(details);
  }
  return row;
}

async function loadModel(name) {
  const info = await getJson(`/v1/models/${encodeURIComponent(name)}`, state.token);
  state.info = info;
  $("model-version").textContent = info.version ? `version ${info.version}` : "";
  $("methods").replaceChildren(
    ...info.methods.map((m) =>
      choice("method", m, m.available && m.name === info.defaults.method, !m.available,
        m.available ? "" : "this model cannot run it (no target layer)"),
    ),
  );
  $("mask").replaceChildren(
    ...info.masks.map((m) => element("option", { value: m.name, textContent: m.name, title: m.description })),
  );
  $("mask").value = info.defaults.mask;
  showMaskDoc();
  $("scores").replaceChildren(
    ...info.scores.map((s) => choice("score", s, false, false, `${s.description}`)),
  );
  $("top-k").max = info.labels.length;
  $("explain").disabled = !state.file;
}

function showMaskDoc() {
  const mask = state.info.masks.find((m) => m.name === $("mask").value);
  $("mask-doc").textContent = mask ? mask.description : "";
}

async function loadModels() {
  try {
    const { models, default: chosen } = await getJson("/v1/models", state.token);
    $("model").replaceChildren(...models.map((m) => element("option", { value: m, textContent: m })));
    $("model").value = chosen ?? models[0]; // the server's default model, as an empty name gets
    await loadModel($("model").value);
    say(state.file ? "Ready." : "Choose an image.");
  } catch (error) {
    sayError(error);
  }
}

function requestBody() {
  const methods = [...$("methods").querySelectorAll("input[data-kind=method]:checked")].map((box) => {
    const params = changedParams(box.closest(".entry"));
    return Object.keys(params).length ? { name: box.value, params } : box.value;
  });
  const scores = [...$("scores").querySelectorAll("input:checked")].map((box) => box.value);
  return {
    instances: [{ image: { b64: state.b64 } }],
    parameters: { methods, mask: $("mask").value, scores, top_k: Number($("top-k").value) || 1 },
  };
}

// ---- one call ----

async function explain() {
  if (!state.b64) return;
  state.controller?.abort(); // the previous call stops on the server too
  const controller = new AbortController();
  state.controller = controller;
  state.cards = [];
  $("explanations").replaceChildren();
  $("prediction").hidden = true;
  say("Explaining...", "busy");
  const started = performance.now();
  try {
    await explainStream($("model").value, requestBody(), {
      token: state.token,
      signal: controller.signal,
      onEvent: (name, data) => onEvent(name, data, started),
    });
  } catch (error) {
    sayError(error);
  }
}

function onEvent(name, data, started) {
  if (name === "prediction") {
    showPrediction(data);
    say(`Prediction in ${Math.round(performance.now() - started)} ms; explaining...`, "busy");
  } else if (name === "refinement") {
    say(`${data.method}: map so far after ${data.forwards} of ${data.forwards_total} forwards...`, "busy");
  } else if (name === "explanation") {
    addCard(data);
  } else if (name === "scores") {
    const card = state.cards[data.explanation_index];
    if (card) Object.assign(card.item.scores, data.scores), showFacts(card);
  } else if (name === "summary") {
    data.explanations.forEach(addCard); // any the stream did not show one by one
    const total = data.timings.total;
    $("timings").textContent = Object.entries(data.timings)
      .map(([stage, s]) => `${stage} ${(s * 1000).toFixed(1)} ms`)
      .join(" · ");
    say(`Done: ${state.cards.length} map(s)${total ? ` in ${(total * 1000).toFixed(0)} ms` : ""}.`, "ok");
  } else if (name === "error") {
    say(`${data.error.code}: ${data.error.message}`, "error");
  }
}

function showPrediction(data) {
  $("classes").replaceChildren(
    ...data.classes.map((c) => {
      const fill = element("span", { className: "fill" });
      fill.style.width = `${(c.probability * 100).toFixed(1)}%`;
      return element("li", {}, [
        element("span", { className: "label", textContent: c.label }),
        element("span", { className: "meter" }, [fill]),
        element("span", { className: "p", textContent: `${(c.probability * 100).toFixed(1)}%` }),
      ]);
    }),
  );
  $("prediction").hidden = false;
  $("sliders").hidden = false;
}

// ---- one map ----

async function imagePixels(width, height) {
  const key = `${width}x${height}`;
  if (!state.pixels.has(key)) {
    const canvas = new OffscreenCanvas(width, height);
    const ctx = canvas.getContext("2d");
    if (state.bitmap) ctx.drawImage(state.bitmap, 0, 0, width, height);
    state.pixels.set(key, ctx.getImageData(0, 0, width, height));
  }
  return state.pixels.get(key);
}

async function addCard(item) {
  const el = $("card").content.firstElementChild.cloneNode(true);
  const card = { item, el, index: state.cards.length, width: item.map.width, height: item.map.height };
  state.cards.push(card);
  el.dataset.method = item.method;
  el.querySelector(".method").textContent = item.method;
  el.querySelector(".target").textContent = `→ ${item.target_label || item.target}`;
  for (const canvas of el.querySelectorAll("canvas")) {
    canvas.width = card.width;
    canvas.height = card.height;
  }
  $("explanations").append(el);
  card.levels = px.grayLevels(await px.decodePng(item.map.b64));
  card.image = await imagePixels(card.width, card.height);
  card.serverMask = item.mask ? px.maskOfPng(await px.decodePng(item.mask.b64)) : null;
  chooseMask(card);
  drawHeat(card);
  drawMask(card);
  showFacts(card);
  el.querySelectorAll("[data-download]").forEach((b) => b.addEventListener("click", () => download(card, b.dataset.download)));
  el.classList.add("ready");
}

function chooseMask(card) {
  if (state.clientMask) {
    card.mask = px.thresholdMask(card.levels, Number($("threshold").value));
    card.box = px.largestBox(card.mask, card.width, card.height);
  } else {
    card.mask = card.serverMask;
    card.box = card.item.box;
  }
}

function drawHeat(card) {
  const alpha = Number($("opacity").value) / 100;
  const ctx = card.el.querySelector("canvas.heat").getContext("2d");
  ctx.putImageData(px.overlay(card.image, card.levels, alpha, card.width, card.height), 0, 0);
}

function drawMask(card) {
  const lines = card.el.querySelector("canvas.outline").getContext("2d");
  lines.clearRect(0, 0, card.width, card.height);
  if (card.mask) lines.putImageData(px.outline(card.mask, card.width, card.height, OUTLINE), 0, 0);
  const boxes = card.el.querySelector("canvas.box").getContext("2d");
  boxes.clearRect(0, 0, card.width, card.height);
  if (card.box) {
    const { x_min: x0, y_min: y0, x_max: x1, y_max: y1 } = card.box;
    boxes.fillStyle = BOX; // one-pixel lines on the pixel grid: crisp at any zoom
    boxes.fillRect(x0, y0, x1 - x0 + 1, 1);
    boxes.fillRect(x0, y1, x1 - x0 + 1, 1);
    boxes.fillRect(x0, y0, 1, y1 - y0 + 1);
    boxes.fillRect(x1, y0, 1, y1 - y0 + 1);
  }
}

function showFacts(card) {
  const { item } = card;
  const facts = [["time", `${(item.seconds * 1000).toFixed(1)} ms`]];
  const value = (v) => (Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(3) : v.toExponential(2));
  const better = (name) => state.info?.scores.find((s) => s.name === name)?.higher_is_better;
  for (const [name, v] of Object.entries(item.scores)) facts.push([name, `${value(v)} ${better(name) ? "↑" : "↓"}`]);
  if (item.completeness_error !== null) facts.push(["completeness error", value(item.completeness_error)]);
  const source = state.clientMask
    ? `${$("threshold").value}th percentile (here)`
    : item.mask ? `${item.mask.kind} (server)` : "none";
  facts.push(["mask", source]);
  card.el.querySelector(".facts").replaceChildren(
    ...facts.flatMap(([k, v]) => [element("dt", { textContent: k }), element("dd", { textContent: v })]),
  );
}

// ---- downloads ----

function save(name, blob) {
  const link = element("a", { href: URL.createObjectURL(blob), download: name });
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

function pngOf(draw, width, height) {
  const canvas = element("canvas", { width, height });
  draw(canvas.getContext("2d"));
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function download(card, what) {
  const stem = `${card.item.method}-${card.item.target}`;
  const { width, height } = card;
  if (what === "overlay") {
    const layers = [...card.el.querySelectorAll("canvas")];
    save(`${stem}-overlay.png`, await pngOf((ctx) => layers.forEach((c) => ctx.drawImage(c, 0, 0)), width, height));
  } else if (what === "map") {
    const bytes = Uint8Array.from(atob(card.item.map.b64), (c) => c.charCodeAt(0));
    save(`${stem}-map.png`, new Blob([bytes], { type: "image/png" }));
  } else if (what === "mask" && card.mask) {
    const pixels = new ImageData(width, height);
    card.mask.forEach((on, i) => pixels.data.set(on ? [255, 255, 255, 255] : [0, 0, 0, 255], i * 4));
    save(`${stem}-mask.png`, await pngOf((ctx) => ctx.putImageData(pixels, 0, 0), width, height));
  } else if (what === "json") {
    save(`${stem}.json`, new Blob([JSON.stringify(card.item, null, 2)], { type: "application/json" }));
  }
}

// ---- wiring ----

async function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.b64 = await fileBase64(file);
  // Upright, as the server sees it; bytes the browser cannot decode still go to the
  // server, whose refusal says what is wrong with them.
  state.bitmap = await createImageBitmap(file).catch(() => null);
  state.pixels.clear();
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-hint").textContent = file.name;
  $("explain").disabled = !state.info;
  await explain();
}

function wire() {
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]).catch(sayError));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => (e.preventDefault(), drop.classList.add("over")));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]).catch(sayError);
  });
  $("explain").addEventListener("click", () => explain());
  $("model").addEventListener("change", (e) => loadModel(e.target.value).catch(sayError));
  $("mask").addEventListener("change", showMaskDoc);
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = `${$("opacity").value}%`;
    state.cards.filter((c) => c.levels).forEach(drawHeat);
  });
  $("threshold").addEventListener("input", () => {
    state.clientMask = true;
    $("threshold-value").textContent = `${$("threshold").value}th percentile`;
    for (const card of state.cards.filter((c) => c.levels)) {
      chooseMask(card);
      drawMask(card);
      showFacts(card);
    }
  });
  $("token").value = state.token;
  $("token-row").addEventListener("submit", (e) => e.preventDefault());
  $("token").addEventListener("change", () => {
    state.token = $("token").value.trim();
    sessionStorage.setItem("saliency-token", state.token);
    loadModels();
  });
}

wire();
loadModels();
