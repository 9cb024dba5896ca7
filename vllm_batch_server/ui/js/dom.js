// Building the page from data without ever parsing data as HTML: every string is set as text, so a batch's
// metadata or an error message cannot inject markup (the Content-Security-Policy forbids inline script too).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function add(el, ...children) {
  append(el, children);
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

export function announce(text) {
  const region = document.getElementById("announce");
  if (region) region.textContent = text;
}

// ---- numbers, sizes, times

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

export function count(n) {
  return n === null || n === undefined ? "—" : integer.format(n);
}

export function rate(perSecond) {
  if (perSecond === null || perSecond === undefined || !Number.isFinite(perSecond)) return "—";
  if (perSecond >= 100) return integer.format(perSecond);
  return perSecond.toFixed(perSecond >= 10 ? 1 : 2);
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value >= 10 ? 0 : 1)} ${units[unit]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours}h ${m % 60}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

const stamp = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const clock = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });

// A <time> element for a Unix time in seconds: short when it is today, the full date otherwise.
export function time(unix) {
  if (!unix) return h("span", { class: "muted" }, "—");
  const date = new Date(unix * 1000);
  const today = new Date().toDateString() === date.toDateString();
  return h("time", { datetime: date.toISOString(), title: stamp.format(date) },
    today ? clock.format(date) : stamp.format(date));
}

export function statusLabel(status) {
  return String(status).replace("_", " ");
}

export function badge(status) {
  return h("span", { class: "badge", "data-status": status }, statusLabel(status));
}
