// lineguard operator console: plain ES module, no build step, no network beyond this app.
//
// Every /api request carries `Authorization: Bearer <token>` (dialogue/CONTRACT.md): images are fetched
// as blobs and shown through object URLs, and the server-sent events of /api/stream are read with
// fetch() and a stream reader, since EventSource cannot send a header.

const TOKEN_KEY = "lineguard.token";
const MAX_PARTS = 200;          // the list keeps the newest flagged parts only
const RECORD_RETRY_MS = 250;    // a verdict can arrive before the recorder has stored its record
const RECORD_RETRY_FOR_MS = 8000;

const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  me: null,
  parts: new Map(),     // frame_id -> RecordSummary or SSE verdict (newest first in `order`)
  order: [],
  selected: null,
  detail: null,
  streamAbort: null,
  selectSeq: 0,         // drops the answers of a selection that is no longer current
};

// --- API --------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(path, { method = "GET", body, signal, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  for (let attempt = 0; ; attempt++) {
    response = await fetch(path, {
      method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
    });
    // rate limited: a read waits as long as the server says (at most 5 s) and tries once more
    if (response.status !== 429 || method !== "GET" || attempt >= 1) break;
    const wait = Math.min(5, Number(response.headers.get("Retry-After")) || 1);
    await sleep(wait * 1000);
  }
  if (response.status === 401) {
    signOut("Your token was not accepted; please sign in again.");
    throw new ApiError(401, "unauthorized");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const payload = await response.json();
      detail = typeof payload.detail === "string" ? payload.detail
        : (payload.detail || []).map((item) => item.msg).join("; ") || detail;
    } catch { /* not JSON */ }
    throw new ApiError(response.status, detail);
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

const recordPath = (frameId, tail = "") => `/api/records/${encodeURIComponent(frameId)}${tail}`;

// Stored artifacts never change, so their blob URLs are kept (the newest IMAGE_CACHE of them): moving
// back and forth through the list costs no requests.
const IMAGE_CACHE = 80;
const imageCache = new Map();   // path -> Promise<object URL>

function blobUrl(path, transform = null) {
  const key = transform ? `${path}#${transform.name}` : path;
  if (imageCache.has(key)) {
    const cached = imageCache.get(key);
    imageCache.delete(key);
    imageCache.set(key, cached);    // most recently used last
    return cached;
  }
  const promise = (async () => {
    const response = await api(path, { raw: true });
    const blob = await response.blob();
    return URL.createObjectURL(transform ? await transform(blob) : blob);
  })();
  imageCache.set(key, promise);
  promise.catch(() => imageCache.delete(key));
  while (imageCache.size > IMAGE_CACHE) {
    const [oldest, url] = imageCache.entries().next().value;
    imageCache.delete(oldest);
    url.then((u) => URL.revokeObjectURL(u), () => {});
  }
  return promise;
}

// --- sign in ----------------------------------------------------------------------------------

function askForToken(message = "") {
  $("token-error").textContent = message;
  $("token-input").value = "";
  if (!$("token-dialog").open) $("token-dialog").showModal();
  $("token-input").focus();
}

