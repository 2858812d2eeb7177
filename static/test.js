// Minimal client for the API: upload -> generate -> poll /status -> show outputs.
// The client token comes back as an HttpOnly cookie from /upload, so fetch() sends it automatically.
"use strict";
const $ = (id) => document.getElementById(id);
let sessionId = null;
let jobId = null;

async function api(path, options = {}) {
  const resp = await fetch(path, { credentials: "same-origin", ...options });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = body.error || { code: "http_" + resp.status, message: resp.statusText };
    throw Object.assign(new Error(err.message), { code: err.code, body });
  }
  return body;
}

async function checkHealth() {
  try {
    const h = await api("/health");
    $("health").textContent = `service: ${h.state}` + (h.is_demo ? " (demo model)" : "") + (h.error ? ` — ${h.error}` : "");
    if (h.state === "starting") setTimeout(checkHealth, 2000);
  } catch (e) { $("health").textContent = "service unreachable"; }
}

$("upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const data = new FormData();
  for (const f of $("files").files) data.append("files", f);
  $("upload-result").textContent = "uploading…";
  try {
    const r = await api("/upload", { method: "POST", body: data });
    sessionId = r.session_id;
    $("upload-result").textContent = `accepted ${r.accepted_count} of ${r.total}\n` + JSON.stringify(r.report, null, 2);
  } catch (e) {
    $("upload-result").textContent = `${e.code}: ${e.message}\n` + JSON.stringify(e.body, null, 2);
  }
});

$("generate-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const payload = { prompt: $("prompt").value, num_images: Number($("num_images").value), quality_mode: $("quality_mode").value };
  if (sessionId) payload.session_id = sessionId;
  $("gallery").innerHTML = "";
  try {
    const job = await api("/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
    jobId = job.id;
    $("cancel").disabled = false;
    poll();
  } catch (e) { $("job-status").textContent = `${e.code}: ${e.message}`; }
});

$("cancel").addEventListener("click", async () => {
  if (jobId) { try { await api(`/cancel/${jobId}`, { method: "POST" }); } catch (e) { /* already finished */ } }
});

async function poll() {
  const job = await api(`/status/${jobId}`);
  $("progress").value = job.progress.fraction;
  const where = job.position ? ` (position ${job.position})` : "";
  $("job-status").textContent = `${job.status}${where}` + (job.error ? ` — ${job.error.message}` : "");
  if (["queued", "running"].includes(job.status)) { setTimeout(poll, 500); return; }
  $("cancel").disabled = true;
  for (const out of job.outputs) {
    const img = document.createElement("img");
    img.src = out.url + "?inline=1";
    img.alt = out.filename;
    $("gallery").appendChild(img);
  }
}

checkHealth();
