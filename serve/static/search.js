// The repforge search page: plain JavaScript, no build step, nothing fetched from elsewhere.
// It calls the app's own API: /v1/info once, /v1/search per query, /v1/items/{id}/image per thumbnail.
"use strict";

const TOKEN_KEY = "repforge-token";
const THUMB = 160;
const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem(TOKEN_KEY) || "", info: null, busy: 0 };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

// fetch with the token; a 401 asks for the token (once per answer) and tries again.
async function api(path, init) {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, Object.assign({}, init, { headers: headers(init && init.headers) }));
    if (response.status !== 401 || attempt > 0) return response;
    const token = window.prompt("This repforge app needs its API token:");
    if (!token) return response;
    state.token = token.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? `${body.error.code}: ${body.error.message}` : response.statusText;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function thumbUrl(id, size) {
  return `/v1/items/${encodeURIComponent(id)}/image?size=${size || THUMB}`;
}

// Without a token the browser fetches (and caches) thumbnails itself; with one, an <img>
// cannot send the header, so the bytes come through fetch and a blob URL.
async function setThumb(img, id) {
  if (!state.token) {
    img.src = thumbUrl(id);
    return;
  }
  const response = await api(thumbUrl(id));
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
  else img.alt = "no image";
}

function params() {
  const url = new URL(window.location.href);
  return { id: url.searchParams.get("id"), k: url.searchParams.get("k") };
}

function setUrl(id) {
  const url = new URL(window.location.href);
  if (id) url.searchParams.set("id", id);
  else url.searchParams.delete("id");
  url.searchParams.set("k", $("k").value);
  window.history.pushState({}, "", url);
}

function filterValue() {
  const text = $("filter").value.trim();
  if (!text || $("filter-box").hidden) return null;
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error("filter: not valid JSON (example: {\"label\": 3})");
  }
}

// The filter box's value (null when empty), or undefined after saying why it is not valid.
function filterOrSay() {
  try {
    return filterValue();
  } catch (e) {
    status(e.message, true);
    return undefined;
  }
}

function metaText(metadata) {
  return Object.entries(metadata || {}).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(", ");
}

function render(hits) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.alt = hit.id;
    img.loading = "eager";
    setThumb(img, hit.id);
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = hit.id;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `score ${hit.score.toFixed(4)}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = metaText(hit.metadata);
    card.append(img, id, score, meta);
    card.addEventListener("click", () => {
      setUrl(hit.id);
      searchById(hit.id);
    });
    grid.append(card);
  }
}

async function runSearch(request, describe) {
  const started = performance.now();
  const ticket = ++state.busy;
  status(`searching ${describe} ...`);
  let response;
  try {
    response = await api(`/v1/search?k=${$("k").value}`, request);
  } catch (e) {
    status(`search failed: ${e}`, true);
    return;
  }
  if (ticket !== state.busy) return; // a newer search started meanwhile
  if (!response.ok) {
    status(`search failed: ${await errorText(response)}`, true);
    $("results").replaceChildren();
    return;
  }
  const body = await response.json();
  const hits = body.results[0] || [];
  render(hits);
  status(`${hits.length} neighbours of ${describe} in ${Math.round(performance.now() - started)} ms`);
}

async function searchById(id) {
  const filter = filterOrSay();
  if (filter === undefined) return;
  const query = $("query-img");
  query.hidden = false;
  setThumb(query, id);
  const body = { ids: [id], k: Number($("k").value) };
  if (filter) body.filter = filter;
  await runSearch(
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) },
    `item ${id}`
  );
}

async function searchByFile(file) {
  const filter = filterOrSay();
  if (filter === undefined) return;
  const query = $("query-img");
  query.hidden = false;
  query.src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("image", file, file.name || "query");
  if (filter) form.append("filter", JSON.stringify(filter));
  setUrl(null);
  await runSearch({ method: "POST", body: form }, `${file.name || "the image"}`);
}

function setupK(maxK, wanted) {
  const select = $("k");
  const choices = [5, 10, 20, 50, 100].filter((k) => k <= maxK);
  if (wanted && !choices.includes(wanted) && wanted >= 1 && wanted <= maxK) choices.push(wanted);
  choices.sort((a, b) => a - b);
  select.replaceChildren(...choices.map((k) => new Option(String(k), String(k))));
  select.value = String(wanted && choices.includes(wanted) ? wanted : Math.min(10, maxK));
}

function setupDrop() {
  const drop = $("drop");
  const file = $("file");
  drop.addEventListener("click", () => file.click());
  file.addEventListener("change", () => file.files[0] && searchByFile(file.files[0]));
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const picked = e.dataTransfer.files[0];
    if (picked) searchByFile(picked);
  });
}

async function start() {
  setupDrop();
  const response = await api("/v1/info");
  if (!response.ok) {
    status(`cannot read /v1/info: ${await errorText(response)}`, true);
    return;
  }
  state.info = await response.json();
  const { id, k } = params();
  setupK(state.info.limits.max_k, k ? Number(k) : null);
  const index = state.info.index;
  if (!index) {
    status("this app serves no index: nothing to search", true);
    return;
  }
  const columns = index.filterable || [];
  $("filter-box").hidden = columns.length === 0;
  if (columns.length) $("filter").title = `filterable columns: ${columns.join(", ")}`;
  $("index-info").textContent = `${index.count} items, ${index.metric}, ${index.factory || ""}`;
  $("k").addEventListener("change", () => {
    const current = params().id;
    setUrl(current);
    if (current) searchById(current);
  });
  $("filter").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && params().id) searchById(params().id);
  });
  window.addEventListener("popstate", () => params().id && searchById(params().id));
  if (id) await searchById(id);
  else status("drop an image or pick one to search");
}

start();