async function signIn(token) {
  state.token = token;
  try {
    state.me = await api("/api/me");
  } catch (error) {
    state.token = null;
    askForToken(error.status === 401 ? "That token is not valid." : `Cannot sign in: ${error.message}`);
    return false;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("signout").hidden = false;
  document.body.dataset.role = state.me.role;
  const canWrite = state.me.role !== "viewer";
  for (const id of ["label-defect", "label-good", "ask-button", "question"]) $(id).disabled = !canWrite;
  await loadRecent();
  connectStream();
  return true;
}

function signOut(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.me = null;
  if (state.streamAbort) state.streamAbort.abort();
  setConnection("idle", "not connected");
  $("signout").hidden = true;
  askForToken(message);
}

// --- the live list ----------------------------------------------------------------------------

function setConnection(kind, text) {
  $("connection").dataset.state = kind;
  $("connection").textContent = text;
}

async function loadRecent() {
  const page = await api("/api/records?verdict=anomalous&limit=50");
  // oldest first, so that the newest ends on top
  for (const record of [...page.items].reverse()) addPart(record, { fresh: false });
  if (!state.selected && state.order.length) select(state.order[0]);
}

function addPart(part, { fresh = true } = {}) {
  const known = state.parts.has(part.frame_id);
  // seenAt: when this console first showed the part (data-seen-at on its list item)
  state.parts.set(part.frame_id, { seenAt: Date.now(), ...state.parts.get(part.frame_id), ...part });
  if (!known) {
    state.order.unshift(part.frame_id);
    if (state.order.length > MAX_PARTS) {
      for (const old of state.order.splice(MAX_PARTS)) state.parts.delete(old);
    }
  }
  renderList(fresh && !known ? part.frame_id : null);
}

function renderList(freshId = null) {
  const list = $("parts");
  list.replaceChildren(...state.order.map((frameId) => partItem(state.parts.get(frameId), frameId === freshId)));
  $("parts-count").textContent = String(state.order.length);
  $("parts-empty").hidden = state.order.length > 0;
}

function partItem(part, fresh) {
  const item = document.createElement("li");
  item.setAttribute("role", "option");
  item.id = `part-${part.frame_id}`;
  item.dataset.frameId = part.frame_id;
  item.dataset.seenAt = String(part.seenAt);
  item.setAttribute("aria-selected", String(part.frame_id === state.selected));
  if (fresh) item.classList.add("fresh");
  const status = part.label_status || "unlabeled";
  const time = part.captured_at ? new Date(part.captured_at).toLocaleTimeString() : "";
  item.innerHTML = `<span class="pid"></span><span class="score"></span>
    <span class="meta"></span>`;
  item.querySelector(".pid").textContent = part.frame_id;
  item.querySelector(".score").textContent = `${Math.round((part.confidence ?? 0) * 100)}%`;
  item.querySelector(".meta").textContent =
    `${part.line_id} · ${part.camera_id} · ${part.product} · ${time} · ${(part.positions || []).join(", ") || "–"}`;
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.dataset.status = status;
  badge.textContent = status;
  item.querySelector(".meta").append(" ", badge);
  item.setAttribute("aria-label",
    `${part.frame_id}, ${part.product} on ${part.line_id} ${part.camera_id}, ${status}`);
  item.addEventListener("click", () => select(part.frame_id));
  return item;
}

async function connectStream() {
  if (state.streamAbort) state.streamAbort.abort();
  const abort = new AbortController();
  state.streamAbort = abort;
  let delay = 1000;
  while (!abort.signal.aborted && state.token) {
    try {
      setConnection("retrying", "connecting…");
      const response = await api("/api/stream", { raw: true, signal: abort.signal });
      setConnection("live", "live");
      delay = 1000;
      await readEvents(response.body, abort.signal, (event, data) => {
        if (event !== "verdict") return;
        const verdict = JSON.parse(data);
        addPart(verdict);
        if (!state.selected) select(verdict.frame_id);
      });
      if (abort.signal.aborted) return;
    } catch (error) {
      if (abort.signal.aborted || error.status === 401) return;
    }
    setConnection("retrying", "reconnecting…");
    await sleep(delay);
    delay = Math.min(delay * 2, 15000);
    // the stream only carries verdicts produced while connected: fill the gap from the records
    try { await loadRecent(); } catch { /* the next attempt tells */ }
  }
}

// Parse text/event-stream: events are separated by a blank line; `event:` and `data:` fields,
// comment lines (": ping") are ignored.
async function readEvents(body, signal, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) {
        try { onEvent(event, data.join("\n")); } catch (error) { console.warn("bad event", error); }
      }
    }
  }
}

// --- the selected part ------------------------------------------------------------------------

async function fetchRecord(frameId, seq) {
  const started = Date.now();
  for (;;) {
    try {
      return await api(recordPath(frameId));
    } catch (error) {
      if (error.status !== 404 || Date.now() - started > RECORD_RETRY_FOR_MS || seq !== state.selectSeq) throw error;
      await sleep(RECORD_RETRY_MS);
    }
  }
}

