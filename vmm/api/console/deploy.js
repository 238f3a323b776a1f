// The deploy dialog (CreateVm), also used to update (UpdateVm) and clone a VM.

import { rpc } from "./api.js";
import { encryptEnv, hasWebCrypto, parseEnv, sha256Hex } from "./crypto.js";
import { attempt, el, readFile, showError, showNotice } from "./util.js";

const form = () => document.getElementById("deploy-form");
let mode = { kind: "create", vm: null };
let previewSeq = 0;

// The app-compose.json the dialog describes (key order matters: it is hashed as written).
export function buildCompose(f) {
  const keyProvider = f.key_provider.value;
  const env = f.env.value.trim() ? parseEnv(f.env.value) : [];
  const compose = {
    manifest_version: 2,
    name: f.name.value.trim(),
    runner: "docker-compose",
    docker_compose_file: f.docker_compose.value,
    gateway_enabled: f.gateway_enabled.checked,
    public_logs: f.public_logs.checked,
    public_sysinfo: f.public_sysinfo.checked,
    public_tcbinfo: f.public_tcbinfo.checked,
    key_provider_id: f.key_provider_id.value.trim().replace(/^0x/, ""),
    allowed_envs: env.map((e) => e.key),
    no_instance_id: !f.gateway_enabled.checked,
    secure_time: false,
  };
  if (keyProvider !== "none") {
    compose.key_provider = keyProvider;
    compose.kms_enabled = keyProvider === "kms";
    compose.local_key_provider_enabled = keyProvider === "local";
  }
  if (f.pre_launch_script.value.trim()) compose.pre_launch_script = f.pre_launch_script.value;
  const swapMb = Number(f.swap.value || 0);
  if (swapMb > 0) compose.swap_size = swapMb * 1024 * 1024;
  return compose;
}

function appIdFor(f, hash) {
  if (mode.kind === "update") return mode.vm.app_id;
  const given = f.app_id.value.trim().replace(/^0x/, "").toLowerCase();
  return given || hash.slice(0, 40);
}

async function composeHash(text) {
  if (hasWebCrypto()) return sha256Hex(text);
  const answer = await rpc("GetComposeHash", { name: form().name.value.trim() || "x", compose_file: text });
  return answer.hash;
}

export async function updatePreview() {
  const f = form();
  const seq = ++previewSeq;
  let text;
  try {
    text = JSON.stringify(buildCompose(f));
  } catch (error) {
    document.getElementById("preview-hash").textContent = error.message;
    return;
  }
  const hash = await composeHash(text);
  if (seq !== previewSeq) return; // a newer edit already asked
  document.getElementById("preview-hash").textContent = hash;
  document.getElementById("preview-app-id").textContent = appIdFor(f, hash);
}

function portRow(port = {}) {
  const row = el("div", { class: "port" },
    el("select", { name: "port_protocol", "aria-label": "Protocol" },
      el("option", { selected: port.protocol !== "udp" }, "tcp"), el("option", { selected: port.protocol === "udp" }, "udp")),
    el("input", { name: "port_address", placeholder: "host address", value: port.host_address || "", "aria-label": "Host address" }),
    el("input", { name: "port_host", type: "number", min: 1, max: 65535, placeholder: "host port", value: port.host_port || "", "aria-label": "Host port" }),
    el("input", { name: "port_vm", type: "number", min: 1, max: 65535, placeholder: "VM port", value: port.vm_port || "", "aria-label": "VM port" }));
  row.append(el("button", { type: "button", onclick: () => row.remove(), "aria-label": "Remove port" }, "×"));
  document.getElementById("ports").append(row);
}

function ports() {
  return [...document.querySelectorAll("#ports .port")].map((row) => ({
    protocol: row.querySelector("[name=port_protocol]").value,
    host_address: row.querySelector("[name=port_address]").value.trim(),
    host_port: Number(row.querySelector("[name=port_host]").value),
    vm_port: Number(row.querySelector("[name=port_vm]").value),
  })).filter((p) => p.host_port || p.vm_port);
}

