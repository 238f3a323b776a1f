// Small DOM helpers shared by the console's modules.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function showError(error, context = "") {
  const box = document.getElementById("errors");
  const message = error instanceof Error ? error.message : String(error);
  const item = el("div", { class: "error-item" },
    el("span", { text: context ? `${context}: ${message}` : message }),
    el("button", { class: "close", "aria-label": "Dismiss", onclick: () => item.remove() }, "×"));
  box.append(item);
  while (box.children.length > 5) box.firstChild.remove();
}

export function showNotice(message) {
  const box = document.getElementById("errors");
  const item = el("div", { class: "notice-item" }, el("span", { text: message }),
    el("button", { class: "close", "aria-label": "Dismiss", onclick: () => item.remove() }, "×"));
  box.append(item);
  const notices = box.querySelectorAll(".notice-item");
  if (notices.length > 3) notices[0].remove();
  setTimeout(() => item.remove(), 8000);
}

// Run an async action; show the daemon's message if it fails. Returns its result or undefined.
export async function attempt(context, action) {
  try {
    return await action();
  } catch (error) {
    showError(error, context);
    return undefined;
  }
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Clipboard API needs a secure context; fall back to a selection copy.
    const area = el("textarea", {}, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  showNotice("Copied");
}

export function copyButton(text, label = "copy") {
  return el("button", { class: "copy", title: `Copy ${text}`, onclick: () => copyText(text) }, label);
}

export function download(name, text, type = "application/json") {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function short(id, n = 8) {
  return id ? (id.length > n ? `${id.slice(0, n)}…` : id) : "";
}

export function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

export function readFile(input) {
  const file = input.files && input.files[0];
  return file ? file.text() : Promise.resolve(null);
}
