// Create a batch: drop (or choose) a JSONL file, pick the endpoint, completion window and metadata, upload,
// create, and wait while the server validates it. Validation errors are listed by line right here, before
// any request runs; a batch that passes opens its own page.

import { capabilities, get, post, upload } from "./api.js";
import { announce, bytes, h, replace } from "./dom.js";

const ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
const WINDOWS = ["24h", "12h", "4h", "1h", "30m"];
const MAX_METADATA = 16;
const VALIDATION_POLL_MS = 500;
const SNIFF_BYTES = 64 * 1024;

export class CreateView {
  constructor(app) {
    this.app = app;
    this.file = null;
  }

  mount(main) {
    this.main = main;
    this.fileInput = h("input", { type: "file", id: "file", accept: ".jsonl,.json,.txt,application/jsonl,application/x-ndjson", onchange: () => this.choose(this.fileInput.files[0]) });
    this.fileInfo = h("p", { id: "file-info", class: "muted", "aria-live": "polite" }, "No file chosen.");
    this.drop = h("div", { class: "drop", id: "drop" },
      h("p", {}, h("strong", {}, "Drop a JSONL file here"), " or choose one:"),
      h("label", { for: "file", class: "visually-hidden" }, "Input file (JSONL)"), this.fileInput, this.fileInfo);
    for (const type of ["dragenter", "dragover"]) {
      this.drop.addEventListener(type, (event) => {
        event.preventDefault();
        this.drop.dataset.over = "true";
      });
    }
    this.drop.addEventListener("dragleave", () => {
      this.drop.dataset.over = "false";
    });
    this.drop.addEventListener("drop", (event) => {
      event.preventDefault();
      this.drop.dataset.over = "false";
      const file = event.dataTransfer && event.dataTransfer.files[0];
      if (file) this.choose(file);
    });

    this.endpoint = h("select", { id: "endpoint" }, ENDPOINTS.map((e) => h("option", { value: e }, e)));
    this.window = h("input", { id: "window", value: "24h", list: "windows", required: true, pattern: "[1-9][0-9]{0,6}[smhd]", size: 8 });
    this.jobName = h("input", { id: "job-name", maxlength: 512, placeholder: "e.g. nightly-eval" });
    this.pairs = h("div", { class: "pairs", id: "metadata" });
    this.progress = h("p", { id: "create-progress", class: "muted", "aria-live": "polite" });
    this.errors = h("div", { id: "create-errors" });
    this.submit = h("button", { type: "submit", id: "create" }, "Upload and create batch");
    this.form = h("form", { id: "create-form", novalidate: true, onsubmit: (event) => { event.preventDefault(); this.create(); } },
      this.drop,
      h("div", { class: "field" }, h("label", { for: "endpoint" }, "Endpoint"), this.endpoint,
        h("span", { class: "hint" }, "Every line's url must be this endpoint. Chosen from the file when it says.")),
      h("div", { class: "field" }, h("label", { for: "window" }, "Completion window"), this.window,
        h("datalist", { id: "windows" }, WINDOWS.map((w) => h("option", { value: w }))),
        h("span", { class: "hint" }, "24h as OpenAI, or any duration such as 90m or 2h (at most 30 days).")),
      h("div", { class: "field" }, h("label", { for: "job-name" }, "Job name"), this.jobName,
        h("span", { class: "hint" }, "Stored as metadata name; shown in the queue.")),
      h("fieldset", {}, h("legend", {}, "Other metadata"), this.pairs,
        h("button", { type: "button", class: "secondary", id: "add-metadata", onclick: () => this.addPair() }, "Add a key")),
      h("div", { class: "actions" }, this.submit),
      this.progress, this.errors);
    replace(main, h("h1", {}, "New batch"), this.form);
    this.loadEndpoints();
  }

  unmount() {
    this.gone = true;
  }

  async loadEndpoints() {
    try {
      const { spec } = await capabilities();
      const listed = spec.components.schemas.CreateBatch.properties.endpoint.enum;
      if (Array.isArray(listed) && listed.length) {
        const current = this.endpoint.value;
        replace(this.endpoint, listed.map((e) => h("option", { value: e }, e)));
        if (listed.includes(current)) this.endpoint.value = current;
      }
    } catch {
      // the default list
    }
  }

