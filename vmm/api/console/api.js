// Talking to the daemon: JSON /prpc calls, streams (/logs, /events) and the API token.
// Every URL is relative to the page, so the console works behind any tunnel or prefix.

const TOKEN_KEY = "vmm.token";

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders() {
  // X-Requested-With: the daemon then answers a 401 without a Basic challenge, so the
  // browser does not open its own password dialog and the page can ask for a token.
  const token = localStorage.getItem(TOKEN_KEY);
  const headers = { "X-Requested-With": "vmm-console" };
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

// One prompt at a time: every call that got a 401 waits for the same answer.
let tokenPrompt = null;

function askToken(reason) {
  if (!tokenPrompt) {
    tokenPrompt = new Promise((resolve) => {
      const dialog = document.getElementById("token");
      const form = document.getElementById("token-form");
      document.getElementById("token-error").textContent = reason || "";
      form.token.value = "";
      const done = (event) => {
        event.preventDefault();
        const value = form.token.value.trim();
        if (!value) return;
        localStorage.setItem(TOKEN_KEY, value);
        form.removeEventListener("submit", done);
        dialog.close();
        tokenPrompt = null;
        resolve();
      };
      form.addEventListener("submit", done);
      dialog.addEventListener("cancel", (e) => e.preventDefault());
      if (!dialog.open) dialog.showModal();
    });
  }
  return tokenPrompt;
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return new ApiError(body.error || body.message || text, response.status, body.code || "");
  } catch {
    return new ApiError(text || `HTTP ${response.status}`, response.status, "");
  }
}

// fetch with the token; on a 401 ask for one and try again.
export async function authedFetch(url, init = {}) {
  for (;;) {
    const response = await fetch(url, { ...init, headers: { ...(init.headers || {}), ...authHeaders() } });
    if (response.status !== 401) return response;
    const error = await errorOf(response);
    const had = localStorage.getItem(TOKEN_KEY);
    if (had) localStorage.removeItem(TOKEN_KEY);
    await askToken(had ? `That token was refused: ${error.message}` : "");
  }
}

export async function rpc(method, body = {}) {
  const response = await authedFetch(`prpc/${method}?json`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

export async function guest(method, id) {
  const response = await authedFetch(`guest/${method}?json`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ id }),
  });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// Read a streamed text response, calling onText for each decoded piece until it ends or
// `signal` aborts. Resolves when the stream ends; rejects with ApiError on an HTTP error.
export async function streamText(url, onText, { signal, headers = {} } = {}) {
  const response = await authedFetch(url, { signal, headers, cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      onText(decoder.decode(value, { stream: true }));
    }
  } finally {
    reader.releaseLock();
  }
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header).
// Calls onEvent(kind, data, id); resumes from the last id itself after a drop.
export class EventStream {
  constructor(url, { onEvent, onState }) {
    this.url = url;
    this.onEvent = onEvent;
    this.onState = onState;
    this.lastId = null;
    this.controller = null;
    this.stopped = false;
  }

  start() {
    this.stopped = false;
    this.run();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async run() {
    while (!this.stopped) {
      this.controller = new AbortController();
      let buffer = "";
      const headers = this.lastId ? { "Last-Event-ID": this.lastId } : {};
      try {
        await streamText(this.url, (text) => {
          if (buffer === "" && text) this.onState("live");
          buffer += text;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            this.dispatch(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
          }
        }, { signal: this.controller.signal, headers });
      } catch (error) {
        if (this.stopped) return;
        this.onState("polling", error.message);
      }
      if (this.stopped) return;
      this.onState("polling");
      await new Promise((r) => setTimeout(r, 3000));
    }
  }

  dispatch(block) {
    let kind = "message";
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") kind = value;
      else if (field === "id") id = value;
      else if (field === "data") data.push(value);
    }
    if (id !== null) this.lastId = id;
    if (data.length) this.onEvent(kind, JSON.parse(data.join("\n")), id);
  }
}
