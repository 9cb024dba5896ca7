// The queue: every batch, newest first, a page at a time, filtered by status and model (GET /v1/batches with
// our `status` and `model` extensions). Rows update in place as events arrive and, while a batch on the page
// is running, once a second, so keyboard focus stays where it was.

import { get, queuedBehind, runningBatches } from "./api.js";
import { add, announce, badge, count, duration, h, rate, replace, time } from "./dom.js";
import { endedAt } from "./rates.js";

const PAGE_SIZE = 25;
const POLL_MS = 1000; // at most once a second, and only while something on the page moves
const IDLE_POLL_MS = 15000; // a safety net when the event stream is live and nothing on the page runs
const ACTIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
const STATUSES = ["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"];

export function jobName(batch) {
  const metadata = batch.metadata || {};
  return metadata.name || metadata.job_name || metadata.description || null;
}

export function progressBar(batch) {
  const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
  const total = counts.total || 0;
  const pct = (n) => (total ? (100 * n) / total : 0);
  const bar = h("div", {
    class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total || 1,
    "aria-valuenow": counts.completed + counts.failed,
    "aria-label": `${counts.completed} completed, ${counts.failed} failed of ${total}`,
  });
  bar.append(h("span", { class: "done", style: null }), h("span", { class: "bad" }));
  // Widths through the CSSOM (a style attribute would need 'unsafe-inline' in the Content-Security-Policy).
  bar.children[0].style.width = `${pct(counts.completed)}%`;
  bar.children[1].style.width = `${pct(counts.failed)}%`;
  return bar;
}

export function countsText(batch) {
  const c = batch.request_counts || { total: 0, completed: 0, failed: 0 };
  return `${count(c.completed)} done · ${count(c.failed)} failed · ${count(c.total)} total`;
}

export class QueueView {
  constructor(app, params) {
    this.app = app;
    this.status = params.get("status") || "";
    this.model = params.get("model") || "";
    this.cursors = [null]; // the `after` of each page seen so far: Previous goes back one
    this.page = [];
    this.hasMore = false;
    this.timer = null;
    this.lastFetch = 0;
    this.dirty = true;
    this.inflight = null;
    this.rowsById = new Map();
  }

  mount(main) {
    this.main = main;
    this.statusSelect = h("select", { id: "filter-status", onchange: () => this.filter() },
      h("option", { value: "" }, "All statuses"),
      h("option", { value: "validating,in_progress,finalizing,cancelling" }, "Active"),
      STATUSES.map((s) => h("option", { value: s }, s.replace("_", " "))));
    this.statusSelect.value = this.status;
    this.modelSelect = h("select", { id: "filter-model", onchange: () => this.filter() },
      h("option", { value: "" }, "All models"));
    this.body = h("tbody");
    this.summary = h("p", { class: "muted", id: "queue-summary", "aria-live": "polite" });
    this.prev = h("button", { type: "button", class: "secondary", onclick: () => this.go(-1) }, "Previous");
    this.next = h("button", { type: "button", class: "secondary", onclick: () => this.go(1) }, "Next");
    this.pageLabel = h("span", { class: "muted" });
    replace(main,
      h("h1", {}, "Queue"),
      h("div", { class: "toolbar", role: "search" },
        h("div", { class: "field" }, h("label", { for: "filter-status" }, "Status"), this.statusSelect),
        h("div", { class: "field" }, h("label", { for: "filter-model" }, "Model"), this.modelSelect),
        h("a", { class: "button", href: "#/new" }, "New batch")),
      this.summary,
      h("table", { class: "queue", id: "queue" },
        h("caption", { class: "visually-hidden" }, "Batches, newest first"),
        h("thead", {}, h("tr", {},
          h("th", { scope: "col" }, "Job"), h("th", { scope: "col" }, "Status"),
          h("th", { scope: "col" }, "Progress"), h("th", { scope: "col", class: "num" }, "req/s"),
          h("th", { scope: "col", class: "num" }, "tok/s"), h("th", { scope: "col", class: "num" }, "ETA"),
          h("th", { scope: "col" }, "Model"), h("th", { scope: "col" }, "Endpoint"),
          h("th", { scope: "col" }, "Created"), h("th", { scope: "col" }, "Ended"))),
        this.body),
      h("div", { class: "pager" }, this.prev, this.pageLabel, this.next));
    this.loadModels();
    this.refresh();
    this.timer = setInterval(() => this.tick(), POLL_MS);
  }

  unmount() {
    clearInterval(this.timer);
  }

  async loadModels() {
    try {
      const models = await get("/v1/models");
      const names = new Set(models.data.map((m) => m.id));
      if (this.model) names.add(this.model);
      for (const name of [...names].sort()) this.modelSelect.append(h("option", { value: name }, name));
      this.modelSelect.value = this.model;
    } catch {
      // the filter still offers "All models"
    }
  }

  filter() {
    this.status = this.statusSelect.value;
    this.model = this.modelSelect.value;
    const query = new URLSearchParams();
    if (this.status) query.set("status", this.status);
    if (this.model) query.set("model", this.model);
    const hash = `#/${query.toString() ? `?${query}` : ""}`;
    history.replaceState(null, "", hash);
    this.cursors = [null];
    this.refresh(true);
  }

  go(step) {
    if (step > 0 && this.hasMore && this.page.length) this.cursors.push(this.page[this.page.length - 1].id);
    else if (step < 0 && this.cursors.length > 1) this.cursors.pop();
    else return;
    this.refresh(true);
  }

