// Twin studio panel of the /test page: "Train my twin" (POST /sessions/<id>/train, a job of kind "train"),
// its progress and loss (the job's live events, or /status polling), and the session's twin state
// (GET /sessions/<id>). The mode picker in the generate form (identity_mode) is sent by test.js.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const page = () => window.twinPage;
  const twin = { job: null, timer: null, events: null, session: null };

  function say(text) { $("twin-status").textContent = text; }

  function showProgress(step, total, loss) {
    $("twin-progress-wrap").hidden = false;
    $("twin-progress").value = total ? Math.round(100 * step / total) : 0;
    $("twin-progress-label").textContent = `Training… step ${step} of ${total}` +
      (typeof loss === "number" ? ` · loss ${loss.toFixed(4)}` : "");
  }

  function busy() { return !!twin.job && ["queued", "running"].includes(twin.job.status); }

  function refreshButtons() {
    const sid = page() && page().sessionId();
    $("twin-train-btn").disabled = !sid || busy();
    $("twin-cancel-btn").hidden = !busy();
    if (sid !== twin.session) { twin.session = sid; loadSession(); }
  }

  async function loadSession() {
    const sid = twin.session;
    if (!sid) { say(""); return; }
    try {
      const s = await page().api(`/sessions/${encodeURIComponent(sid)}`);
      const t = (s && s.twin_model) || {};
      $("twin-hint").textContent = `${(s.selfies || {}).count || 0} accepted selfies in this session.`;
      if (t.state === "ready") say(`Your twin is ready (${t.steps} steps on ${t.base_model}; token ${t.token}).`);
      else if (t.state === "training" || t.state === "queued") say(`A training is ${t.state}.`);
      else if (t.state === "unsupported") say("This server cannot keep twin models.");
      else say("No twin trained yet.");
    } catch (e) { say(""); }
  }

  function stopWatching() {
    clearTimeout(twin.timer); twin.timer = null;
    if (twin.events) { twin.events.close(); twin.events = null; }
  }

  function onJob(job) {
    twin.job = job;
    const p = job.progress || {};
    if (busy()) showProgress(p.step || 0, p.total || 0, twin.loss);
    else {
      stopWatching();
      $("twin-progress-wrap").hidden = true;
      if (job.status === "succeeded") loadSession();
      else say(job.status === "canceled" ? "Training stopped; no twin was kept." :
        `Training failed: ${(job.error || {}).message || job.status}`);
    }
    refreshButtons();
  }

  async function poll() {
    try { onJob(await page().api(`/status/${encodeURIComponent(twin.job.id)}`)); } catch (e) { /* retried */ }
    if (busy()) twin.timer = setTimeout(poll, 1000);
  }

  function watch(job) {
    onJob(job);
    if (page().canStream()) {
      twin.events = new EventSource(`/events/${encodeURIComponent(job.id)}`);
      twin.events.addEventListener("progress", (ev) => {
        const d = JSON.parse(ev.data);
        twin.loss = d.loss;
        showProgress(d.step, d.steps || d.total, d.loss);
      });
      twin.events.addEventListener("done", (ev) => onJob(JSON.parse(ev.data)));
      twin.events.onerror = () => { if (twin.events) { twin.events.close(); twin.events = null; } poll(); };
    } else poll();
  }

  async function train() {
    const sid = page().sessionId();
    if (!sid) return;
    const body = { rank: Number($("train_rank").value) };
    const steps = $("train_steps").value.trim();
    if (steps !== "") body.steps = Number(steps);
    try {
      twin.loss = null;
      const job = await page().api(`/sessions/${encodeURIComponent(sid)}/train`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      say("Training queued.");
      watch(job);
    } catch (e) { page().reportError(e); }
  }

  async function cancel() {
    if (!twin.job) return;
    try { onJob(await page().api(`/cancel/${encodeURIComponent(twin.job.id)}`, { method: "POST" })); }
    catch (e) { page().reportError(e); }
  }

  $("twin-train-btn").addEventListener("click", train);
  $("twin-cancel-btn").addEventListener("click", cancel);
  // The session changes when test.js uploads or deletes: follow it.
  setInterval(refreshButtons, 1000);
})();
