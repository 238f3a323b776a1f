// One VM's details: configuration, ports, NICs, guest info, compose, user config, events, logs.

import { guest, rpc, streamText } from "./api.js";
import { attempt, copyButton, copyText, download, el } from "./util.js";

const MAX_LOG_CHARS = 400_000;
let current = null; // { id, logAbort, channel }
let meta = null; // GetMeta, asked once: the host's TEE and default networking

async function hostMeta() {
  if (!meta) meta = await rpc("GetMeta").catch(() => ({}));
  return meta;
}

function row(label, value) {
  return el("tr", {}, el("th", { text: label }), el("td", {}, value ?? ""));
}

function table(headers, rows) {
  return el("table", { class: "small" },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c ?? ""))))));
}

function features(compose) {
  const on = (flag) => (flag ? "on" : "off");
  return [
    `key provider: ${compose.key_provider || (compose.kms_enabled ? "kms" : compose.local_key_provider_enabled ? "local" : "none")}`,
    `gateway: ${on(compose.gateway_enabled ?? compose.tproxy_enabled)}`,
    `public logs: ${on(compose.public_logs)}`,
    `public sysinfo: ${on(compose.public_sysinfo)}`,
    `public tcbinfo: ${on(compose.public_tcbinfo)}`,
  ].join(" · ");
}

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function guestSection(vm) {
  const box = el("div", { class: "guest" }, el("span", { class: "hint" }, "asking the guest agent…"));
  Promise.all([guest("NetworkInfo", vm.id), guest("SysInfo", vm.id)]).then(([net, sys]) => {
    const ifaces = (net.interfaces || []).map((i) => [i.name,
      (i.addresses || []).map((a) => `${a.address}/${a.prefix}`).join(", "),
      `${bytes(i.rx_bytes)} / ${bytes(i.tx_bytes)}`]);
    box.replaceChildren(
      el("h4", {}, "Guest network"),
      table(["Interface", "Addresses", "RX / TX"], ifaces),
      el("p", { class: "hint" }, `DNS: ${(net.dns_servers || []).join(", ") || "—"} · gateways: ${(net.gateways || []).map((g) => g.address).join(", ") || "—"}`),
      el("h4", {}, "Guest system"),
      el("table", { class: "kv" }, el("tbody", {},
        row("OS", `${sys.os_name} ${sys.os_version}`), row("Kernel", sys.kernel_version),
        row("CPU", `${sys.num_cpus} × ${sys.cpu_model}`),
        row("Memory", `${bytes(sys.used_memory)} used of ${bytes(sys.total_memory)}`),
        row("Load", `${sys.loadavg_one / 100} ${sys.loadavg_five / 100} ${sys.loadavg_fifteen / 100}`),
        row("Uptime", `${sys.uptime}s`),
        row("Disks", (sys.disks || []).map((d) => `${d.mount_point} ${bytes(d.total_size)}`).join(", ")))));
  }).catch((error) => box.replaceChildren(el("span", { class: "hint" }, `Guest agent: ${error.message}`)));
  return box;
}

function logsSection(vm) {
  const pre = el("pre", { class: "log", id: "log-output", tabindex: 0 });
  const tabs = el("div", { class: "tabs", role: "tablist" },
    ["serial", "stdout", "stderr"].map((ch) => el("button", {
      role: "tab", "data-channel": ch, class: ch === "serial" ? "active" : "",
      onclick: (e) => {
        tabs.querySelectorAll("button").forEach((b) => b.classList.toggle("active", b === e.target));
        followLog(vm.id, ch, pre);
      },
    }, ch)));
  followLog(vm.id, "serial", pre);
  return el("div", {}, el("h3", {}, "Logs"), tabs, pre);
}

function followLog(id, channel, pre) {
  if (current && current.logAbort) current.logAbort.abort();
  const abort = new AbortController();
  if (current) current.logAbort = abort;
  pre.textContent = "";
  pre.dataset.channel = channel;
  const url = `logs?id=${encodeURIComponent(id)}&ch=${channel}&follow=true&lines=500`;
  streamText(url, (text) => {
    const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
    let next = pre.textContent + text.replaceAll("[vmm heartbeat]\n", "");
    if (next.length > MAX_LOG_CHARS) next = next.slice(-MAX_LOG_CHARS);
    pre.textContent = next;
    if (stick) pre.scrollTop = pre.scrollHeight;
  }, { signal: abort.signal }).catch((error) => {
    if (!abort.signal.aborted) pre.append(`\n[console] log stream ended: ${error.message}\n`);
  });
}

export function closeDetails() {
  if (current && current.logAbort) current.logAbort.abort();
  current = null;
  document.getElementById("details").hidden = true;
  document.querySelectorAll("#vms tr.selected").forEach((r) => r.classList.remove("selected"));
}

export function detailsId() {
  return current ? current.id : null;
}

