// shardmail webmail: plain JS, no build step. Talks to /v1 with a bearer
// token kept in sessionStorage; live updates over the /v1/events WebSocket.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem("shardmail.token"),
  address: sessionStorage.getItem("shardmail.address"),
  folders: [],
  folderId: null,
  search: null,       // current search query, or null when showing a folder
  cursor: null,
  messages: new Map(),
  current: null,      // the message open in the reader
  lastEventId: null,
  ws: null,
  retry: 1000,
};

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  const init = { method, headers };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const resp = await fetch(path, init);
  if (resp.status === 401 && path !== "/v1/login") { logout(); throw new ApiError(401, "unauthorized", "Signed out"); }
  if (resp.status === 204) return null;
  const data = resp.headers.get("Content-Type")?.startsWith("application/json") ? await resp.json() : null;
  if (!resp.ok) {
    const err = data?.error || {};
    throw new ApiError(resp.status, err.code || "http_error", err.message || resp.statusText);
  }
  return data;
}

function toast(text) {
  const el = $("toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 3000);
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function formatDate(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const today = new Date();
  return d.toDateString() === today.toDateString()
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleDateString();
}

// Binary units, as mail clients show them: "777 bytes", "1.4 MB", "25 MB".
function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} bytes`;
  const units = ["KB", "MB", "GB", "TB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  const digits = value < 9.95 && !Number.isInteger(value) ? 1 : 0;  // no "10.0 MB"
  return `${value.toFixed(digits)} ${units[unit]}`;
}

function who(addr) { return addr ? (addr.name || addr.address) : "(unknown)"; }

// ---- login ----------------------------------------------------------------

async function login(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    const resp = await fetch("/v1/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ address: $("login-address").value, password: $("login-password").value }),
    });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error?.message || "Sign-in failed");
    state.token = data.token;
    state.address = data.account.address;
    sessionStorage.setItem("shardmail.token", state.token);
    sessionStorage.setItem("shardmail.address", state.address);
    $("login-password").value = "";
    await showMail();
  } catch (err) {
    $("login-error").textContent = err.message;
  }
}

function logout() {
  sessionStorage.clear();
  state.token = null;
  if (state.ws) { state.ws.onclose = null; state.ws.close(); state.ws = null; }
  $("mail-view").hidden = true;
  $("login-view").hidden = false;
}

// ---- folders and lists ----------------------------------------------------

async function loadFolders() {
  const data = await api("GET", "/v1/folders");
  state.folders = data.folders;
  const list = $("folder-list");
  list.replaceChildren();
  for (const folder of state.folders) {
    const item = el("li", { className: folder.id === state.folderId && !state.search ? "active" : "" },
      el("span", { textContent: folder.name }),
      el("span", { className: "count", textContent: folder.unread ? String(folder.unread) : "" }));
    item.dataset.folderId = folder.id;
    item.dataset.folderName = folder.name;
    item.addEventListener("click", () => openFolder(folder.id));
    list.append(item);
  }
}

async function openFolder(folderId) {
  state.folderId = folderId;
  state.search = null;
  $("search-input").value = "";
  const folder = state.folders.find((f) => f.id === folderId);
  $("list-title").textContent = folder ? folder.name : "";
  for (const li of $("folder-list").children) li.classList.toggle("active", li.dataset.folderId === folderId);
  await loadList(true);
}

async function runSearch(event) {
  event.preventDefault();
  const q = $("search-input").value.trim();
  if (!q) { await openFolder(state.folderId); return; }
  state.search = q;
  $("list-title").textContent = `Search: ${q}`;
  for (const li of $("folder-list").children) li.classList.remove("active");
  await loadList(true);
}

async function loadList(reset) {
  if (reset) {
    state.cursor = null;
    state.messages.clear();
    $("message-list").replaceChildren();
    document.body.classList.remove("reading");  // a new list: phones show it
  }
  const params = new URLSearchParams({ limit: "50" });
  if (state.cursor) params.set("cursor", state.cursor);
  let path;
  if (state.search) { params.set("q", state.search); path = `/v1/search?${params}`; }
  else path = `/v1/folders/${state.folderId}/messages?${params}`;
  const data = await api("GET", path);
  for (const message of data.messages) appendMessage(message, false);
  state.cursor = data.next_cursor;
  $("more-button").hidden = !state.cursor;
  $("list-empty").hidden = state.messages.size > 0;
}

function renderItem(message) {
  const item = el("li", {},
    el("span", { className: "from", textContent: who(message.from) }),
    el("span", { className: "date", textContent: formatDate(message.date) }),
    el("span", { className: "subject", textContent: (message.flagged ? "★ " : "") + (message.subject || "(no subject)") }),
    el("span", { className: "attach", textContent: message.has_attachments ? "📎" : "" }),
    el("span", { className: "preview", textContent: message.preview || "" }));
  item.dataset.messageId = message.id;
  item.classList.toggle("unread", message.unread);
  item.classList.toggle("selected", state.current?.id === message.id);
  item.addEventListener("click", () => openMessage(message.id));
  return item;
}

// Where a message sits in a folder list, as the server orders it: its Date,
// but never later than its arrival (httpapi.threads.list_date_key).
function listKey(message) {
  const arrived = Date.parse(message.received_at);
  const sent = Date.parse(message.date);
  return Number.isNaN(sent) ? arrived : Math.min(sent, arrived);
}

function appendMessage(message, inOrder) {
  const existing = document.querySelector(`#message-list li[data-message-id="${CSS.escape(message.id)}"]`);
  state.messages.set(message.id, message);
  const item = renderItem(message);
  if (existing) { existing.replaceWith(item); return item; }
  // A live arrival goes before the first listed message it is newer than
  // (an imported one may belong far down); a page from the server appends.
  const key = listKey(message);
  const later = inOrder
    ? [...$("message-list").children].find((li) => listKey(state.messages.get(li.dataset.messageId)) <= key)
    : undefined;
  if (later) later.before(item); else if (!inOrder || !state.cursor) $("message-list").append(item);
  else return item;  // older than everything listed, with more to page: that page will bring it
  $("list-empty").hidden = true;
  return item;
}

