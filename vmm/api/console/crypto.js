// Hashes and the env encryption, with the browser's WebCrypto (no third-party code).
//
// Env encryption as dstack's clients do it: a fresh X25519 key pair, the raw shared secret
// with the KMS key as the AES-256-GCM key, a random 12-byte IV, no AAD; the result is
// ephemeral_public(32) || iv(12) || ciphertext+tag, sent as hex in `encrypted_env`.
// WebCrypto only exists in a secure context: http://localhost or 127.0.0.1 (an SSH tunnel
// or forwarded port) or https.

export function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

export function unhex(text) {
  const clean = text.replace(/^0x/, "");
  if (clean.length % 2 || /[^0-9a-fA-F]/.test(clean)) throw new Error(`not hex: ${text}`);
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function hasWebCrypto() {
  return Boolean(globalThis.crypto && crypto.subtle);
}

export async function sha256Hex(text) {
  return hex(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
}

export function parseEnv(text) {
  const env = [];
  text.split(/\r?\n/).forEach((raw, index) => {
    const line = raw.trim();
    if (!line || line.startsWith("#")) return;
    const body = line.startsWith("export ") ? line.slice(7).trim() : line;
    const eq = body.indexOf("=");
    if (eq <= 0) throw new Error(`env line ${index + 1}: expected KEY=VALUE, got ${JSON.stringify(raw)}`);
    const key = body.slice(0, eq).trim();
    let value = body.slice(eq + 1).trim();
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new Error(`env line ${index + 1}: bad key ${JSON.stringify(key)}`);
    if (value.length >= 2 && (value[0] === '"' || value[0] === "'") && value.at(-1) === value[0]) {
      value = value.slice(1, -1);
    }
    env.push({ key, value });
  });
  return env;
}

export async function encryptEnv(env, publicKeyHex) {
  if (!hasWebCrypto()) {
    throw new Error("encrypting the environment needs WebCrypto: open the console over https or http://localhost");
  }
  const plaintext = new TextEncoder().encode(JSON.stringify({ env }));
  const ours = await crypto.subtle.generateKey({ name: "X25519" }, true, ["deriveBits"]);
  const theirs = await crypto.subtle.importKey("raw", unhex(publicKeyHex), { name: "X25519" }, false, []);
  const shared = await crypto.subtle.deriveBits({ name: "X25519", public: theirs }, ours.privateKey, 256);
  const key = await crypto.subtle.importKey("raw", shared, { name: "AES-GCM" }, false, ["encrypt"]);
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const sealed = await crypto.subtle.encrypt({ name: "AES-GCM", iv }, key, plaintext);
  const ephemeral = await crypto.subtle.exportKey("raw", ours.publicKey);
  return hex(ephemeral) + hex(iv) + hex(sealed);
}