// Refresh the parts that change (status, events) without restarting the log stream.
export async function refreshDetails() {
  if (!current) return;
  const answer = await rpc("Status", { ids: [current.id], brief: false }).catch(() => null);
  const vm = answer && answer.vms[0];
  const box = document.getElementById("details");
  if (!vm) {
    box.querySelector(".status-line")?.replaceChildren("removed");
    return;
  }
  box.querySelector(".status-line")?.replaceChildren(statusText(vm));
  box.querySelector(".events")?.replaceWith(eventsTable(vm));
}

function statusText(vm) {
  const parts = [vm.status];
  if (vm.boot_progress && vm.status === "running") parts.push(`boot: ${vm.boot_progress}`);
  if (vm.boot_error) parts.push(`boot error: ${vm.boot_error}`);
  if (vm.shutdown_progress) parts.push(`shutdown: ${vm.shutdown_progress}`);
  if (vm.uptime) parts.push(`up ${vm.uptime}`);
  if (vm.exited_at) parts.push(`exited ${vm.exited_at} ago`);
  return parts.join(" · ");
}

function eventsTable(vm) {
  const events = [...(vm.events || [])].reverse();
  const t = table(["Time", "Event", "Detail"], events.map((e) =>
    [new Date(e.timestamp).toLocaleTimeString(), e.event, e.body]));
  t.classList.add("events");
  return t;
}

export async function showDetails(id) {
  if (current && current.logAbort) current.logAbort.abort();
  current = { id, logAbort: null };
  const answer = await attempt("Status", () => rpc("Status", { ids: [id], brief: false }));
  const vm = answer && answer.vms[0];
  const box = document.getElementById("details");
  if (!vm) { closeDetails(); return; }
  const c = vm.configuration || {};
  const host = await hostMeta();
  const tee = (host.host && host.host.tee_platform) || "none";
  const defaultNet = (host.networking && host.networking.default_mode) || "";
  let compose = {};
  try { compose = JSON.parse(c.compose_file || "{}"); } catch { compose = {}; }
  const gpus = c.gpus ? (c.gpus.attach_mode === "all" ? "all" : (c.gpus.gpus || []).map((g) => g.slot).join(", ")) : "";
  const nics = (vm.interfaces && vm.interfaces.length)
    ? vm.interfaces.map((n) => [n.mode, n.backend, n.mac, n.bridge_name || "", n.ip || ""])
    : (c.networks || []).map((n) => [n.mode, "", "", n.bridge_name || "", ""]);
  box.replaceChildren(
    el("div", { class: "details-head" },
      el("h2", {}, vm.name),
      el("span", { class: "status-line" }, statusText(vm)),
      el("span", { class: "spacer" }),
      el("button", { class: "close", "aria-label": "Close details", onclick: closeDetails }, "×")),
    el("div", { class: "columns" },
      el("table", { class: "kv" }, el("tbody", {},
        row("VM ID", el("span", {}, vm.id, " ", copyButton(vm.id))),
        row("App ID", el("span", {}, vm.app_id, " ", copyButton(vm.app_id))),
        row("Instance ID", vm.instance_id ? el("span", {}, vm.instance_id, " ", copyButton(vm.instance_id)) : "—"),
        row("vCPUs", c.vcpu), row("Memory", `${c.memory} MB`), row("Disk", `${c.disk_size} GB`),
        row("Image", `${c.image}${vm.image_version ? ` (${vm.image_version})` : ""}`),
        row("TEE", c.no_tee ? "off (no_tee)" : tee === "none" ? "none (this host has no TEE)" : tee),
        row("GPUs", gpus || "none"),
        row("Features", features(compose)),
        row("App URL", vm.app_url ? el("a", { href: vm.app_url, target: "_blank", rel: "noopener" }, vm.app_url) : "—"),
        row("Guest channel", vm.guest_channel))),
      el("div", {},
        el("h3", {}, "Port mappings"),
        (c.ports || []).length ? table(["Protocol", "Host", "VM port"], c.ports.map((p) =>
          [p.protocol, `${p.host_address || "*"}:${p.host_port}`, p.vm_port])) : el("p", { class: "hint" }, "none"),
        el("h3", {}, "Network interfaces"),
        nics.length ? table(["Mode", "Backend", "MAC", "Bridge", "Leased IP"], nics)
          : el("p", { class: "hint" }, `one NIC, the host's default${defaultNet ? ` (${defaultNet})` : ""}`),
        vm.status === "running" ? await guestSection(vm) : null)),
    el("h3", {}, "App compose ",
      el("button", { onclick: () => copyText(c.compose_file || "") }, "copy"), " ",
      el("button", { onclick: () => download(`${vm.name}-app-compose.json`, c.compose_file || "") }, "download")),
    el("pre", { class: "compose" }, prettyJson(c.compose_file)),
    el("h3", {}, "User config ",
      el("button", { onclick: () => download(`${vm.name}-user-config`, c.user_config || "", "text/plain") }, "download")),
    el("pre", { class: "compose" }, c.user_config || "(empty)"),
    el("h3", {}, "Events"),
    eventsTable(vm),
    logsSection(vm));
  box.hidden = false;
}

function prettyJson(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return text || ""; }
}

