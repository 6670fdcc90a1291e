// The node's status page. No build step, no dependency, no request to any other host.
// The data comes from the authenticated JSON endpoint with fetch; the API key (when the node has keys) comes
// from the field in the header, is kept in sessionStorage for this tab only, and is sent as a header, never in
// a URL. Everything is written with textContent: nothing the node reports is ever parsed as HTML.
"use strict";

(() => {
  const KEY_ITEM = "rolemesh-node.api-key";
  const POLL_MS = 1000;
  const LOG_LINES = 200;
  let logDevice = null;
  let timer = null;

  const $ = (id) => document.getElementById(id);

  class AuthNeeded extends Error {}

  function apiKey() {
    try { return sessionStorage.getItem(KEY_ITEM) || ""; } catch (e) { return ""; }
  }

  async function get(path, text) {
    const headers = { Accept: text ? "text/plain" : "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    const response = await fetch(path, { headers, cache: "no-store", credentials: "omit", redirect: "error" });
    if (response.status === 401) throw new AuthNeeded();
    if (!response.ok) throw new Error(path + " answered " + response.status);
    return text ? response.text() : response.json();
  }

  // ------------------------------------------------------------------ formatting

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function clock(unix) {
    if (!unix) return "–";
    return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
  }

  function ago(unix, now) {
    return unix ? seconds(Math.max(0, now - unix)) + " ago" : "–";
  }

  function percent(p) { return p === null || p === undefined ? "–" : p.toFixed(0) + " %"; }
  function celsius(t) { return t === null || t === undefined ? "–" : t.toFixed(0) + " °C"; }

  // ------------------------------------------------------------------ DOM

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (cls) td.className = cls;
    return td;
  }

  function row(cells, attrs) {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : cell(c));
    for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
    return tr;
  }

  function fill(table, rows, columns, empty) {
    const body = $(table).tBodies[0];
    if (!rows.length) {
      const td = cell(empty, "empty");
      td.colSpan = columns;
      body.replaceChildren(row([td]));
    } else {
      body.replaceChildren(...rows);
    }
  }

  function logButton(device) {
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = logDevice === device ? "showing" : "show";
    button.addEventListener("click", () => { logDevice = device; $("log-device").textContent = device; refreshSoon(); });
    td.appendChild(button);
    return td;
  }

  // ------------------------------------------------------------------ render

  function renderNode(s) {
    $("node-id").textContent = s.node_id;
    document.title = "RoleMesh node " + s.node_id;
    const facts = [
      ["Version", s.version], ["Backend", s.backend || "discovering…"], ["Uptime", seconds(s.uptime_s)],
      ["Serving", s.serving.ready ? "ready" : s.serving.status + (s.serving.reason ? ": " + s.serving.reason : "")],
      ["Dispatcher", s.dispatcher ? s.dispatcher.state : "none (standalone)"],
      ["llama-server", s.llama_server_error || "found"],
    ];
    $("node").replaceChildren(...facts.flatMap(([k, v]) => {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      return [dt, dd];
    }));
  }

  function renderDevices(s) {
    const rows = s.devices.map((d) => {
      const m = d.metrics || {};
      const c = d.child || {};
      const since = c.ready_at || c.started_at;
      const live = c.pid !== null && c.pid !== undefined;
      const state = c.state + (c.next_model ? " → " + c.next_model : "");
      const cooldown = (c.cooldowns || []).map((x) => x.model + " until " + clock(x.until)).join(", ");
      const lastSwitch = c.last_switch_at ? clock(c.last_switch_at) + " (" + seconds(c.last_switch_s) + ")" : "–";
      return row([
        d.id, d.backend + (d.name ? " · " + d.name : ""), bytes(m.memory_used_bytes), bytes(m.memory_free_bytes),
        percent(m.utilization_pct), celsius(m.temperature_c), cell(state, "state-" + c.state), c.model,
        live ? c.pid : "–", live && since ? seconds(s.time - since) : "–", cell(c.in_flight, "num"),
        cell(c.waiting, "num"), lastSwitch, cell(c.crashes, "num"), cooldown || "–", logButton(d.id),
      ], { "data-device": d.id, "data-state": c.state, "data-model": c.model || "" });
    });
    fill("devices", rows, 16, "no device (yet)");
  }

  function renderModels(s) {
    fill("models", s.models.map((m) => row([
      m.name, m.state, m.loaded_on.join(", ") || "–", cell(m.waiting, "num"),
      m.oldest_wait_s === null ? "–" : seconds(m.oldest_wait_s), seconds(m.service_s),
    ], { "data-model": m.name })), 6, "no model configured");
    fill("costs", s.switch_costs.map((c) => row([
      c.model, c.device, seconds(c.seconds), seconds(c.last_s), cell(c.count, "num"),
    ])), 5, "nothing loaded yet");
    fill("errors", s.errors.map((e) => row([
      ago(e.at, s.time), e.source, e.device, e.model, cell(e.count, "num"), cell(e.message, "msg"),
    ])), 6, "none");
  }

  function connection(ok, text) {
    const badge = $("conn");
    badge.textContent = text;
    badge.className = "badge " + (ok ? "ok" : "bad");
  }

  function message(text) {
    const p = $("message");
    p.textContent = text || "";
    p.hidden = !text;
  }

  // ------------------------------------------------------------------ loop

  async function refresh() {
    try {
      const status = await get("/v1/node/status");
      renderNode(status);
      renderDevices(status);
      renderModels(status);
      connection(true, "live");
      message("");
      if (logDevice) {
        $("log-section").hidden = false;
        const pre = $("log");
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.textContent = await get("/v1/node/devices/" + encodeURIComponent(logDevice) + "/logs?lines=" + LOG_LINES, true);
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      }
    } catch (e) {
      if (e instanceof AuthNeeded) {
        connection(false, "key needed");
        message(apiKey() ? "The API key was refused." : "This node needs an API key: enter it above.");
      } else {
        connection(false, "offline");
        message("Cannot reach the node: " + e.message);
      }
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(async () => { await refresh(); schedule(); }, POLL_MS);
  }

  function refreshSoon() {
    clearTimeout(timer);
    refresh().finally(schedule);
  }

  function start() {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("key").value.trim();
      try { if (value) sessionStorage.setItem(KEY_ITEM, value); } catch (e) { /* storage off: nothing kept */ }
      $("key").value = "";
      $("key").placeholder = value ? "key set for this tab" : $("key").placeholder;
      refreshSoon();
    });
    $("key-forget").addEventListener("click", () => {
      try { sessionStorage.removeItem(KEY_ITEM); } catch (e) { /* nothing kept */ }
      $("key").placeholder = "only when the node has keys";
      refreshSoon();
    });
    $("log-close").addEventListener("click", () => { logDevice = null; $("log-section").hidden = true; });
    if (apiKey()) $("key").placeholder = "key set for this tab";
    refreshSoon();
  }

  start();
})();