async function select(frameId) {
  if (!frameId) return;
  const seq = ++state.selectSeq;
  state.selected = frameId;
  for (const item of $("parts").children) {
    const selected = item.dataset.frameId === frameId;
    item.setAttribute("aria-selected", String(selected));
    if (selected) {
      item.scrollIntoView({ block: "nearest" });
      $("parts").setAttribute("aria-activedescendant", item.id);
    }
  }
  $("detail").hidden = false;
  $("no-selection").hidden = true;
  $("detail-title").textContent = frameId;
  $("detail").dataset.frameId = frameId;
  $("label-result").textContent = "";
  $("ask-error").textContent = "";
  renderFacts(state.parts.get(frameId));
  $("conversation").replaceChildren();
  $("similar").replaceChildren();
  $("part-image").removeAttribute("src");
  $("part-heatmap").removeAttribute("src");
  $("regions").replaceChildren();

  let detail;
  try {
    detail = await fetchRecord(frameId, seq);
  } catch (error) {
    if (seq === state.selectSeq) $("verdict").textContent = `Cannot load this part: ${error.message}`;
    return;
  }
  if (seq !== state.selectSeq) return;
  state.detail = detail;
  addPart(summaryOf(detail), { fresh: false });
  renderFacts(detail);
  await Promise.allSettled([showImages(detail, seq), loadConversation(frameId, seq), loadSimilar(frameId, seq)]);
}

function summaryOf(detail) {
  const { regions, labels, n_anomalies, has_descriptor, ...summary } = detail;
  return summary;
}

