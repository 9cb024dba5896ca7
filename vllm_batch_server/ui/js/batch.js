// One batch: its timeline, counts and token usage, the first errors (validation errors by input line, or the
// first lines of the error file), downloads, cancel and "retry failed requests".

import { ApiError, call, capabilities, download, firstLines, get, post, queuedBehind, runningBatches } from "./api.js";
import { announce, badge, bytes, count, duration, h, rate, replace, statusLabel, time } from "./dom.js";
import { countsText, jobName, progressBar } from "./queue.js";
import { ENDED, endedAt } from "./rates.js";

const POLL_MS = 1000;
const ERROR_LINES = 20;
const CANCELLABLE = new Set(["validating", "in_progress"]);
const RETRY = "/v1/batches/{batch_id}/retry";
const PARTIAL_ERRORS = "/v1/batches/{batch_id}/errors";

// created → validating → in progress → finalizing → ended, with the time each began.
export function timeline(batch) {
  const ended = endedAt(batch);
  const final = ENDED.has(batch.status) ? batch.status : null;
  const steps = [
    { name: "created", at: batch.created_at },
    { name: "validating", at: batch.created_at },
    { name: "in progress", at: batch.in_progress_at },
    { name: "finalizing", at: batch.finalizing_at },
  ];
  if (batch.cancelling_at) steps.push({ name: "cancelling", at: batch.cancelling_at });
  steps.push({ name: final ? statusLabel(final) : "ended", at: ended });
  const current = { validating: "validating", in_progress: "in progress", finalizing: "finalizing", cancelling: "cancelling" }[batch.status];
  return steps.map((step, i) => {
    let state;
    if (i === steps.length - 1 && final) state = final === "completed" ? "done" : "bad";
    else if (step.name === current) state = "current";
    else if (step.at) state = "done";
    else state = final ? "skipped" : "pending";
    return { ...step, state };
  });
}

function fact(label, value, name) {
  return h("div", { class: "stat", "data-fact": name },
    h("span", { class: "label" }, label), h("span", { class: "value" }, value));
}

// An error's code as a word: its `code` when that is a string (context_length_exceeded), else its `type`
// (vLLM puts the HTTP status in `code`, 400, and the kind in `type`, BadRequestError), else the code itself.
export function errorCode(error) {
  if (typeof error.code === "string" && error.code) return error.code;
  if (typeof error.type === "string" && error.type) return error.type;
  return error.code === undefined || error.code === null || error.code === "" ? null : String(error.code);
}

// One line of an error file, as the page shows it: who (custom_id), what status, why.
export function describeErrorLine(raw) {
  try {
    const line = JSON.parse(raw);
    const response = line.response || null;
    const error = line.error || (response && response.body && response.body.error) || {};
    return {
      customId: line.custom_id,
      status: response ? response.status_code : null,
      code: errorCode(error),
      message: error.message || (response ? JSON.stringify(response.body).slice(0, 300) : ""),
    };
  } catch {
    return { customId: null, status: null, code: null, message: raw.slice(0, 300) };
  }
}

export class BatchView {
  constructor(app, id) {
    this.app = app;
    this.id = id;
    this.batch = null;
    this.files = new Map();
    this.errorsShownFor = null;
  }

  mount(main) {
    this.main = main;
    this.title = h("h1", {}, this.id);
    this.statusLine = h("p", { class: "row" });
    this.message = h("div", { role: "alert" });
    this.actions = h("div", { class: "actions" });
    this.timelineList = h("ol", { class: "timeline", "aria-label": "Timeline" });
    this.facts = h("div", { class: "facts" });
    this.errorsSection = h("section", { "aria-labelledby": "errors-title" });
    this.filesList = h("ul", { class: "files" });
    this.metadata = h("section", {});
    replace(main, h("p", {}, h("a", { href: "#/" }, "← Queue")), this.title, this.statusLine, this.message,
      this.actions, this.timelineList, this.facts, this.errorsSection,
      h("h2", {}, "Files"), this.filesList, this.metadata);
    this.refresh();
    this.timer = setInterval(() => {
      if (!document.hidden && this.batch && !ENDED.has(this.batch.status)) this.refresh();
    }, POLL_MS);
  }

  unmount() {
    clearInterval(this.timer);
  }

  onEvent(event) {
    if (event.data && event.data.id === this.id) this.refresh();
  }

  onLive() {
    this.refresh();
  }