  onEvent() {
    this.dirty = true;
    clearTimeout(this.soon);
    this.soon = setTimeout(() => this.refresh(), 150); // a burst of events: one request
  }

  onLive() {
    this.refresh();
  }

  tick() {
    if (document.hidden) return;
    const moving = this.page.some((b) => ACTIVE.has(b.status));
    const idle = Date.now() - this.lastFetch > IDLE_POLL_MS;
    if (moving || this.dirty || idle || !this.app.live) this.refresh();
  }

  // Load the current page. A call while the same page is loading shares that request; a call for another page
  // (a filter changed, Next) cancels it, so an old answer never overwrites the view the user asked for.
  async refresh(rebuild = false) {
    const query = { limit: PAGE_SIZE, after: this.cursors[this.cursors.length - 1], status: this.status, model: this.model };
    const key = JSON.stringify(query);
    if (this.inflight) {
      if (this.inflightKey === key && !rebuild) return this.inflight;
      this.controller.abort();
    }
    this.dirty = false;
    this.lastFetch = Date.now();
    this.controller = new AbortController();
    this.inflightKey = key;
    const request = get("/v1/batches", query, { signal: this.controller.signal }).then(async (page) => {
      if (this.inflight !== request) return;
      // Which batches wait behind another (one GET /status for the page, and only if one might).
      const waiting = page.data.find((b) => b.status === "in_progress" && !(b.request_counts || {}).completed && !(b.request_counts || {}).failed);
      this.running = waiting ? await runningBatches() : null;
      if (this.inflight !== request) return;
      this.page = page.data;
      this.hasMore = page.has_more;
      this.render(rebuild);
    }, (error) => {
      if (this.inflight !== request || error.name === "AbortError") return;
      this.summary.textContent = `Could not load the queue: ${error.message}`;
    }).finally(() => {
      if (this.inflight === request) this.inflight = null;
    });
    this.inflight = request;
    return request;
  }

  render(rebuild) {
    const ids = this.page.map((b) => b.id);
    const sameOrder = !rebuild && ids.length === this.rowsById.size && ids.every((id, i) => this.body.children[i] && this.body.children[i].dataset.id === id);
    if (!sameOrder) {
      this.rowsById = new Map();
      replace(this.body, this.page.map((batch) => {
        const row = this.row(batch);
        this.rowsById.set(batch.id, row);
        return row.tr;
      }));
    }
    for (const batch of this.page) this.update(this.rowsById.get(batch.id), batch);
    const filtered = this.status || this.model;
    if (!this.page.length) {
      this.summary.textContent = filtered ? "No batch matches these filters." : "No batches yet. Create one with New batch.";
    } else {
      const active = this.page.filter((b) => ACTIVE.has(b.status)).length;
      this.summary.textContent = `${this.page.length} batches on this page` + (active ? `, ${active} active` : "") + ".";
    }
    this.prev.disabled = this.cursors.length <= 1;
    this.next.disabled = !this.hasMore;
    this.pageLabel.textContent = `Page ${this.cursors.length}`;
    if (this.main.dataset.loaded !== "true") {
      this.main.dataset.loaded = "true";
      performance.mark("vllm-batch:queue-rendered"); // what benchmarks/dashboard.py times a page load by
    }
    if (rebuild) announce(this.summary.textContent);
  }

  row(batch) {
    const cell = (label, attrs = {}) => h("td", { "data-label": label, ...attrs });
    const cells = {
      job: cell("Job", { class: "job" }),
      status: cell("Status", { class: "status" }),
      progress: cell("Progress", { class: "progress-cell" }),
      rps: cell("req/s", { class: "num rps" }),
      tps: cell("tok/s", { class: "num tps" }),
      eta: cell("ETA", { class: "num eta" }),
      model: cell("Model", { class: "model" }),
      endpoint: cell("Endpoint", { class: "endpoint" }),
      created: cell("Created"),
      ended: cell("Ended", { class: "ended" }),
    };
    const name = jobName(batch);
    add(cells.job, h("a", { href: `#/batches/${batch.id}` }, name || batch.id),
      name ? h("span", { class: "id mono" }, batch.id) : null);
    cells.endpoint.append(h("code", {}, batch.endpoint));
    cells.created.append(time(batch.created_at));
    const tr = h("tr", { dataset: { id: batch.id } }, Object.values(cells));
    return { tr, cells };
  }

  update(row, batch) {
    const { cells, tr } = row;
    const estimate = this.app.rates.observe(batch);
    tr.dataset.status = batch.status;
    if (cells.status.dataset.status !== batch.status) {
      cells.status.dataset.status = batch.status;
      replace(cells.status, badge(batch.status));
    }
    replace(cells.progress, progressBar(batch), h("span", { class: "counts" }, countsText(batch)));
    const behind = queuedBehind(batch, this.running);
    cells.rps.textContent = behind ? "queued" : rate(estimate.requestsPerSecond);
    cells.rps.title = behind ? `queued behind ${behind}` : "";
    cells.tps.textContent = behind ? "—" : rate(estimate.tokensPerSecond);
    cells.eta.textContent = estimate.eta === null ? "—" : duration(estimate.eta);
    cells.eta.classList.toggle("late", Boolean(estimate.late));
    cells.eta.title = estimate.late ? "At this pace the batch will not finish before its completion window ends" : "";
    cells.model.textContent = batch.model || "—";
    const ended = endedAt(batch);
    if (cells.ended.dataset.at !== String(ended)) {
      cells.ended.dataset.at = String(ended);
      replace(cells.ended, time(ended));
    }
  }
}