function renderFacts(part) {
  if (!part) return;
  const verdict = $("verdict");
  verdict.dataset.anomalous = String(part.is_anomalous ?? true);
  verdict.textContent = (part.is_anomalous ?? true) ? "Anomalous" : "Normal";
  const regions = part.regions || [];
  const rows = [
    ["Confidence", `${Math.round((part.confidence ?? 0) * 100)} %`],
    ["Score / threshold", part.score !== undefined ? `${part.score.toFixed(3)} / ${part.threshold.toFixed(3)}` : "–"],
    ["Where", (part.positions || []).join(", ") || "–"],
    ["Regions", String(part.n_anomalies ?? regions.length)],
    ["Line · camera", `${part.line_id} · ${part.camera_id}`],
    ["Product", part.product],
    ["Captured", part.captured_at ? new Date(part.captured_at).toLocaleString() : "–"],
    ["Model", part.model_version || "–"],
  ];
  $("facts").replaceChildren(...rows.flatMap(([name, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    return [dt, dd];
  }));
  $("first-answer").textContent = part.answer || "–";
  const status = part.label_status || "unlabeled";
  $("label-status").textContent = status;
  $("label-status").dataset.status = status;
}

async function showImages(detail, seq) {
  const image = $("part-image");
  const heat = $("part-heatmap");
  const base = detail.has_image ? "/image" : detail.has_overlay ? "/overlay" : null;
  if (!base) {
    image.alt = "No image stored for this part.";
    return;
  }
  const imageUrl = await blobUrl(recordPath(detail.frame_id, base));
  if (seq !== state.selectSeq) return;
  image.alt = `Part ${detail.frame_id}, ${detail.product}` +
    (detail.positions?.length ? `, anomaly at the ${detail.positions.join(" and ")}` : "");
  await new Promise((resolve) => {
    image.onload = resolve;
    image.onerror = resolve;
    image.src = imageUrl;
  });
  drawRegions(detail.regions || [], image.naturalWidth, image.naturalHeight);
  if (detail.has_heatmap && base === "/image") {
    try {
      const heatUrl = await blobUrl(recordPath(detail.frame_id, "/heatmap"), colorizeHeatmap);
      if (seq === state.selectSeq) heat.src = heatUrl;
    } catch (error) {
      console.warn("heatmap", error);
    }
  }
  heat.hidden = !$("show-heatmap").checked;
}

// The heatmap route gives an 8-bit grey map (0..255 = 0..2x threshold); paint it as a transparent-to-red
// layer so that the part stays visible under it.
async function colorizeHeatmap(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const v = data[i] / 255;                 // 0.5 = the threshold
    const hot = Math.max(0, (v - 0.25) / 0.75);
    data[i] = 255;
    data[i + 1] = Math.round(255 * (1 - Math.min(1, hot * 1.5)));
    data[i + 2] = 0;
    data[i + 3] = Math.round(255 * Math.min(1, hot * 1.2));
  }
  context.putImageData(pixels, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

function drawRegions(regions, width, height) {
  const svg = $("regions");
  const ns = "http://www.w3.org/2000/svg";
  svg.setAttribute("viewBox", `0 0 ${width || 1} ${height || 1}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.replaceChildren(...regions.map((region, index) => {
    const group = document.createElementNS(ns, "g");
    const rect = document.createElementNS(ns, "rect");
    for (const [key, value] of Object.entries({ x: region.x, y: region.y, width: region.w, height: region.h })) {
      rect.setAttribute(key, String(value));
    }
    rect.setAttribute("data-region", String(index + 1));
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", String(region.x));
    label.setAttribute("y", String(Math.max(region.y - 4, 14)));
    label.setAttribute("font-size", String(Math.max(12, Math.round((width || 256) / 28))));
    label.textContent = String(index + 1);
    group.append(rect, label);
    return group;
  }));
  $("region-caption").textContent = regions.length
    ? regions.map((r, i) => `${i + 1}: ${r.position}, ${r.area_px} px` +
      (r.area_mm2 != null ? ` (${r.area_mm2.toFixed(1)} mm²)` : "")).join(" · ")
    : "no region outlined";
}

// --- conversation -----------------------------------------------------------------------------

function turnItems(turn) {
  const question = document.createElement("li");
  question.className = "question";
  question.textContent = turn.question;
  const answer = document.createElement("li");
  answer.className = "answer-turn";
  answer.dataset.intent = turn.intent;
  answer.textContent = turn.answer;
  const sources = document.createElement("small");
  sources.className = "sources";
  sources.textContent = `${turn.intent}` +
    (turn.sources?.length ? ` · from ${turn.sources.map((s) => s.detail || s.kind).join("; ")}` : "");
  answer.append(sources);
  return [question, answer];
}

async function loadConversation(frameId, seq) {
  const conversation = await api(recordPath(frameId, "/conversation"));
  if (seq !== state.selectSeq) return;
  $("conversation").replaceChildren(...conversation.turns.flatMap(turnItems));
  scrollConversation();
}

function scrollConversation() {
  const list = $("conversation");
  list.scrollTop = list.scrollHeight;
}

async function ask(event) {
  event.preventDefault();
  const input = $("question");
  const question = input.value.trim();
  const frameId = state.selected;
  if (!question || !frameId) return;
  const seq = state.selectSeq;
  $("ask-error").textContent = "";
  const pending = document.createElement("li");
  pending.className = "question pending";
  pending.textContent = question;
  $("conversation").append(pending);
  scrollConversation();
  input.value = "";
  $("ask-button").disabled = true;
  try {
    const turn = await api(recordPath(frameId, "/questions"), { method: "POST", body: { question } });
    if (seq !== state.selectSeq) return;
    pending.replaceWith(...turnItems(turn));
    scrollConversation();
  } catch (error) {
    pending.remove();
    if (seq === state.selectSeq) {
      input.value = question;
      $("ask-error").textContent = error.status === 429
        ? "Too many questions at once; wait a moment and ask again." : `Could not ask: ${error.message}`;
    }
  } finally {
    $("ask-button").disabled = state.me?.role === "viewer";
  }
}

// --- similar parts ----------------------------------------------------------------------------

async function loadSimilar(frameId, seq) {
  let similar;
  try {
    similar = await api(recordPath(frameId, "/similar?k=6"));
  } catch (error) {
    if (seq === state.selectSeq) $("similar-empty").hidden = false;
    return;
  }
  if (seq !== state.selectSeq) return;
  $("similar-empty").hidden = similar.items.length > 0;
  $("similar").replaceChildren(...similar.items.map((item) => {
    const record = item.record;
    const li = document.createElement("li");
    li.tabIndex = 0;
    li.dataset.frameId = record.frame_id;
    const status = record.label_status || "unlabeled";
    const label = status === "defect" ? `defect${item.defect_type ? `: ${item.defect_type}` : ""}` : status;
    li.setAttribute("aria-label",
      `${record.frame_id}, similarity ${Math.round(item.similarity * 100)} percent, ${label}`);
    const img = document.createElement("img");
    img.alt = "";
    const id = document.createElement("div");
    id.className = "sim-id";
    id.textContent = record.frame_id;
    const info = document.createElement("div");
    info.textContent = `${Math.round(item.similarity * 100)}% similar · `;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.status = status;
    badge.textContent = label;
    info.append(badge);
    li.append(img, id, info);
    const open = () => {
      addPart(record, { fresh: false });
      select(record.frame_id);
    };
    li.addEventListener("click", open);
    li.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
    const thumb = record.has_overlay ? "/overlay" : record.has_image ? "/image" : null;
    if (thumb) {
      blobUrl(recordPath(record.frame_id, thumb)).then((url) => {
        if (seq === state.selectSeq) img.src = url;
      }).catch(() => {});
    }
    return li;
  }));
}

// --- labels -----------------------------------------------------------------------------------

async function label(isDefect) {
  const frameId = state.selected;
  if (!frameId || state.me?.role === "viewer") return;
  const defectType = $("defect-type").value.trim();
  if (isDefect && !defectType) {
    $("label-result").textContent = "Choose a defect type first.";
    $("defect-type").focus();
    return;
  }
  const body = {
    is_defect: isDefect,
    defect_type: isDefect ? defectType : null,
    note: $("label-note").value.trim(),
    mask_png: null,
  };
  $("label-result").textContent = "Sending…";
  try {
    const accepted = await api(recordPath(frameId, "/label"), { method: "POST", body });
    const status = accepted.is_defect ? "defect" : "good";
    $("label-result").textContent = `Labelled ${status}` +
      (accepted.defect_type ? ` (${accepted.defect_type})` : "") + ` by ${accepted.operator}.`;
    const part = state.parts.get(frameId);
    if (part) addPart({ ...part, label_status: status }, { fresh: false });
    if (frameId === state.selected) {
      $("label-status").textContent = status;
      $("label-status").dataset.status = status;
      $("label-note").value = "";
    }
  } catch (error) {
    $("label-result").textContent = `Could not label: ${error.message}`;
  }
}

// --- keyboard ---------------------------------------------------------------------------------

function move(step) {
  if (!state.order.length) return;
  const index = state.order.indexOf(state.selected);
  const next = index < 0 ? 0 : Math.min(state.order.length - 1, Math.max(0, index + step));
  select(state.order[next]);
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey || document.querySelector("dialog[open]")) return;
  const target = event.target;
  const typing = (target instanceof HTMLInputElement && !["checkbox", "radio", "button", "submit"].includes(target.type))
    || target instanceof HTMLTextAreaElement;
  if (typing) {
    if (event.key === "Escape") target.blur();
    return;
  }
  const actions = {
    j: () => move(1), ArrowDown: () => move(1),
    k: () => move(-1), ArrowUp: () => move(-1),
    "/": () => $("question").focus(),
    d: () => label(true), D: () => label(true),
    g: () => label(false), G: () => label(false),
    h: () => { $("show-heatmap").click(); },
    "?": () => $("keys-dialog").showModal(),
  };
  const action = actions[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
}

// --- start ------------------------------------------------------------------------------------

function start() {
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) return;
    $("token-dialog").close();
    await signIn(token);
  });
  $("token-dialog").addEventListener("cancel", (event) => event.preventDefault());  // a token is needed
  $("signout").addEventListener("click", () => signOut());
  $("keys-button").addEventListener("click", () => $("keys-dialog").showModal());
  $("ask-form").addEventListener("submit", ask);
  $("label-defect").addEventListener("click", () => label(true));
  $("label-good").addEventListener("click", () => label(false));
  $("show-heatmap").addEventListener("change", (event) => { $("part-heatmap").hidden = !event.target.checked; });
  document.addEventListener("keydown", onKey);
  if (state.token) signIn(state.token);
  else askForToken();
}

start();
