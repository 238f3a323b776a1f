// The System dialog: host capacity, Reload VMs, images, supervisor processes, version.

import { rpc } from "./api.js";
import { attempt, confirmAction, el, showError } from "./util.js";

export function reloadMessage(r) {
  const { loaded = 0, updated = 0, removed = 0 } = r || {};
  if (!loaded && !updated && !removed) return "VM reload completed: no changes detected";
  return `VM reload completed: ${loaded} loaded, ${updated} updated, ${removed} removed`;
}

async function capacity() {
  const meta = await attempt("GetMeta", () => rpc("GetMeta"));
  const box = document.getElementById("capacity");
  if (!meta) return;
  const r = meta.resources || {};
  const h = meta.host || {};
  box.replaceChildren(el("table", { class: "kv" }, el("tbody", {},
    el("tr", {}, el("th", {}, "vCPUs"), el("td", {}, `${r.used_vcpu} used, ${r.free_vcpu} free of ${r.max_allocable_vcpu}`)),
    el("tr", {}, el("th", {}, "Memory"), el("td", {}, `${r.used_memory_in_mb} MB used, ${r.free_memory_in_mb} MB free of ${r.max_allocable_memory_in_mb} MB`)),
    el("tr", {}, el("th", {}, "VM slots"), el("td", {}, `${r.used_cvm_number} used, ${r.free_cvm_number} free of ${r.max_cvm_number}`)),
    el("tr", {}, el("th", {}, "Host"), el("td", {}, `${h.backend || "qemu"} ${h.backend_version || ""} · accel ${h.accelerator} · TEE ${h.tee_platform} · channel ${h.guest_channel} · QEMU ${h.qemu_version}`)),
    el("tr", {}, el("th", {}, "KMS"), el("td", {}, [meta.kms && meta.kms.url, ...((meta.kms && meta.kms.urls) || [])].filter((u, i, all) => u && all.indexOf(u) === i).join(", ") || "—")))));
}

async function images() {
  const answer = await attempt("ListImages", () => rpc("ListImages"));
  if (!answer) return;
  document.querySelector("#images tbody").replaceChildren(...answer.images.map((img) => el("tr", {},
    el("td", {}, img.name), el("td", {}, img.version), el("td", {}, img.is_dev ? "yes" : ""),
    el("td", {}, el("button", { class: "danger", onclick: async () => {
      if (!(await confirmAction(`Delete image ${img.name}?`))) return;
      await attempt("DeleteImage", () => rpc("DeleteImage", { id: img.name }));
      await images();
    } }, "Delete")))));
}

async function processes() {
  const body = document.querySelector("#processes tbody");
  let answer;
  try {
    answer = await rpc("SvList");
  } catch (error) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "hint" }, error.message)));
    return [];
  }
  body.replaceChildren(...answer.processes.map((p) => el("tr", {},
    el("td", {}, p.id), el("td", {}, p.name), el("td", {}, p.status), el("td", {}, p.pid ?? ""),
    el("td", {},
      el("button", { onclick: async () => { await attempt("SvStop", () => rpc("SvStop", { id: p.id })); await processes(); } }, "Stop"),
      " ",
      el("button", { class: "danger", onclick: async () => {
        if (!(await confirmAction(`Remove supervisor process ${p.id}?`))) return;
        await attempt("SvRemove", () => rpc("SvRemove", { id: p.id }));
        await processes();
      } }, "Remove")))));
  return answer.processes;
}

export async function openSystem() {
  document.getElementById("reload-result").textContent = "";
  document.getElementById("system").showModal();
  await Promise.all([capacity(), images(), processes()]);
}

export function setupSystem(version) {
  document.getElementById("system-version").textContent = version;
  document.getElementById("system-open").addEventListener("click", openSystem);
  document.getElementById("reload").addEventListener("click", async () => {
    const result = await attempt("ReloadVms", () => rpc("ReloadVms"));
    if (result !== undefined) document.getElementById("reload-result").textContent = reloadMessage(result);
  });
  document.getElementById("sv-clear").addEventListener("click", async () => {
    const list = await processes();
    for (const p of list.filter((p) => p.status !== "running")) {
      try { await rpc("SvRemove", { id: p.id }); } catch (error) { showError(error, `SvRemove ${p.id}`); }
    }
    await processes();
  });
}
