// The meshllm dashboard: polls this node's JSON and renders it. Peers' strings (names, aliases,
// addresses) are hostile input: they reach the page through textContent only, never as markup.
"use strict";

const POLL_MS = 2000;
const KEY_STORE = "meshllm_api_key";
const $ = (id) => document.getElementById(id);

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

async function getJson(path, keyed) {
  const resp = await fetch(path, { headers: keyed ? headers(false) : {}, cache: "no-store" });
  if (!resp.ok) { const e = new Error(path + ": HTTP " + resp.status); e.status = resp.status; throw e; }
  return resp.json();
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function gib(bytes) { return (bytes / 1073741824).toFixed(1) + " GiB"; }

function rangeOf(m) { return m.whole ? "whole" : "layers " + m.start + "-" + m.end; }

function renderNodes(me, peers) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  const rows = [[me, "self"]].concat(peers.map((p) => [p, p.last_seen_s.toFixed(1) + " s ago"]));
  for (const [n, seen] of rows) {
    const r = n.resources, l = n.load;
    const tr = el("tr", null, n === me ? "self" : "");
    tr.dataset.nodeId = n.node_id;
    const cells = [
      [n.name, "name"], [n.node_id.slice(0, 12)], [r.device],
      [gib(r.ram_free_bytes) + " / " + gib(r.ram_total_bytes), "num"],
      [r.vram_total_bytes ? gib(r.vram_free_bytes) + " / " + gib(r.vram_total_bytes) : "-", "num"],
      [n.models.map((m) => m.alias + " (" + rangeOf(m) + ")").join(", ") || "-"],
      [l.active + " active, " + l.queued + " queued / " + l.capacity, "num"],
      [r.speed_tok_s.toFixed(1), "num"], [seen, "num"],
    ];
    for (const [text, cls] of cells) tr.appendChild(el("td", text, cls));
    body.appendChild(tr);
  }
}

// Each model: its whole holders, or its pipeline chain (node names in order with their layer ranges).
function renderModels(me, peers, listing) {
  const adverts = [me].concat(peers);
  const byName = new Map(adverts.map((a) => [a.name, a]));
  const list = $("models");
  list.replaceChildren();
  const models = listing ? listing.data.map((m) => ({ alias: m.id, nodes: m.meshllm.nodes }))
    : [...new Set(adverts.flatMap((a) => a.models.map((m) => m.alias)))].map((alias) => ({ alias, nodes: null }));
  if (!models.length) list.appendChild(el("li", "no model in the mesh"));
  for (const m of models) {
    const holders = adverts.filter((a) => a.models.some((x) => x.alias === m.alias && x.whole)).map((a) => a.name);
    const li = el("li");
    li.dataset.model = m.alias;
    li.appendChild(el("strong", m.alias));
    const chainNames = (m.nodes || []).filter((n) => !holders.includes(n));
    if (holders.length) li.appendChild(el("span", ": held whole by " + holders.join(", ")));
    if (chainNames.length || (!holders.length && !m.nodes)) {
      const parts = m.nodes ? chainNames.map((name) => {
        const a = byName.get(name);
        const x = a && a.models.find((y) => y.alias === m.alias);
        return name + " [" + (x ? x.start + "-" + x.end : "?") + ")";
      }) : adverts.flatMap((a) => a.models.filter((x) => x.alias === m.alias && !x.whole)
        .map((x) => a.name + " [" + x.start + "-" + x.end + ")"));
      li.appendChild(el("span", (holders.length ? "; " : ": ") + "pipeline "));
      li.appendChild(el("span", parts.join(" \u2192 "), "chain"));
    }
    if (!holders.length && m.nodes && !m.nodes.length) li.appendChild(el("span", ": offered (loads on first use)"));
    list.appendChild(li);
  }
  const select = $("chat-model");
  const current = select.value;
  const names = models.map((m) => m.alias);
  if ([...select.options].map((o) => o.value).join("\n") !== names.join("\n")) {
    select.replaceChildren(...names.map((n) => { const o = el("option", n); o.value = n; return o; }));
    if (names.includes(current)) select.value = current;
  }
}

function renderLoading(me) {
  const list = $("loading");
  list.replaceChildren();
  for (const x of me.loading || []) {
    const li = el("li", x.what + ": " + x.state + " (" + gib(x.total_bytes) + ", " + x.seconds + " s) ");
    const bar = el("progress");
    bar.max = 1; bar.value = x.fraction;
    li.appendChild(bar);
    list.appendChild(li);
  }
  if (!list.children.length) list.appendChild(el("li", "nothing"));
}

function renderLive(stats) {
  if (!stats) { $("live").textContent = "needs the API key"; return; }
  const parts = [stats.requests + " requests in the last " + stats.window_s + " s",
    "decode " + stats.decode_tok_s_p50 + " tok/s (p50)", "TTFT " + stats.ttft_ms_p50 + " ms (p50)"];
  for (const [model, s] of Object.entries(stats.models)) {
    parts.push(model + ": " + s.decode_tok_s_p50 + " tok/s, TTFT " + s.ttft_ms_p50 + " ms, " + s.routes.join("/"));
  }
  $("live").textContent = parts.join(" \u00b7 ");
}

async function optional(path) {
  try { return await getJson(path, true); } catch (e) {
    if (e.status === 401) $("status").textContent = "This node wants an API key for models, stats and chat.";
    return null;
  }
}

async function poll() {
  try {
    const [me, peers] = await Promise.all([getJson("/mesh/self"), getJson("/mesh/peers")]);
    $("status").textContent = "";
    const [listing, stats] = await Promise.all([optional("/v1/models"), optional("/mesh/stats")]);
    $("self-name").textContent = me.name;
    renderNodes(me, peers);
    renderModels(me, peers, listing);
    renderLoading(me);
    renderLive(stats);
    document.body.dataset.updated = String(Date.now());
  } catch (e) {
    $("status").textContent = "cannot reach the node: " + e.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// --- chat: streams through the node's own /v1/chat/completions --------------------------------------
const history = [];

async function send(text) {
  const log = $("chat-log");
  log.appendChild(el("div", "you: " + text, "user"));
  const answer = el("div", "", "assistant");
  log.appendChild(answer);
  history.push({ role: "user", content: text });
  $("chat-send").disabled = true;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true),
      body: JSON.stringify({ model: $("chat-model").value, messages: history, stream: true }),
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      throw new Error("HTTP " + resp.status + ": " + ((body.error && body.error.message) || ""));
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: {")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) throw new Error(event.error.message);
        for (const c of event.choices || []) answer.textContent += (c.delta && c.delta.content) || "";
      }
    }
    history.push({ role: "assistant", content: answer.textContent });
    answer.dataset.done = "true";
  } catch (e) {
    history.pop();
    answer.dataset.done = "error";
    $("status").textContent = "chat: " + e.message;
  } finally {
    $("chat-send").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = apiKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem(KEY_STORE, $("key").value.trim());
    $("status").textContent = "";
  });
  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("chat-input").value.trim();
    if (text) { $("chat-input").value = ""; send(text); }
  });
  poll();
});
