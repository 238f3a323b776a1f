// The console's entry point: the VM list (live through /events, polling if the stream drops),
// the actions, and wiring for the dialogs in deploy.js, details.js and system.js.

import { EventStream, rpc } from "./api.js";
import { openDeploy, setupDeploy } from "./deploy.js";
import { closeDetails, detailsId, refreshDetails, showDetails } from "./details.js";
import { setupSystem } from "./system.js";
import { attempt, confirmAction, copyButton, el, short, showNotice } from "./util.js";

const PAGE_SIZE_KEY = "vmm.pageSize";
const POLL_MS = 3000;
const state = { page: 1, pageSize: Number(localStorage.getItem(PAGE_SIZE_KEY)) || 50, keyword: "", total: 0, vms: [] };
let pollTimer = null;
let refreshTimer = null;

function refinedStatus(vm) {
  if (vm.status === "running" && vm.boot_progress && !["done", "running"].includes(vm.boot_progress)) {
    return { label: "booting", detail: vm.boot_progress, cls: "booting" };
  }
  if (vm.status === "running") return { label: "running", detail: vm.boot_error || "", cls: "running" };
  if (vm.status === "stopping") return { label: "stopping", detail: vm.shutdown_progress, cls: "stopping" };
  return { label: vm.status, detail: vm.status === "exited" ? vm.boot_error : "", cls: vm.status };
}

function idCell(id) {
  return id ? el("span", { class: "id", title: id }, short(id), " ", copyButton(id)) : "—";
}

function actionButton(label, handler, { enabled = true, danger = false } = {}) {
  return el("button", { class: danger ? "danger" : "", disabled: !enabled, "data-action": label.toLowerCase(), onclick: handler }, label);
}

async function lifecycle(method, vm, done) {
  const ok = await attempt(`${method} ${vm.name}`, () => rpc(method, { id: vm.id }));
  if (ok !== undefined && done) showNotice(done);
  scheduleRefresh();
}

function actions(vm) {
  const running = vm.status === "running" || vm.status === "stopping";
  const removing = vm.status === "removing";
  return el("div", { class: "actions" },
    actionButton("Details", () => showDetails(vm.id)),
    actionButton("Start", () => lifecycle("StartVm", vm, `Starting ${vm.name}`), { enabled: !running && !removing }),
    actionButton("Shutdown", () => lifecycle("ShutdownVm", vm, `Shutdown of ${vm.name} requested`), { enabled: vm.status === "running" }),
    actionButton("Stop", async () => {
      if (await confirmAction(`Stop ${vm.name} now? The guest gets no chance to shut down.`)) await lifecycle("StopVm", vm, `Stopped ${vm.name}`);
    }, { enabled: running, danger: true }),
    actionButton("Update", () => withFull(vm, "update"), { enabled: !removing }),
    actionButton("Clone", () => withFull(vm, "clone"), { enabled: !removing }),
    actionButton("Remove", async () => {
      if (await confirmAction(`Remove ${vm.name} and delete its disk? This cannot be undone.`)) await lifecycle("RemoveVm", vm, `Removing ${vm.name}`);
    }, { enabled: !removing, danger: true }));
}

// Update and Clone need the full configuration; the list holds the brief one.
async function withFull(vm, kind) {
  const answer = await attempt("Status", () => rpc("Status", { ids: [vm.id], brief: false }));
  if (answer && answer.vms[0]) await openDeploy({ vm: answer.vms[0], kind });
}

function renderList() {
  const body = document.querySelector("#vms tbody");
  body.replaceChildren(...state.vms.map((vm) => {
    const s = refinedStatus(vm);
    return el("tr", { "data-id": vm.id, class: vm.id === detailsId() ? "selected" : "" },
      el("td", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); showDetails(vm.id); } }, vm.name)),
      el("td", {}, el("span", { class: `status ${s.cls}` }, s.label), s.detail && s.detail !== s.label ? el("small", { class: "detail" }, ` ${s.detail}`) : null),
      el("td", {}, vm.uptime || (vm.exited_at ? `exited ${vm.exited_at} ago` : "")),
      el("td", {}, idCell(vm.id)),
      el("td", {}, idCell(vm.app_id)),
      el("td", {}, idCell(vm.instance_id)),
      el("td", {}, actions(vm)));
  }));
  const pages = Math.max(1, Math.ceil(state.total / state.pageSize));
  document.getElementById("total").textContent = `Total Instances: ${state.total}`;
  document.getElementById("page").textContent = `${state.page} / ${pages}`;
  document.getElementById("prev").disabled = state.page <= 1;
  document.getElementById("next").disabled = state.page >= pages;
  document.getElementById("empty").hidden = state.total > 0 || Boolean(state.keyword);
}

export async function refresh() {
  const answer = await attempt("Status", () => rpc("Status", {
    brief: true, keyword: state.keyword, page: state.page, page_size: state.pageSize,
  }));
  if (!answer) return;
  state.vms = answer.vms;
  state.total = answer.total;
  const pages = Math.max(1, Math.ceil(state.total / state.pageSize));
  if (state.page > pages) { state.page = pages; return refresh(); }
  renderList();
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => { refresh(); refreshDetails(); }, 150);
}

function setLive(mode, reason) {
  const pill = document.getElementById("live");
  pill.textContent = mode === "live" ? "live" : "polling";
  pill.className = `pill ${mode}`;
  pill.title = mode === "live" ? "Updated by the daemon's event stream" : `Event stream unavailable${reason ? `: ${reason}` : ""}; polling every 3 s`;
  clearInterval(pollTimer);
  pollTimer = null;
  if (mode !== "live") pollTimer = setInterval(() => { refresh(); refreshDetails(); }, POLL_MS);
}

function onEvent(kind, data) {
  if (kind === "vm" && data.event === "vmm.shutdown" && data.body) {
    const vm = state.vms.find((v) => v.id === data.vm_id);
    showNotice(`${vm ? vm.name : data.vm_id}: shutdown ${data.body}`);
  }
  if (kind === "vm" && data.event === "vmm.removed" && data.vm_id === detailsId()) closeDetails();
  scheduleRefresh();
}

async function main() {
  setupDeploy();
  const version = await attempt("Version", () => rpc("Version"));
  const text = version ? `v${version.version}${version.rev ? ` (${version.rev.slice(0, 10)})` : ""}` : "";
  document.getElementById("version").textContent = text;
  setupSystem(text);
  document.getElementById("deploy-open").addEventListener("click", () => openDeploy());
  document.getElementById("page-size").value = String(state.pageSize);
  document.getElementById("page-size").addEventListener("change", (e) => {
    state.pageSize = Number(e.target.value);
    localStorage.setItem(PAGE_SIZE_KEY, String(state.pageSize));
    state.page = 1;
    refresh();
  });
  let searchTimer = null;
  document.getElementById("search").addEventListener("input", (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.keyword = e.target.value.trim(); state.page = 1; refresh(); }, 200);
  });
  document.getElementById("prev").addEventListener("click", () => { state.page -= 1; refresh(); });
  document.getElementById("next").addEventListener("click", () => { state.page += 1; refresh(); });
  for (const button of document.querySelectorAll("[data-close]")) {
    button.addEventListener("click", () => document.getElementById(button.dataset.close).close());
  }
  await refresh();
  new EventStream("events", { onEvent, onState: setLive }).start();
}

main();
