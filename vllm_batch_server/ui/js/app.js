// The dashboard's shell: sign-in, the hash router (#/, #/new, #/batches/ID), the server panel and one live
// event feed that tells the current view when a batch changed.

import { EventFeed, call, forgetCapabilities, needsKey, session, whenUnauthorized } from "./api.js";
import { BatchView } from "./batch.js";
import { CreateView } from "./create.js";
import { h, replace } from "./dom.js";
import { QueueView } from "./queue.js";
import { Rates } from "./rates.js";
import { ServerPanel } from "./server.js";

const main = document.getElementById("main");
const liveBadge = document.getElementById("live");
const access = document.getElementById("access");
const signOut = document.getElementById("sign-out");

const app = {
  rates: new Rates(),
  live: false,
  view: null,
  keyRequired: null,
};

const panel = new ServerPanel(document.getElementById("server"));
const feed = new EventFeed((event) => {
  if (app.view && app.view.onEvent) app.view.onEvent(event);
}, (state) => {
  app.live = state === "live";
  liveBadge.dataset.state = state === "unavailable" ? "polling" : state;
  liveBadge.textContent = { live: "live", reconnecting: "reconnecting…", unavailable: "polling" }[state] || state;
  if (state === "live" && app.view && app.view.onLive) app.view.onLive();
});

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const batch = path.match(/^\/batches\/(batch_[A-Za-z0-9]+)$/);
  if (batch) return { name: "batch", make: () => new BatchView(app, batch[1]) };
  if (path === "/new") return { name: "new", make: () => new CreateView(app) };
  return { name: "queue", make: () => new QueueView(app, params) };
}

// After a route change focus moves to the new content (as a page load would put it at the top); on the first
// load it stays at the start of the page, where the skip link is.
function show(initial = false) {
  if (app.view && app.view.unmount) app.view.unmount();
  const { name, make } = route();
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = { queue: "Queue", new: "New batch", batch: "Batch" }[name] + " · vllm-batch";
  app.view = make();
  app.view.mount(main);
  if (!initial) main.focus({ preventScroll: true });
}

function showAccess() {
  replace(access);
  if (app.keyRequired) {
    access.textContent = "Signed in with an API key";
    signOut.hidden = false;
  } else {
    access.append(h("span", { id: "open-server", title: "Anyone who can reach this server can use it: start it with --api-key to require a key." }, "Open server: no API key needed"));
    signOut.hidden = true;
  }
}

function start() {
  showAccess();
  feed.start();
  panel.start();
  show(true);
}

function stopAll() {
  feed.stop();
  panel.stop();
  if (app.view && app.view.unmount) app.view.unmount();
  app.view = null;
}

function signIn(message) {
  stopAll();
  session.key = null;
  forgetCapabilities();
  signOut.hidden = true;
  access.textContent = "This server needs an API key";
  liveBadge.dataset.state = "";
  liveBadge.textContent = "signed out";
  replace(document.getElementById("server"));
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const error = h("div", { id: "sign-in-error", role: "alert" }, message ? h("p", { class: "error" }, message) : null);
  const button = h("button", { type: "submit", id: "sign-in" }, "Sign in");
  const form = h("form", {
    class: "signin", id: "sign-in-form",
    onsubmit: async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      button.disabled = true;
      try {
        await call("GET", "/v1/models", { key });
        session.key = key;
        input.value = "";
        start();
      } catch (failure) {
        replace(error, h("p", { class: "error" }, failure.status === 401 ? "That key was not accepted." : `Could not reach the server: ${failure.message}`));
        button.disabled = false;
        input.focus();
      }
    },
  },
  h("h1", {}, "Sign in"),
  h("p", {}, "This server was started with an API key. Enter it to use the dashboard. It is kept only in this tab and sent to this server alone, as a Bearer header."),
  h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), input),
  button, error);
  replace(main, form);
  input.focus();
}

whenUnauthorized(() => {
  if (app.keyRequired) signIn("The server no longer accepts this key. Sign in again.");
});

signOut.addEventListener("click", () => signIn());
window.addEventListener("hashchange", () => {
  if (app.view) show();
});
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && app.view && app.view.onLive) app.view.onLive();
});

async function boot() {
  try {
    app.keyRequired = await needsKey();
  } catch (error) {
    replace(main, h("h1", {}, "Cannot reach the server"), h("p", { class: "error" }, String(error.message || error)));
    return;
  }
  if (!app.keyRequired) {
    session.key = null;
    start();
    return;
  }
  if (session.key) {
    try {
      await call("GET", "/v1/models", { key: session.key });
      start();
      return;
    } catch {
      return signIn("The stored key was not accepted. Sign in again.");
    }
  }
  signIn();
}

boot();