async function loadChoices(selected) {
  const f = form();
  const images = (await attempt("ListImages", () => rpc("ListImages"))) || { images: [] };
  f.image.replaceChildren(...images.images.map((img) =>
    el("option", { value: img.name, selected: img.name === selected }, `${img.name}${img.version ? ` (${img.version})` : ""}`)));
  const box = document.getElementById("gpus");
  try {
    const gpus = await rpc("ListGpus");
    const items = gpus.gpus.map((g) => el("label", { class: "check" },
      el("input", { type: "checkbox", name: "gpu", value: g.slot, disabled: !g.is_free }),
      ` ${g.slot} ${g.description || g.product_id}${g.is_free ? "" : " (in use)"}`));
    if (gpus.allow_attach_all && gpus.gpus.length) {
      items.unshift(el("label", { class: "check" }, el("input", { type: "checkbox", name: "gpu_all" }), " Attach all"));
    }
    box.replaceChildren(...(items.length ? items : [el("span", { class: "hint" }, "No GPUs on this host")]));
  } catch (error) {
    box.replaceChildren(el("span", { class: "hint" }, `GPUs: ${error.message}`));
  }
}

function gpuConfig() {
  const f = form();
  if (f.querySelector("[name=gpu_all]")?.checked) return { attach_mode: "all", gpus: [] };
  const slots = [...f.querySelectorAll("[name=gpu]:checked")].map((c) => ({ slot: c.value }));
  return slots.length ? { attach_mode: "listed", gpus: slots } : null;
}

function list(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean);
}

function fillFromVm(vm, { clone }) {
  const f = form();
  const c = vm.configuration || {};
  let compose = {};
  try { compose = JSON.parse(c.compose_file || "{}"); } catch { compose = {}; }
  f.name.value = clone ? `${c.name || vm.name}-clone` : (c.name || vm.name);
  f.vcpu.value = c.vcpu || 1;
  if (c.memory % 1024 === 0) { f.memory.value = c.memory / 1024; f.memory_unit.value = "1024"; }
  else { f.memory.value = c.memory; f.memory_unit.value = "1"; }
  f.disk_size.value = c.disk_size || 1;
  f.swap.value = compose.swap_size ? Math.round(compose.swap_size / 1048576) : 0;
  f.docker_compose.value = compose.docker_compose_file || "";
  f.pre_launch_script.value = compose.pre_launch_script || "";
  f.key_provider.value = compose.key_provider || (compose.kms_enabled ? "kms" : compose.local_key_provider_enabled ? "local" : "none");
  f.key_provider_id.value = compose.key_provider_id || "";
  f.gateway_enabled.checked = Boolean(compose.gateway_enabled ?? compose.tproxy_enabled);
  f.public_logs.checked = Boolean(compose.public_logs);
  f.public_sysinfo.checked = Boolean(compose.public_sysinfo);
  f.public_tcbinfo.checked = Boolean(compose.public_tcbinfo);
  f.kms_urls.value = (c.kms_urls || []).join(", ");
  f.gateway_urls.value = (c.gateway_urls || []).join(", ");
  const net = (c.networks || [])[0];
  f.net_mode.value = net ? net.mode : "";
  f.bridge_name.value = net ? net.bridge_name || "" : "";
  f.app_id.value = clone ? "" : vm.app_id || "";
  f.hugepages.checked = Boolean(c.hugepages);
  f.pin_numa.checked = Boolean(c.pin_numa);
  f.user_config.value = c.user_config || "";
  for (const p of c.ports || []) portRow(p);
  return { image: c.image, gpus: c.gpus };
}

export async function openDeploy({ vm = null, kind = "create" } = {}) {
  const f = form();
  f.reset();
  document.getElementById("ports").replaceChildren();
  mode = { kind, vm };
  const updating = kind === "update";
  const stopped = updating && vm.status !== "running" && vm.status !== "stopping";
  document.getElementById("deploy-title").textContent =
    updating ? `Update ${vm.name}` : kind === "clone" ? `Clone ${vm.name}` : "Deploy a VM";
  document.getElementById("deploy-submit").textContent = updating ? "Update" : "Deploy";
  let image = null;
  let gpus = null;
  if (vm) ({ image, gpus } = fillFromVm(vm, { clone: kind === "clone" }));
  // Resources and image change only while the VM is stopped; its name and app id never.
  for (const name of ["vcpu", "memory", "memory_unit", "disk_size", "image"]) f[name].disabled = updating && !stopped;
  for (const name of ["name", "app_id", "stopped", "net_mode", "bridge_name", "hugepages", "pin_numa"]) f[name].disabled = updating;
  f.keep_env.closest("label").hidden = !updating;
  document.getElementById("deploy").showModal();
  await loadChoices(image);
  if (gpus) {
    for (const spec of gpus.gpus || []) {
      const box = f.querySelector(`[name=gpu][value="${CSS.escape(spec.slot)}"]`);
      if (box) box.checked = true;
    }
    const all = f.querySelector("[name=gpu_all]");
    if (all) all.checked = gpus.attach_mode === "all";
  }
  await updatePreview();
}