// ---- reader ---------------------------------------------------------------

async function openMessage(id) {
  const message = await api("GET", `/v1/messages/${encodeURIComponent(id)}`);
  state.current = message;
  $("reader").hidden = false;
  document.body.classList.add("reading");  // phones show the reader instead of the list
  $("reader-subject").textContent = message.subject || "(no subject)";
  $("reader-from").textContent = message.from ? `${who(message.from)} <${message.from.address}>` : "";
  $("reader-to").textContent = message.to.map(who).join(", ");
  $("reader-date").textContent = message.date ? new Date(message.date).toLocaleString() : "";
  showBody(message, false);
  const list = $("reader-attachments");
  list.replaceChildren();
  for (const att of message.attachments) {
    const link = el("a", { href: "#", textContent: `${att.filename} (${att.content_type}, ${formatSize(att.size)})` });
    link.addEventListener("click", (e) => { e.preventDefault(); download(att); });
    list.append(el("li", {}, link));
  }
  $("flag-button").textContent = message.flagged ? "Unflag" : "Flag";
  for (const li of $("message-list").children) li.classList.toggle("selected", li.dataset.messageId === id);
  if (message.unread) {
    const updated = await api("PATCH", `/v1/messages/${encodeURIComponent(id)}`, { unread: false });
    state.current.unread = false;
    if (state.messages.has(id)) appendMessage(updated, false);
    loadFolders();
  }
}

// Remote images (and tracking pixels) stay blocked until the reader asks: the
// message's own Content-Security-Policy, which a srcdoc frame adds to the
// page's, allows only inline data: images; "Show remote images" re-renders
// it allowing http(s) images too. Nothing else remote is ever allowed.
const BLOCK_REMOTE = "default-src 'none'; img-src data:";
const ALLOW_REMOTE = "default-src 'none'; img-src data: https: http:";

function hasRemoteImages(html) {
  // DOMParser documents load nothing, so looking is safe.
  const doc = new DOMParser().parseFromString(html, "text/html");
  return [...doc.images].some((img) => !/^\s*data:/i.test(img.getAttribute("src") || "data:"));
}

function showBody(message, allowRemote) {
  const frame = $("reader-html");
  $("remote-images").hidden = true;
  if (!message.html) {
    frame.hidden = true;
    frame.srcdoc = "";
    $("reader-text").textContent = message.text || "";
    return;
  }
  const policy = allowRemote ? ALLOW_REMOTE : BLOCK_REMOTE;
  frame.hidden = false;
  frame.srcdoc = `<!doctype html><meta charset="utf-8">`
    + `<meta http-equiv="Content-Security-Policy" content="${policy}">`
    + `<meta name="referrer" content="no-referrer"><base target="_blank">${message.html}`;
  $("reader-text").textContent = "";
  $("remote-images").hidden = allowRemote || !hasRemoteImages(message.html);
}

