// The dashboard's only way to the server: the public JSON API, with the key as a Bearer header.
//
// The key lives in this tab's sessionStorage: it is gone when the tab closes, other tabs and sites never see
// it, and it is never put in a URL or a cookie (so it cannot leak through logs, history or a Referer). The
// event stream is read with fetch rather than EventSource for the same reason: EventSource cannot send a
// header, and a key in its URL would end up in access logs.

const KEY = "vllm-batch.api-key";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `The server answered ${status}.`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
  }
}

export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
  },
};

// Called with the error whenever the server refuses the key, so the app can ask for it again.
let onUnauthorized = () => {};
export function whenUnauthorized(handler) {
  onUnauthorized = handler;
}

export function headers(extra = {}) {
  const key = session.key;
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return new ApiError(response.status, body);
}

// fetch + the key + OpenAI's error shape turned into an ApiError.
export async function call(method, path, { json, body, query, signal, extraHeaders, key } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  const init = { method, signal, cache: "no-store", headers: headers(extraHeaders) };
  if (key !== undefined) {
    if (key) init.headers.Authorization = `Bearer ${key}`;
    else delete init.headers.Authorization;
  }
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(url, init);
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && key === undefined) onUnauthorized(error);
    throw error;
  }
  return response;
}

export async function get(path, query, options = {}) {
  return (await call("GET", path, { query, ...options })).json();
}

export async function post(path, json, options = {}) {
  return (await call("POST", path, { json, ...options })).json();
}

// Whether the server needs a key: /v1/models answers 401 without one. Does not use the stored key.
export async function needsKey() {
  const response = await fetch("/v1/models", { cache: "no-store" });
  return response.status === 401;
}

// Upload with progress (fetch cannot report an upload's progress; XMLHttpRequest can).
export function upload(file, purpose, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/files");
    for (const [name, value] of Object.entries(headers())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    };
    xhr.onerror = () => reject(new ApiError(0, { error: { message: "The upload failed: the server could not be reached." } }));
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = null;
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        const error = new ApiError(xhr.status, body);
        if (xhr.status === 401) onUnauthorized(error);
        reject(error);
      }
    };
    const form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

// Save a file's content. Without a key the browser downloads it itself, streamed to disk; with a key the
// request needs the header, so the bytes come through fetch into memory first.
export async function download(fileId, filename) {
  const path = `/v1/files/${encodeURIComponent(fileId)}/content`;
  const link = document.createElement("a");
  link.download = filename || `${fileId}.jsonl`;
  let objectUrl = null;
  if (session.key) {
    const blob = await (await call("GET", path)).blob();
    objectUrl = URL.createObjectURL(blob);
    link.href = objectUrl;
  } else {
    link.href = path;
  }
  document.body.append(link);
  link.click();
  link.remove();
  if (objectUrl) setTimeout(() => URL.revokeObjectURL(objectUrl), 60_000);
}

// The first `limit` lines of a file, reading at most `maxBytes` of it (a Range request: a large error file
// is not downloaded to show its first lines).
export async function firstLines(fileId, limit, maxBytes = 256 * 1024) {
  const response = await call("GET", `/v1/files/${encodeURIComponent(fileId)}/content`,
    { extraHeaders: { Range: `bytes=0-${maxBytes - 1}` } });
  const text = await response.text();
  const complete = response.status !== 206 || text.length < maxBytes;
  const lines = text.split("\n");
  if (!complete) lines.pop(); // the last one may be cut
  return lines.filter((line) => line.trim()).slice(0, limit);
}

// Which optional routes this server has (retry, partial results, /status...), read from its OpenAPI
// description rather than by calling them, so finding out changes nothing.
let described = null;
export async function capabilities() {
  if (!described) {
    described = get("/openapi.json").then(
      (spec) => ({ paths: new Set(Object.keys(spec.paths || {})), spec }),
      (error) => {
        described = null;
        throw error;
      },
    );
  }
  return described;
}

export function forgetCapabilities() {
  described = null;
}

// ---- live events: server-sent events read through fetch

export class EventFeed {
  // onEvent(event) for each lifecycle event; onState("live" | "reconnecting" | "unavailable").
  constructor(onEvent, onState) {
    this.onEvent = onEvent;
    this.onState = onState;
    this.lastSeq = null;
    this.retryMs = 2000;
    this.controller = null;
    this.stopped = true;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.generation = (this.generation || 0) + 1;
    this.run(this.generation);
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  // One loop per start(): a loop left waiting to reconnect when the feed was stopped and started again ends
  // instead of running beside the new one.
  async run(generation) {
    while (!this.stopped && generation === this.generation) {
      this.controller = new AbortController();
      try {
        const extra = this.lastSeq === null ? {} : { "Last-Event-ID": String(this.lastSeq) };
        const response = await fetch("/v1/events/stream", {
          headers: headers(extra), signal: this.controller.signal, cache: "no-store",
        });
        if (response.status === 401) {
          onUnauthorized(await errorOf(response));
          this.stopped = true;
          return;
        }
        if (response.status === 404) {
          this.onState("unavailable");
          this.stopped = true;
          return;
        }
        if (!response.ok || !response.body) throw new Error(`event stream answered ${response.status}`);
        this.onState("live");
        await this.read(response.body);
      } catch {
        if (this.stopped) return;
      }
      if (this.stopped || generation !== this.generation) return;
      this.onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, this.retryMs));
    }
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        this.message(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  }

  message(block) {
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "id") id = value;
      else if (field === "data") data.push(value);
      else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    }
    if (data.length) {
      try {
        this.onEvent(JSON.parse(data.join("\n")));
      } catch {
        // not one of ours: ignore
      }
    }
    if (id !== null && /^\d+$/.test(id)) this.lastSeq = Number(id);
  }
}

// The batches the engine runs now (GET /status's `running`), or null when the server does not say.
export async function runningBatches() {
  try {
    const running = (await get("/status")).running;
    return Array.isArray(running) ? running : null;
  } catch {
    return null;
  }
}

// The batch an in_progress batch waits behind: the first one the engine runs now, or null when it runs itself,
// has started, or the server does not say.
export function queuedBehind(batch, running) {
  const counts = batch.request_counts || {};
  if (!running || !running.length || running.includes(batch.id)) return null;
  return batch.status === "in_progress" && !counts.completed && !counts.failed ? running[0] : null;
}
