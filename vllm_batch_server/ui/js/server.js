// The server panel: GET /status (loaded model, or every loaded model with --max-loaded-models, engine state,
// queue, throughput, KV cache, disk), refreshed every few seconds while the tab is visible. A server without /status gets "status unavailable" and what the
// public /health says (engine kind and loaded model).

import { ApiError, get } from "./api.js";
import { bytes, h, rate, replace } from "./dom.js";

const PERIOD_MS = 2000;

const ENGINE_STATES = {
  idle: "idle (no model loaded)",
  loading: "loading",
  ready: "ready",
  failed: "failed — restarting",
  asleep: "asleep",
};

// One resident model: its name, then what is not plain "ready and idle".
function resident(entry) {
  const notes = [];
  if (entry.state !== "ready") notes.push(ENGINE_STATES[entry.state] || entry.state);
  const running = (entry.running || []).length;
  if (running) notes.push(`${running} running`);
  if (entry.kv_cache_usage !== null && entry.kv_cache_usage !== undefined) {
    notes.push(`KV ${Math.round(entry.kv_cache_usage * 100)}%`);
  }
  return notes.length ? `${entry.model} (${notes.join(", ")})` : entry.model;
}

function stat(label, value, name) {
  return h("div", { class: "stat", "data-stat": name },
    h("span", { class: "label" }, label), h("span", { class: "value" }, value));
}

export class ServerPanel {
  constructor(el) {
    this.el = el;
    this.timer = null;
    this.supported = true;
  }

  start() {
    if (this.timer) return;
    const tick = async () => {
      if (!document.hidden) await this.refresh();
      this.timer = setTimeout(tick, PERIOD_MS);
    };
    tick();
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  async refresh() {
    if (this.supported) {
      try {
        this.render(await get("/status"));
        return;
      } catch (error) {
        if (!(error instanceof ApiError) || error.status === 401) return;
        if (error.status === 404) this.supported = false;
      }
    }
    await this.renderHealth();
  }

  render(status) {
    const engine = status.engine || {};
    const queue = status.queue || {};
    const throughput = status.throughput || {};
    const disk = status.disk || {};
    const paused = queue.paused || [];
    const depth = (queue.validating || 0) + (queue.in_progress || 0);
    const kv = engine.kv_cache_usage;
    const free = disk.total_bytes ? `${bytes(disk.free_bytes)} of ${bytes(disk.total_bytes)}` : bytes(disk.free_bytes);
    const loaded = engine.loaded_models || [];
    const several = (engine.max_loaded_models || 1) > 1 || loaded.length > 1;
    replace(this.el,
      several
        ? stat(`Models (up to ${engine.max_loaded_models || loaded.length} loaded)`,
          loaded.length ? loaded.map(resident).join(" · ") : "none loaded", "models")
        : stat("Model", engine.model || "none loaded", "model"),
      stat("Engine", `${engine.kind || "?"}: ${ENGINE_STATES[engine.state] || engine.state || "?"}`, "engine"),
      stat("Queue", `${depth} active` + (paused.length ? `, ${paused.length} paused` : ""), "queue"),
      stat("Throughput", `${rate(throughput.requests_per_second)} req/s · ${rate(throughput.output_tokens_per_second)} tok/s`, "throughput"),
      stat("KV cache", kv === null || kv === undefined ? "—" : `${Math.round(kv * 100)}%`, "kv"),
      stat("Disk free", free, "disk"),
      paused.length ? h("p", { class: "unavailable" },
        "Paused: ", paused.map((p) => `${p.id} (${p.reason})`).join(", ")) : null);
  }

  async renderHealth() {
    let health = null;
    try {
      const response = await fetch("/health", { cache: "no-store" });
      if (response.ok) health = await response.json();
    } catch {
      health = null;
    }
    replace(this.el,
      h("p", { class: "unavailable", "data-stat": "unavailable" },
        "Server status unavailable (this server has no /status)."),
      health ? stat("Engine", health.engine || "?", "engine") : null,
      health ? stat("Model", health.loaded_model || "none loaded", "model") : null);
  }
}