  async refresh() {
    if (this.loading) {
      this.again = true; // an event during a load: load once more after it, or the change could be missed
      return;
    }
    this.loading = true;
    this.again = false;
    try {
      this.batch = await get(`/v1/batches/${encodeURIComponent(this.id)}`);
      await this.render();
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        replace(this.main, h("h1", {}, "No such batch"), h("p", {}, `There is no batch ${this.id}.`),
          h("p", {}, h("a", { href: "#/" }, "Back to the queue")));
        clearInterval(this.timer);
      } else {
        replace(this.message, h("p", { class: "error" }, `Could not load the batch: ${error.message}`));
      }
    } finally {
      this.loading = false;
    }
    if (this.again) this.refresh();
  }

  async render() {
    const batch = this.batch;
    const estimate = this.app.rates.observe(batch);
    const name = jobName(batch);
    this.title.textContent = name || batch.id;
    document.title = `${name || batch.id} · vllm-batch`;
    // A batch that ended without a model (refused by validation, cancelled before) never will have one.
    const model = batch.model || (ENDED.has(batch.status) ? "no model (it never ran)" : "model not known yet");
    const counts = batch.request_counts || {};
    const mayWait = batch.status === "in_progress" && !counts.completed && !counts.failed;
    const behind = mayWait ? queuedBehind(batch, await runningBatches()) : null;
    replace(this.statusLine, badge(batch.status), name ? h("span", { class: "mono muted" }, batch.id) : null,
      behind ? h("span", { class: "queued", id: "queued-behind" }, "queued behind ",
        h("a", { href: `#/batches/${behind}`, class: "mono" }, behind)) : null,
      h("span", { class: "muted" }, `${model} · `, h("code", {}, batch.endpoint)));
    this.main.dataset.status = batch.status;

    replace(this.timelineList, timeline(batch).map((step) => h("li", { "data-state": step.state, "data-step": step.name },
      h("span", { class: "step" }, step.name),
      step.at && step.state !== "pending" ? time(step.at) : h("span", { class: "when" }, step.state === "skipped" ? "skipped" : "—"))));

    const usage = batch.usage || {};
    const cached = usage.input_tokens_details ? usage.input_tokens_details.cached_tokens : 0;
    const window = batch.expires_at && !ENDED.has(batch.status) ? batch.expires_at - Date.now() / 1000 : null;
    replace(this.facts,
      h("div", { class: "stat", "data-fact": "progress" }, h("span", { class: "label" }, "Progress"), progressBar(batch),
        h("span", { class: "value counts", id: "counts" }, countsText(batch))),
      fact(estimate.live ? "Requests/s" : "Requests/s (average)", behind ? "— (queued)" : rate(estimate.requestsPerSecond), "rps"),
      fact(estimate.live ? "Output tokens/s" : "Output tokens/s (average)", behind ? "— (queued)" : rate(estimate.tokensPerSecond), "tps"),
      ENDED.has(batch.status) ? null : fact("Time left", estimate.eta === null ? "—" : duration(estimate.eta) + (estimate.late ? " (past the deadline)" : ""), "eta"),
      fact("Input tokens", `${count(usage.input_tokens)}` + (cached ? ` (${count(cached)} cached)` : ""), "input-tokens"),
      fact("Output tokens", count(usage.output_tokens), "output-tokens"),
      fact("Total tokens", count(usage.total_tokens), "total-tokens"),
      fact("Completion window", `${batch.completion_window}` + (window !== null ? ` (${duration(Math.max(0, window))} left)` : ""), "window"));

    await this.renderActions();
    await this.renderFiles();
    await this.renderErrors();
    this.renderMetadata();
  }

  async renderActions() {
    const batch = this.batch;
    const buttons = [];
    if (CANCELLABLE.has(batch.status)) {
      buttons.push(h("button", { type: "button", class: "danger", id: "cancel", onclick: () => this.cancel() }, "Cancel batch"));
    }
    if (ENDED.has(batch.status) && batch.request_counts && batch.request_counts.failed > 0 && await this.can(RETRY)) {
      buttons.push(h("button", { type: "button", id: "retry", onclick: () => this.retry() },
        `Retry ${count(batch.request_counts.failed)} failed requests`));
    }
    const focused = document.activeElement && this.actions.contains(document.activeElement) ? document.activeElement.id : null;
    replace(this.actions, buttons);
    if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
  }

  async can(path) {
    try {
      return (await capabilities()).paths.has(path);
    } catch {
      return false;
    }
  }

  async cancel() {
    if (!confirm("Cancel this batch? Requests already finished keep their results.")) return;
    try {
      this.batch = await post(`/v1/batches/${encodeURIComponent(this.id)}/cancel`);
      announce(`Batch ${statusLabel(this.batch.status)}.`);
      await this.render();
    } catch (error) {
      replace(this.message, h("p", { class: "error" }, `Could not cancel: ${error.message}`));
    }
  }

  async retry() {
    try {
      const created = await post(`/v1/batches/${encodeURIComponent(this.id)}/retry`, {});
      announce("A new batch of the failed requests was created.");
      location.hash = `#/batches/${created.id}`;
    } catch (error) {
      if (error instanceof ApiError && error.status === 404 && error.code === "unknown_url") {
        replace(this.message, h("p", { class: "notice" }, "This server cannot retry failed requests."));
        document.getElementById("retry")?.remove();
      } else {
        replace(this.message, h("p", { class: "error" }, `Could not retry: ${error.message}`));
      }
    }
  }

  async fileInfo(id) {
    if (!this.files.has(id)) {
      this.files.set(id, get(`/v1/files/${encodeURIComponent(id)}`).catch(() => null));
    }
    return this.files.get(id);
  }

  async renderFiles() {
    const batch = this.batch;
    const wanted = [["input", "Input", batch.input_file_id], ["output", "Output", batch.output_file_id],
      ["errors", "Errors", batch.error_file_id]].filter(([, , id]) => id);
    const key = wanted.map(([, , id]) => id).join(",");
    if (this.filesKey === key) return;
    this.filesKey = key;
    const items = [];
    for (const [kind, label, id] of wanted) {
      const info = await this.fileInfo(id);
      const filename = info ? info.filename : `${id}.jsonl`;
      items.push(h("li", {}, h("button", {
        type: "button", class: "secondary", "data-download": kind,
        onclick: () => download(id, filename).catch((error) => {
          replace(this.message, h("p", { class: "error" }, `Could not download: ${error.message}`));
        }),
      }, `Download ${label.toLowerCase()}`, info ? ` (${bytes(info.bytes)})` : "")));
    }
    if (!ENDED.has(batch.status)) items.push(h("li", { class: "muted" }, "Output and error files appear when the batch ends."));
    replace(this.filesList, items);
  }

  async renderErrors() {
    const batch = this.batch;
    const validation = batch.errors && batch.errors.data ? batch.errors.data : [];
    // The error file's first lines change only when the batch ends (or, with partial results, as it runs).
    const key = `${batch.status}:${batch.error_file_id}:${batch.request_counts ? batch.request_counts.failed : 0}`;
    if (this.errorsShownFor === key) return;
    this.errorsShownFor = key;
    const parts = [];
    if (validation.length) {
      parts.push(h("h2", { id: "errors-title" }, `Validation errors (${validation.length})`),
        h("p", {}, "The input file was refused before any request ran. Fix these lines and upload it again."),
        h("table", { class: "errors", id: "validation-errors" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "num" }, "Line"), h("th", { scope: "col" }, "Parameter"),
            h("th", { scope: "col" }, "Code"), h("th", { scope: "col" }, "Reason"))),
          h("tbody", {}, validation.map((e) => h("tr", {},
            h("td", { class: "num" }, e.line === null || e.line === undefined ? "—" : String(e.line)),
            h("td", {}, e.param ? h("code", {}, e.param) : "—"), h("td", {}, e.code || "—"), h("td", {}, e.message || ""))))));
    }
    const failed = batch.request_counts ? batch.request_counts.failed : 0;
    if (failed > 0) {
      let lines = null;
      if (batch.error_file_id) {
        lines = await firstLines(batch.error_file_id, ERROR_LINES).catch(() => null);
      } else if (await this.can(PARTIAL_ERRORS)) {
        lines = await call("GET", `/v1/batches/${encodeURIComponent(this.id)}/errors`, { query: { after_line: 0, limit: ERROR_LINES } })
          .then((r) => r.text()).then((text) => text.split("\n").filter((l) => l.trim())).catch(() => null);
      }
      parts.push(h("h2", { id: validation.length ? "request-errors-title" : "errors-title" }, `Failed requests (${count(failed)})`));
      if (lines && lines.length) {
        parts.push(h("p", { class: "muted" }, lines.length < failed ? `The first ${lines.length} lines of the error file.` : "Every line of the error file."),
          h("table", { class: "errors", id: "request-errors" },
            h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "num" }, "Line"), h("th", { scope: "col" }, "custom_id"),
              h("th", { scope: "col", class: "num" }, "Status"), h("th", { scope: "col" }, "Code"), h("th", { scope: "col" }, "Reason"))),
            h("tbody", {}, lines.map((raw, i) => {
              const e = describeErrorLine(raw);
              return h("tr", {}, h("td", { class: "num" }, String(i + 1)), h("td", {}, e.customId ? h("code", {}, e.customId) : "—"),
                h("td", { class: "num" }, e.status === null ? "—" : String(e.status)), h("td", {}, e.code || "—"), h("td", {}, e.message));
            }))));
      } else {
        parts.push(h("p", { class: "muted" }, ENDED.has(batch.status) ? "The error file could not be read." : "The failed requests' lines are in the error file once the batch ends."));
      }
    }
    replace(this.errorsSection, parts);
  }

  renderMetadata() {
    const metadata = this.batch.metadata || {};
    const entries = Object.entries(metadata);
    const items = [];
    for (const [key, value] of entries) {
      items.push(h("dt", {}, key));
      items.push(h("dd", {}, key === "retry_of" && /^batch_[A-Za-z0-9]+$/.test(value) ? h("a", { href: `#/batches/${value}`, id: "retry-of" }, value) : value));
    }
    replace(this.metadata, h("h2", {}, "Metadata"), entries.length ? h("dl", { class: "meta" }, items) : h("p", { class: "muted" }, "None."),
      h("h2", {}, "Times"), h("dl", { class: "meta" },
        h("dt", {}, "Created"), h("dd", {}, time(this.batch.created_at)),
        h("dt", {}, "Expires"), h("dd", {}, time(this.batch.expires_at))));
  }
}