async function download(att) {
  const resp = await fetch(att.url, { headers: { Authorization: `Bearer ${state.token}` } });
  if (!resp.ok) { toast("Download failed"); return; }
  const url = URL.createObjectURL(await resp.blob());
  const link = el("a", { href: url, download: att.filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function updateCurrent(change) {
  if (!state.current) return;
  const updated = await api("PATCH", `/v1/messages/${encodeURIComponent(state.current.id)}`, change);
  Object.assign(state.current, updated);
  if (state.messages.has(updated.id)) appendMessage(updated, false);
  $("flag-button").textContent = updated.flagged ? "Unflag" : "Flag";
  loadFolders();
}

async function deleteCurrent() {
  if (!state.current) return;
  const id = state.current.id;
  await api("DELETE", `/v1/messages/${encodeURIComponent(id)}`);
  document.querySelector(`#message-list li[data-message-id="${CSS.escape(id)}"]`)?.remove();
  state.messages.delete(id);
  state.current = null;
  $("reader").hidden = true;
  document.body.classList.remove("reading");
  loadFolders();
  toast("Deleted");
}

// ---- compose --------------------------------------------------------------

function openCompose(reply) {
  $("compose-form").reset();
  $("compose-error").textContent = "";
  if (reply) {
    $("compose-to").value = reply.from?.address || "";
    $("compose-subject").value = /^re:/i.test(reply.subject) ? reply.subject : `Re: ${reply.subject}`;
    $("compose-in-reply-to").value = reply.message_id || "";
    const quoted = (reply.text || "").split("\n").map((l) => `> ${l}`).join("\n");
    $("compose-text").value = `\n\n${who(reply.from)} wrote:\n${quoted}`;
  }
  $("compose-dialog").showModal();
}

async function sendCompose(event) {
  event.preventDefault();
  const form = new FormData();
  for (const name of ["to", "cc", "subject", "text", "in_reply_to"]) {
    const value = $(`compose-${name.replaceAll("_", "-")}`).value;
    if (value) form.append(name, value);
  }
  for (const file of $("compose-files").files) form.append("attachment", file, file.name);
  $("compose-send").disabled = true;
  try {
    await api("POST", "/v1/messages", form);
    $("compose-dialog").close();
    toast("Message sent");
    loadFolders();
  } catch (err) {
    $("compose-error").textContent = err.message;
  } finally {
    $("compose-send").disabled = false;
  }
}

// ---- live updates ---------------------------------------------------------

function connectLive() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const since = state.lastEventId !== null ? `?since=${state.lastEventId}` : "";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/events${since}`);
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: state.token }));
  ws.onmessage = (msg) => {
    const data = JSON.parse(msg.data);
    if (data.type === "ready") {
      state.lastEventId = data.last_event_id;
      state.retry = 1000;
      $("live-status").textContent = "live";
      $("live-status").classList.add("live");
    } else if (data.type === "event") {
      state.lastEventId = data.event.id;
      onEvent(data.event);
    }
  };
  ws.onclose = () => {
    $("live-status").textContent = "offline";
    $("live-status").classList.remove("live");
    if (!state.token) return;
    setTimeout(connectLive, state.retry);
    state.retry = Math.min(state.retry * 2, 30000);
  };
}

let folderRefresh = null;
function onEvent(event) {
  clearTimeout(folderRefresh);
  folderRefresh = setTimeout(loadFolders, 200);  // coalesce bursts of events
  if (event.kind === "new" && event.message && !state.search && event.folder_id === state.folderId) {
    const item = appendMessage(event.message, true);
    item.classList.add("fresh");
  } else if (event.kind === "flags" && event.flags && state.messages.has(event.message_id)) {
    const message = state.messages.get(event.message_id);
    message.unread = !event.flags.includes("\\Seen");
    message.flagged = event.flags.includes("\\Flagged");
    appendMessage(message, false);
  } else if (event.kind === "expunge") {
    document.querySelector(`#message-list li[data-message-id="${CSS.escape(event.message_id)}"]`)?.remove();
    state.messages.delete(event.message_id);
  }
}

// ---- start ----------------------------------------------------------------

async function showMail() {
  $("login-view").hidden = true;
  $("mail-view").hidden = false;
  $("account-name").textContent = state.address || "";
  await loadFolders();
  const inbox = state.folders.find((f) => f.name.toUpperCase() === "INBOX") || state.folders[0];
  if (inbox) await openFolder(inbox.id);
  connectLive();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout-button").addEventListener("click", logout);
  $("search-form").addEventListener("submit", runSearch);
  $("more-button").addEventListener("click", () => loadList(false));
  $("compose-button").addEventListener("click", () => openCompose(null));
  $("compose-cancel").addEventListener("click", () => $("compose-dialog").close());
  $("compose-form").addEventListener("submit", sendCompose);
  $("reply-button").addEventListener("click", () => openCompose(state.current));
  $("unread-button").addEventListener("click", () => updateCurrent({ unread: true }));
  $("flag-button").addEventListener("click", () => updateCurrent({ flagged: !state.current?.flagged }));
  $("delete-button").addEventListener("click", deleteCurrent);
  $("back-button").addEventListener("click", () => document.body.classList.remove("reading"));
  $("remote-images-button").addEventListener("click", () => { if (state.current) showBody(state.current, true); });
  if (state.token) showMail().catch(() => logout()); else logout();
});