async function encryptedEnvFor(f, appId) {
  if (!f.env.value.trim()) return "";
  const env = parseEnv(f.env.value);
  const key = await rpc("GetAppEnvEncryptPubKey", { app_id: appId });
  return encryptEnv(env, key.public_key);
}

async function submit(event) {
  event.preventDefault();
  const f = form();
  const button = document.getElementById("deploy-submit");
  button.disabled = true;
  try {
    const composeText = JSON.stringify(buildCompose(f));
    const hash = await composeHash(composeText);
    const appId = appIdFor(f, hash);
    const encrypted = await encryptedEnvFor(f, appId);
    const memory = Number(f.memory.value) * Number(f.memory_unit.value);
    const networks = f.net_mode.value ? [{ mode: f.net_mode.value, bridge_name: f.bridge_name.value.trim() }] : [];
    if (mode.kind === "update") {
      const request = {
        id: mode.vm.id, compose_file: composeText, user_config: f.user_config.value,
        update_ports: true, ports: ports(),
        update_kms_urls: true, kms_urls: list(f.kms_urls.value),
        update_gateway_urls: true, gateway_urls: list(f.gateway_urls.value),
        gpus: gpuConfig(),
      };
      if (encrypted || !f.keep_env.checked) request.encrypted_env = encrypted;
      if (!f.vcpu.disabled) {
        const c = mode.vm.configuration;
        if (Number(f.vcpu.value) !== c.vcpu) request.vcpu = Number(f.vcpu.value);
        if (memory !== c.memory) request.memory = memory;
        if (Number(f.disk_size.value) !== c.disk_size) request.disk_size = Number(f.disk_size.value);
        if (f.image.value !== c.image) request.image = f.image.value;
      }
      await rpc("UpdateVm", request);
      showNotice(`Updated ${mode.vm.name}; the changes apply at its next start`);
    } else {
      const request = {
        name: f.name.value.trim(), image: f.image.value, compose_file: composeText,
        vcpu: Number(f.vcpu.value), memory, disk_size: Number(f.disk_size.value),
        ports: ports(), encrypted_env: encrypted, user_config: f.user_config.value,
        hugepages: f.hugepages.checked, pin_numa: f.pin_numa.checked, gpus: gpuConfig(),
        kms_urls: list(f.kms_urls.value), gateway_urls: list(f.gateway_urls.value),
        stopped: f.stopped.checked, networks,
      };
      if (f.app_id.value.trim()) request.app_id = appId;
      const created = await rpc("CreateVm", request);
      showNotice(`Created ${request.name} (${created.id})`);
    }
    document.getElementById("deploy").close();
  } catch (error) {
    showError(error, mode.kind === "update" ? "UpdateVm" : "CreateVm");
  } finally {
    button.disabled = false;
  }
}

export function setupDeploy() {
  const f = form();
  f.addEventListener("submit", submit);
  f.addEventListener("input", () => updatePreview().catch((e) => showError(e, "compose hash")));
  f.addEventListener("change", () => updatePreview().catch((e) => showError(e, "compose hash")));
  document.getElementById("deploy-cancel").addEventListener("click", () => document.getElementById("deploy").close());
  document.getElementById("add-port").addEventListener("click", () => portRow());
  f.compose_upload.addEventListener("change", async () => {
    const text = await readFile(f.compose_upload);
    if (text !== null) { f.docker_compose.value = text; await updatePreview(); }
  });
  f.env_upload.addEventListener("change", async () => {
    const text = await readFile(f.env_upload);
    if (text !== null) { f.env.value = text; await updatePreview(); }
  });
}