  addPair(key = "", value = "") {
    if (this.pairs.children.length >= MAX_METADATA - 1) return;
    const n = this.pairs.children.length + 1;
    const row = h("div", { class: "row" },
      h("input", { "aria-label": `Metadata key ${n}`, class: "meta-key", maxlength: 64, value: key, placeholder: "key" }),
      h("input", { "aria-label": `Metadata value ${n}`, class: "meta-value", maxlength: 512, value, placeholder: "value" }));
    row.append(h("button", { type: "button", class: "link", "aria-label": `Remove metadata key ${n}`, onclick: () => row.remove() }, "Remove"));
    this.pairs.append(row);
    row.querySelector("input").focus();
  }

  // Read the start of the file: the endpoint its first line names, and a count of lines if it is small.
  async choose(file) {
    this.file = file || null;
    replace(this.errors);
    if (!file) {
      this.fileInfo.textContent = "No file chosen.";
      return;
    }
    this.fileInfo.textContent = `${file.name} · ${bytes(file.size)}`;
    try {
      const head = await file.slice(0, SNIFF_BYTES).text();
      const first = head.split("\n").find((line) => line.trim());
      const url = first ? JSON.parse(first).url : null;
      if (url && [...this.endpoint.options].some((o) => o.value === url)) this.endpoint.value = url;
    } catch {
      // the server's validation will say what is wrong, by line
    }
  }

  metadata() {
    const metadata = {};
    if (this.jobName.value.trim()) metadata.name = this.jobName.value.trim();
    for (const row of this.pairs.children) {
      const key = row.querySelector(".meta-key").value.trim();
      if (key) metadata[key] = row.querySelector(".meta-value").value;
    }
    return Object.keys(metadata).length ? metadata : null;
  }

  fail(message) {
    replace(this.errors, h("p", { class: "error", role: "alert" }, message));
    this.progress.textContent = "";
    this.submit.disabled = false;
  }

  async create() {
    replace(this.errors);
    if (!this.file) return this.fail("Choose a JSONL file first.");
    if (!this.window.checkValidity()) return this.fail("The completion window must look like 24h, 90m or 2h.");
    this.submit.disabled = true;
    let batch;
    try {
      this.progress.textContent = "Uploading…";
      const file = await upload(this.file, "batch", (fraction) => {
        this.progress.textContent = `Uploading… ${Math.round(fraction * 100)}%`;
      });
      this.progress.textContent = "Creating the batch…";
      batch = await post("/v1/batches", {
        input_file_id: file.id, endpoint: this.endpoint.value, completion_window: this.window.value.trim(),
        metadata: this.metadata(),
      });
    } catch (error) {
      return this.fail(error.param ? `${error.message} (${error.param})` : error.message);
    }
    this.progress.textContent = "Checking every line of the file…";
    announce("Batch created; the server is checking the file.");
    while (batch.status === "validating" && !this.gone) {
      await new Promise((resolve) => setTimeout(resolve, VALIDATION_POLL_MS));
      try {
        batch = await get(`/v1/batches/${encodeURIComponent(batch.id)}`);
      } catch (error) {
        return this.fail(`Could not follow the new batch: ${error.message}`);
      }
    }
    if (this.gone) return;
    const problems = batch.errors && batch.errors.data ? batch.errors.data : [];
    if (batch.status === "failed" && problems.length) {
      this.progress.textContent = "";
      this.submit.disabled = false;
      replace(this.errors,
        h("div", { class: "error", role: "alert" },
          h("p", {}, h("strong", {}, `The file was refused: ${problems.length} problem${problems.length === 1 ? "" : "s"}. `),
            "No request ran. Fix the file and upload it again. ", h("a", { href: `#/batches/${batch.id}` }, "The refused batch")),
          h("table", { class: "errors", id: "create-validation-errors" },
            h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "num" }, "Line"), h("th", { scope: "col" }, "Parameter"),
              h("th", { scope: "col" }, "Code"), h("th", { scope: "col" }, "Reason"))),
            h("tbody", {}, problems.map((e) => h("tr", {},
              h("td", { class: "num" }, e.line === null || e.line === undefined ? "—" : String(e.line)),
              h("td", {}, e.param ? h("code", {}, e.param) : "—"), h("td", {}, e.code || "—"), h("td", {}, e.message || "")))))));
      return;
    }
    location.hash = `#/batches/${batch.id}`;
  }
}
