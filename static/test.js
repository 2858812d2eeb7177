// Digital Twin page: upload selfies -> per-photo report -> generate -> live progress -> gallery.
// Plain browser JavaScript, no dependencies. The client token comes back from /upload as an HttpOnly
// cookie, so same-origin requests carry it without this script ever seeing it. A server with API keys
// needs `Authorization: Bearer`: the key typed into the page is sent on every request, and images are
// fetched with it (an <img> or a download link cannot send the header) and shown from blob URLs.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // Built-in choices, used when the service does not publish its own (see loadOptions).
  const FALLBACK = {
    limits: { max_selfies: 50, max_file_mb: 20, max_upload_mb: 200, max_images: 4, min_side: 64, max_side: 1536 },
    quality_modes: ["fast", "balanced", "high_fidelity"],
    aspect_ratios: ["1:1", "4:5", "3:4", "2:3", "9:16", "5:4", "4:3", "3:2", "16:9"],
    styles: ["photoreal", "cinematic", "studio", "editorial", "none"],
    default_style: "photoreal",
    // utils/prompts.py's value sets; /system-status publishes them as options.attribute_choices.
    attribute_choices: {
      gender: ["female", "male", "non_binary"],
      age_group: ["young_adult", "adult", "middle_aged", "senior"],
      skin_tone: ["fair", "light", "medium", "olive", "tan", "brown", "dark"],
      expression: ["neutral", "smiling", "laughing", "serious", "confident", "thoughtful", "surprised", "calm"],
    },
  };
  const QUALITY_LABELS = { fast: "Fast", balanced: "Balanced", high_fidelity: "High fidelity" };
  const ASPECT_LABELS = { "1:1": "1:1 square", "4:5": "4:5 portrait", "3:4": "3:4 portrait", "2:3": "2:3 portrait",
    "9:16": "9:16 tall", "5:4": "5:4 landscape", "4:3": "4:3 landscape", "3:2": "3:2 landscape", "16:9": "16:9 wide" };
  const CUSTOM = "custom";
  const POLL_MS = { queued: 500, running: 300 };
  const BACKOFF_MAX_MS = 15000;

  const state = {
    limits: { ...FALLBACK.limits },
    selection: [],        // [{file, li, status}]
    locked: false,        // true once the selection has been uploaded (its report is on the thumbnails)
    uploading: false,
    sessionId: null,
    job: null,            // the job being watched
    pollTimer: null,
    failures: 0,          // consecutive polling failures
    healthTimer: null,
    ready: false,
    apiKey: "",           // in memory only when storage is off
  };

  // ---------------------------------------------------------------------------------------------
  // Errors: one persistent area with the API's code and message.
  const TITLES = {
    400: "Please check your request", 401: "An API key is needed", 404: "Not found", 409: "Conflict",
    413: "Upload too large", 415: "Unsupported request", 422: "No usable selfies", 429: "Too many requests",
    500: "Server error", 503: "The service is not ready", 507: "The server is out of disk space",
  };

  function showError({ status = 0, code = "error", message = "", retryAfter = null, title = null }) {
    $("error-title").textContent = title || TITLES[status] || (status ? `Request failed (HTTP ${status})` : "Connection problem");
    $("error-message").textContent = message;
    $("error-code").textContent = code + (status ? ` · HTTP ${status}` : "");
    $("error-extra").textContent = retryAfter ? ` · try again in ${retryAfter} s` : "";
    $("error-area").hidden = false;
  }
  function clearError() {
    $("error-area").hidden = true;
    for (const el of document.querySelectorAll("[aria-invalid='true']")) {
      el.removeAttribute("aria-invalid");
      const ids = (el.getAttribute("aria-describedby") || "").split(" ").filter((x) => x && x !== `${el.id}-error`);
      if (ids.length) el.setAttribute("aria-describedby", ids.join(" ")); else el.removeAttribute("aria-describedby");
    }
    for (const el of document.querySelectorAll(".field-error")) el.remove();
  }
  $("error-dismiss").addEventListener("click", clearError);

  class ApiError extends Error {
    constructor(status, body, headers) {
      const err = (body && body.error) || {};
      super(err.message || `the server answered HTTP ${status}`);
      this.status = status;
      this.code = err.code || `http_${status}`;
      this.details = err.details || null;
      const ra = headers && headers.get ? headers.get("Retry-After") : null;
      this.retryAfter = ra ? Number(ra) || ra : null;
    }
  }
  class NetworkError extends Error {
    constructor(message) { super(message); this.code = "network_error"; this.status = 0; }
  }

  // ---------------------------------------------------------------------------------------------
  // API key: kept for this tab (sessionStorage), or in this browser when the user asks (localStorage).
  const KEY_STORE = "twin-api-key";
  function apiKey() {
    try { return sessionStorage.getItem(KEY_STORE) || localStorage.getItem(KEY_STORE) || ""; } catch (e) { return state.apiKey || ""; }
  }
  function setApiKey(key, remember) {
    state.apiKey = key;
    try {
      sessionStorage.removeItem(KEY_STORE);
      localStorage.removeItem(KEY_STORE);
      if (key) (remember ? localStorage : sessionStorage).setItem(KEY_STORE, key);
    } catch (e) { /* storage off: the key lives in memory for this page */ }
  }
  function authHeaders() {
    const key = apiKey();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }
  function showAuth(problem) {
    const panel = $("auth-panel");
    panel.hidden = false;
    const has = !!apiKey();
    $("api-key-forget").hidden = !has;
    say($("auth-state"), problem || (has ? "A key is set for this page." : "This server needs an API key."));
  }
  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api_key").value.trim();
    if (!key) {
      showAuth("Type the key first.");
      $("api_key").focus();
      return;
    }
    setApiKey(key, $("api_key_remember").checked);
    $("api_key").value = "";
    showAuth("Key set. Checking it with the server…");
    clearError();
    // Options, the earlier session and its last job load again, now with the key.
    state.ready = false;
    checkHealth().then(() => { if (apiKey()) say($("auth-state"), "A key is set for this page."); });
  });
  $("api-key-forget").addEventListener("click", () => {
    setApiKey("", false);
    showAuth("The key was forgotten.");
    $("api_key").focus();
  });

  // Every request but the upload (an XHR, for its progress): the key, no cache, one error shape.
  async function send(path, options = {}) {
    let resp;
    try {
      resp = await fetch(path, { credentials: "same-origin", cache: "no-store", ...options,
        headers: { ...authHeaders(), ...(options.headers || {}) } });
    } catch (e) {
      throw new NetworkError("the connection to the server was lost; check that it is running and your network is up");
    }
    if (!resp.ok) {
      let body = null;
      try { body = await resp.json(); } catch (e) { body = null; }
      throw new ApiError(resp.status, body, resp.headers);
    }
    return resp;
  }
  async function api(path, options = {}) {
    const resp = await send(path, options);
    try { return await resp.json(); } catch (e) { return null; }
  }

  function reportError(e, extra = {}) {
    showError({ status: e.status || 0, code: e.code || "error", message: e.message, retryAfter: e.retryAfter, ...extra });
    if (e.status === 401) {
      showAuth(apiKey() ? "The server did not accept this key; type the right one." : "This server needs an API key.");
      $("api_key").focus();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Service health, demo banner, published options.
  // Live regions re-announce on every write: only write when the text changes.
  function say(el, text) { if (el.textContent !== text) el.textContent = text; }

  async function checkHealth() {
    clearTimeout(state.healthTimer);
    const pill = $("service-state");
    let next = 15000;
    try {
      const h = await api("/health");
      pill.dataset.state = h.state;
      if (h.state === "ready") {
        say(pill, "Service ready" + (h.profile ? ` · ${h.profile} model` : ""));
        if (!state.ready) { state.ready = true; await loadOptions(); await restore(); updateButtons(); }
      } else if (h.state === "starting") {
        say(pill, "Models loading…");
        next = 2000;
      } else if (h.state === "warming") {
        say(pill, "Warming up (compiling)…");
        next = 2000;
      } else {
        say(pill, "Service failed to start");
        if (state.health !== "setup_failed") {  // once, not again every check after a dismiss
          showError({ status: 503, code: "setup_failed", message: h.error || "the service failed to start" });
        }
        next = 30000;
      }
      if (h.auth === "api_key") showAuth();
      state.ready = h.state === "ready";
      state.health = h.state;
      renderSummary(0);
      setDemo(h.is_demo === true || h.profile === "tiny", h.profile);
    } catch (e) {
      pill.dataset.state = "unreachable";
      state.health = "unreachable";
      renderSummary(0);
      say(pill, "Service unreachable · retrying");
      state.ready = false;
      next = 5000;
    }
    updateButtons();
    state.healthTimer = setTimeout(checkHealth, next);
  }

  function setDemo(on, profile) {
    $("demo-banner").hidden = !on;
    if (on && profile) {
      $("demo-banner").dataset.profile = profile;
      $("demo-text").textContent = `The service runs the “${profile}” demo profile: results are small test images, ` +
        "not real portraits. An operator installs the real SDXL weights to get portraits.";
    }
  }

  // /system-status may publish `limits` and `options` (choices of the loaded model); without them
  // the page keeps its built-in lists and the API still validates every request.
  async function loadOptions() {
    let sys = {};
    try { sys = await api("/system-status"); } catch (e) { sys = {}; }
    applyOptions(sys);
  }

  function applyOptions(sys) {
    const lim = sys.limits || {};
    const opt = sys.options || {};
    for (const k of Object.keys(state.limits)) if (typeof lim[k] === "number") state.limits[k] = lim[k];
    if (sys.model && sys.model.is_demo) setDemo(true, sys.model.profile);
    const modes = Array.isArray(opt.quality_modes) && opt.quality_modes.length ? opt.quality_modes : FALLBACK.quality_modes;
    const ratios = opt.aspect_ratios && typeof opt.aspect_ratios === "object"
      ? (Array.isArray(opt.aspect_ratios) ? opt.aspect_ratios : Object.keys(opt.aspect_ratios)) : FALLBACK.aspect_ratios;
    const styles = Array.isArray(opt.styles) && opt.styles.length ? opt.styles : FALLBACK.styles;
    fillSelect($("quality_mode"), modes, (m) => QUALITY_LABELS[m] || m, opt.default_quality_mode || "balanced");
    const sizes = !Array.isArray(opt.aspect_ratios) && opt.aspect_ratios ? opt.aspect_ratios : {};
    fillSelect($("aspect_ratio"), [...ratios, CUSTOM], (r) => r === CUSTOM ? "Custom size…"
      : (ASPECT_LABELS[r] || r) + (Array.isArray(sizes[r]) ? ` (${sizes[r][0]}×${sizes[r][1]})` : ""), "1:1");
    fillSelect($("style"), styles, (s) => s === "none" ? "None (prompt only)" : (s[0].toUpperCase() + s.slice(1)).replace(/_/g, " "),
      opt.default_style || FALLBACK.default_style);
    const choices = opt.attribute_choices && typeof opt.attribute_choices === "object" ? opt.attribute_choices : FALLBACK.attribute_choices;
    for (const sel of document.querySelectorAll("select[data-attr]")) {
      const values = Array.isArray(choices[sel.dataset.attr]) ? choices[sel.dataset.attr] : [];
      fillSelect(sel, ["", ...values], (v) => v === "" ? "Any" : v.replace(/_/g, " "), "");
    }
    loadStyleDescriptions();
    if (sys.model_registry) loadModels(); else $("models-panel").hidden = true;
    $("limit-selfies").textContent = `1–${state.limits.max_selfies}`;
    $("limit-file-mb").textContent = String(state.limits.max_file_mb);
    $("num_images").max = String(state.limits.max_images);
    for (const id of ["width", "height"]) { $(id).min = String(state.limits.min_side); $(id).max = String(state.limits.max_side); }
    const fields = opt.request_fields || {};
    state.requestFields = fields;
    state.canPreview = !!fields.preview;  // the loaded engine declares live previews
    // identity "none" (an avatar without selfies): offered when the engine declares it, or, with no published
    // fields at all, by default (the API still refuses what it does not take).
    const idField = fields.identity;
    state.canDescribe = Object.keys(fields).length ? !!(idField && (idField.enum || []).includes("none")) : true;
    $("identity-choice").hidden = !state.canDescribe;
    if (!state.canDescribe) $("identity_session").checked = true;
    applyIdentityChoice();
    if (fields.restore_faces && typeof fields.restore_faces.default === "boolean" && !state.touchedRestore) {
      $("restore_faces").checked = fields.restore_faces.default;
    }
    if (fields.restore_model && fields.restore_model.default) $("restore_model").value = fields.restore_model.default;
    if (fields.candidates && typeof fields.candidates.maximum === "number") $("candidates").max = String(fields.candidates.maximum);
    if (typeof opt.default_identity_strength === "number" && !state.touchedStrength) {
      $("identity_strength").value = String(opt.default_identity_strength);
      $("identity_strength_out").textContent = opt.default_identity_strength.toFixed(2);
    }
    // Pose control (InstantID's IdentityNet): shown only when the loaded adapter has it.
    state.poseControl = opt.pose_control === true;
    state.poses = Array.isArray(opt.poses) ? opt.poses.filter((p) => p !== "selfie:N") : [];
    $("pose-field").hidden = $("pose-strength-field").hidden = !state.poseControl;
    const ps = (opt.request_fields || {}).pose_strength || {};
    if (typeof ps.default === "number" && !state.touchedPoseStrength) {
      $("pose_strength").value = String(ps.default);
      $("pose_strength_out").textContent = ps.default.toFixed(2);
    }
    fillPoses();
    applyFamily(opt);
    const m = sys.model || {};
    $("footer-info").textContent = [m.model_name, m.family, m.variant && `adapter ${m.variant}`,
      sys.face_backend && `faces ${sys.face_backend}`, sys.device && sys.device.name].filter(Boolean).join(" · ");
  }

  // Which request fields apply to the active model's family (/system-status options.field_applicability,
  // options.inapplicable_fields): the page hides those that never apply, so it never sends one (the API
  // answers 400 naming field and family), and says when a conditional one does (FLUX: a negative prompt
  // needs true CFG; style strength stays at 1). Without the table the page keeps its SDXL form.
  function applyFamily(opt) {
    const rules = opt.field_applicability || {};
    const family = opt.family || "sdxl";
    const never = new Set(Array.isArray(opt.inapplicable_fields) ? opt.inapplicable_fields : []);
    const when = (field) => (rules[field] || {})[family] || "";
    state.family = family;
    state.hidden = new Set([...never].filter((f) => rules[f]));
    const styleFixed = when("style_strength") && !when("style_strength").startsWith("always");
    if (styleFixed) state.hidden.add("style_strength");
    $("identity-strength-field").hidden = state.hidden.has("identity_strength");
    $("style-strength-field").hidden = styleFixed;
    $("true-cfg-field").hidden = !rules.true_cfg || state.hidden.has("true_cfg");
    const neg = when("negative_prompt");
    $("negative-help").textContent = neg && !neg.startsWith("always") ? `${family}: ${neg}.` : "";
    const step = String(opt.side_multiple || 8);
    for (const id of ["width", "height"]) $(id).step = step;
  }

  // Presets, then one entry per accepted selfie of this upload (selfie:N, N = its index in the report).
  const POSE_LABELS = { auto: "Auto (facing the camera)", frontal: "Frontal", three_quarter_left: "Three-quarter left",
    three_quarter_right: "Three-quarter right", tilt_left: "Head tilted left", tilt_right: "Head tilted right",
    look_up: "Looking up", look_down: "Looking down" };
  function fillPoses() {
    if (!state.poseControl) return;
    const selfies = (state.acceptedIndices || []).map((i) => `selfie:${i}`);
    fillSelect($("pose"), [...state.poses, ...selfies], (p) => POSE_LABELS[p]
      || (p.startsWith("selfie:") ? `Like selfie ${Number(p.slice(7)) + 1}` : p), "auto");
  }

  // GET /models: the base models; POST /models/load switches (admin key only: the server says 401 / 403).
  // Local mode: `active` is the one model. Cluster mode: `active` lists the models loaded on the live GPU
  // workers and `workers` says which worker holds which (and its load state).
  function describeModels(body) {
    if (!Array.isArray(body.active)) return `Active: ${body.active}`;
    const held = (body.workers || []).map((w) => `${w.name}: ${w.model || "no model"}` +
      (w.state === "loading" ? ` (loading ${w.target})` : w.state === "failed" ? " (last load failed)" : ""));
    return `Loaded on the GPU workers: ${body.active.join(", ") || "none"}` + (held.length ? ` · ${held.join(" · ")}` : "");
  }
  async function loadModels() {
    try {
      const body = await api("/models");
      const names = (body.models || []).map((m) => m.name);
      const family = Object.fromEntries((body.models || []).map((m) => [m.name, m.family]));
      const current = Array.isArray(body.active) ? body.active[0] : body.active;
      // keeps a choice being made; each model says its family (sdxl | flux)
      fillSelect($("base_model"), names, (n) => family[n] ? `${n} (${family[n]})` : n, current);
      $("models-panel").hidden = false;
      if (!$("model-state").textContent) say($("model-state"), describeModels(body));
    } catch (e) { $("models-panel").hidden = true; }
  }

  // The switch is admin only. Without API keys the page sends no key at all, so the panel has its own
  // admin-key field (kept in memory only); when it is empty the page's key is sent, as before.
  function adminHeaders() {
    const key = $("admin_key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }
  function describeSwitch(out) {
    if (!Array.isArray(out.workers)) {
      return `Active: ${out.model}` + (out.switched ? ` (switched from ${out.previous} in ${out.swap_s} s)` : "");
    }
    return `Switched to ${out.model}: ` + out.workers.map((w) => w.pending ? `${w.name} still loading` :
      w.ok ? `${w.name} in ${w.swap_s} s (was ${w.previous})` : `${w.name} not switched (${(w.error || {}).message})`).join(" · ");
  }
  async function switchModel() {
    const name = $("base_model").value;
    $("model-load-btn").disabled = true;
    say($("model-state"), `Loading ${name}…`);
    try {
      const out = await api("/models/load", { method: "POST",
                                              headers: { "Content-Type": "application/json", ...adminHeaders() },
                                              body: JSON.stringify({ model: name }) });
      say($("model-state"), describeSwitch(out));
      await loadOptions();   // another family brings other fields, sizes and defaults
    } catch (e) {
      say($("model-state"), `Not switched: ${e.message}`);
      await loadModels();
    } finally {
      $("model-load-btn").disabled = false;
    }
  }

  // GET /styles: each preset's description, shown under the style strength slider.
  async function loadStyleDescriptions() {
    if (state.styleInfo) return;
    try {
      const body = await api("/styles");
      state.styleInfo = Object.fromEntries((body.styles || []).map((st) => [st.name, st.description || ""]));
      showStyleDescription();
    } catch (e) { state.styleInfo = {}; }
  }

  function showStyleDescription() {
    $("style-description").textContent = (state.styleInfo || {})[$("style").value] || "";
  }

  function fillSelect(select, values, label, preferred) {
    const keep = select.value;
    select.textContent = "";
    for (const v of values) {
      const o = document.createElement("option");
      o.value = v; o.textContent = label(v);
      select.appendChild(o);
    }
    select.value = values.includes(keep) ? keep : (values.includes(preferred) ? preferred : values[0]);
  }

  // ---------------------------------------------------------------------------------------------
  // Selection: drag-and-drop or the file picker, thumbnails from object URLs (revoked once drawn).
  const dropzone = $("dropzone");
  for (const ev of ["dragenter", "dragover"]) dropzone.addEventListener(ev, (e) => {
    e.preventDefault();
    if (!state.uploading) dropzone.dataset.drag = "true";
  });
  for (const ev of ["dragleave", "drop"]) dropzone.addEventListener(ev, (e) => {
    e.preventDefault();
    dropzone.dataset.drag = "false";
  });
  // The whole zone opens the picker, not only its label (the label and input handle their own clicks).
  dropzone.addEventListener("click", (e) => {
    if (!state.uploading && !e.target.closest("label, input")) $("files").click();
  });
  dropzone.addEventListener("drop", (e) => { if (!state.uploading && e.dataTransfer) addFiles(e.dataTransfer.files); });
  // Dropping outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });

  function fmtBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1048576) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1048576).toFixed(1)} MB`;
  }

  function addFiles(list) {
    if (state.uploading) return;
    if (state.locked) resetSelection();  // a new pick after an upload starts a new set
    const files = Array.from(list || []);
    const max = state.limits.max_selfies;
    const seen = new Set(state.selection.map((s) => `${s.file.name}|${s.file.size}|${s.file.lastModified}`));
    let skipped = 0;
    let dropped = 0;
    for (const file of files) {
      const key = `${file.name}|${file.size}|${file.lastModified}`;
      if (seen.has(key)) { skipped += 1; continue; }
      if (state.selection.length >= max) { dropped += 1; continue; }
      seen.add(key);
      state.selection.push(makeThumb(file));
    }
    if (dropped) {
      showError({ status: 0, code: "too_many_files", title: "Too many photos",
        message: `At most ${max} photos per upload: ${dropped} of the photos you picked ${dropped === 1 ? "was" : "were"} left out.` });
    }
    renderSummary(skipped);
    updateButtons();
  }

  function makeThumb(file) {
    const li = $("thumb-template").content.firstElementChild.cloneNode(true);
    const entry = { file, li, status: "pending" };
    li.querySelector(".thumb-name").textContent = file.name;
    li.querySelector(".thumb-name").title = file.name;
    li.querySelector(".thumb-size").textContent = fmtBytes(file.size);
    const tooBig = file.size > state.limits.max_file_mb * 1048576;
    setThumbStatus(entry, "pending", tooBig ? `Larger than ${state.limits.max_file_mb} MB: the server will refuse it` : "Ready to upload");
    const img = li.querySelector("img");
    img.alt = `Preview of ${file.name}`;
    const url = URL.createObjectURL(file);
    const done = () => URL.revokeObjectURL(url);  // the decoded picture stays on screen
    img.addEventListener("load", done, { once: true });
    img.addEventListener("error", () => {
      done();
      const box = li.querySelector(".thumb-img");
      box.textContent = "";
      const span = document.createElement("span");
      span.className = "no-preview";
      span.textContent = "No preview";
      box.appendChild(span);
    }, { once: true });
    img.src = url;
    const rm = li.querySelector(".thumb-remove");
    rm.setAttribute("aria-label", `Remove ${file.name}`);
    rm.addEventListener("click", () => removeThumb(entry));
    $("thumbs").appendChild(li);
    return entry;
  }

  function setThumbStatus(entry, status, text, warnings = []) {
    entry.status = status;
    entry.li.dataset.status = status;
    const el = entry.li.querySelector(".thumb-status");
    el.textContent = text;
    const old = entry.li.querySelector(".thumb-warnings");
    if (old) old.remove();
    if (warnings.length) {
      const ul = document.createElement("ul");
      ul.className = "thumb-warnings";
      for (const w of warnings) {
        const li = document.createElement("li");
        li.textContent = withoutName(typeof w === "string" ? w : (w.message || w.code), entry.file.name);
        ul.appendChild(li);
      }
      el.after(ul);
    }
  }

  function removeThumb(entry) {
    if (state.uploading || state.locked) return;
    const i = state.selection.indexOf(entry);
    if (i < 0) return;
    state.selection.splice(i, 1);
    const next = state.selection[i] || state.selection[i - 1];
    entry.li.remove();
    // Keep keyboard focus in the list rather than dropping it to the page top.
    if (next) next.li.querySelector(".thumb-remove").focus(); else $("files").focus();
    renderSummary(0);
    updateButtons();
  }

  function resetSelection() {
    for (const s of state.selection) s.li.remove();
    state.selection = [];
    state.locked = false;
    $("upload-report").hidden = true;
    $("upload-progress-wrap").hidden = true;
    renderSummary(0);
    updateButtons();
  }
  $("clear-btn").addEventListener("click", () => { resetSelection(); $("files").focus(); });
  $("model-load-btn").addEventListener("click", switchModel);

  function renderSummary(skipped) {
    const n = state.selection.length;
    const bytes = state.selection.reduce((a, s) => a + s.file.size, 0);
    let text = n ? `${n} photo${n === 1 ? "" : "s"} selected (${fmtBytes(bytes)})` : "";
    if (skipped) text += ` · ${skipped} duplicate${skipped === 1 ? "" : "s"} skipped`;
    if (n && n < 5 && !state.locked) text += " · more photos (10 or so) give a better likeness";
    if (n && state.locked) text += " · to upload a different set, pick new photos";
    if (n && !state.ready && !state.locked) text += " · the upload opens once the service is ready";
    $("selection-summary").textContent = text;
  }

  // ---------------------------------------------------------------------------------------------
  // Upload with a progress bar (XMLHttpRequest: fetch cannot report upload progress).
  $("upload-form").addEventListener("submit", (e) => { e.preventDefault(); upload(); });

  function upload() {
    if (state.uploading || !state.selection.length || state.locked) return;
    const total = state.selection.reduce((a, s) => a + s.file.size, 0);
    if (total > state.limits.max_upload_mb * 1048576) {
      showError({ status: 413, code: "payload_too_large", title: "Upload too large",
        message: `These photos add up to ${fmtBytes(total)}; one upload may be at most ${state.limits.max_upload_mb} MB. Remove some and try again.` });
      return;
    }
    clearError();
    const form = new FormData();
    for (const s of state.selection) form.append("files", s.file, s.file.name);
    for (const s of state.selection) setThumbStatus(s, "pending", "Uploading…");
    state.uploading = true;
    updateButtons();
    const bar = $("upload-progress");
    bar.value = 0;
    $("upload-progress-label").textContent = "Uploading… 0 %";
    $("upload-progress-wrap").hidden = false;
    $("upload-report").hidden = true;

    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/upload");
    xhr.responseType = "json";
    xhr.withCredentials = true;
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (ev) => {
      if (!ev.lengthComputable) return;
      const pct = Math.round((ev.loaded / ev.total) * 100);
      bar.value = pct;
      $("upload-progress-label").textContent = pct >= 100 ? "Checking the faces…" : `Uploading… ${pct} %`;
    });
    xhr.upload.addEventListener("load", () => {
      bar.value = 100;
      $("upload-progress-label").textContent = "Checking the faces…";
    });
    const finish = () => { state.uploading = false; updateButtons(); };
    xhr.addEventListener("load", () => {
      finish();
      const body = xhr.response;
      if (xhr.status === 200 && body) {
        onUploaded(body);
        return;
      }
      const hdr = { get: (k) => xhr.getResponseHeader(k) };
      const err = new ApiError(xhr.status, body, hdr);
      $("upload-progress-label").textContent = "Upload failed";
      bar.value = 0;
      if (err.details && err.details.report) {
        applyReport(err.details.report);
        state.locked = true;
        updateButtons();
      } else {
        for (const s of state.selection) setThumbStatus(s, "pending", "Not uploaded");
      }
      reportError(err);
    });
    const dropped = (why) => () => {
      finish();
      $("upload-progress-label").textContent = "Upload failed";
      bar.value = 0;
      for (const s of state.selection) setThumbStatus(s, "pending", "Not uploaded");
      showError({ status: 0, code: "network_error", title: "Connection problem",
        message: `The upload ${why}. Check that the server is running, then press "Upload and check" again.` +
          " (A server also drops an upload that is far over its size limit.)" });
    };
    xhr.addEventListener("error", dropped("was cut off before the server answered"));
    xhr.addEventListener("timeout", dropped("timed out"));
    xhr.send(form);
  }

  // The session and the last job survive a reload of the tab (the client cookie does too).
  const STORE_KEY = "twin-page";
  function remember() {
    try {
      sessionStorage.setItem(STORE_KEY, JSON.stringify({ sessionId: state.sessionId, accepted: state.accepted,
        jobId: state.job ? state.job.id : null }));
    } catch (e) { /* storage off: nothing to restore later */ }
  }
  async function restore() {
    let saved = null;
    try { saved = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null"); } catch (e) { saved = null; }
    if (!saved || state.sessionId) return;
    if (saved.sessionId) {
      state.sessionId = saved.sessionId;
      state.accepted = saved.accepted;
      $("delete-session-btn").hidden = false;
      $("generate-hint").textContent = `Using your earlier upload (${saved.accepted ?? "?"} accepted selfies). Upload new photos to start over.`;
    }
    if (saved.jobId) {
      try {
        const job = await api(`/status/${encodeURIComponent(saved.jobId)}`);
        $("job-panel").hidden = false;
        onJob(job);
      } catch (e) { /* the job is gone (deleted, expired): nothing to show */ }
    }
    updateButtons();
  }

  function onUploaded(body) {
    // Fresh selfies: the next portrait is of their person.
    $("identity_session").checked = true;
    $("generate-hint").dataset.identity = "session";
    applyIdentityChoice();
    state.sessionId = body.session_id;
    state.accepted = body.accepted_count;
    state.locked = true;
    applyReport(body.report || {}, body);
    $("upload-progress-label").textContent = "Upload complete";
    $("delete-session-btn").hidden = false;
    $("generate-hint").textContent = `Using ${body.accepted_count} accepted selfie${body.accepted_count === 1 ? "" : "s"} (session ${String(body.session_id).slice(0, 8)}…).` +
      // The reference for every likeness score: how much the person's own selfies agree.
      (typeof body.self_similarity === "number" ? ` Your selfies agree at ${body.self_similarity.toFixed(2)}.` : "");
    remember();
    updateButtons();
    // The upload button just got disabled under the keyboard focus: put focus on the report.
    $("upload-report").focus();
  }

  // The thumbnail already names the file: drop a leading "name: " from the API's per-file message.
  function withoutName(text, name) {
    return text.startsWith(`${name}: `) ? text.slice(name.length + 2) : text;
  }

  function isAccepted(entry) { return entry.accepted === true || entry.status === "accepted"; }

  function applyReport(report, body = {}) {
    $("init_selfie").textContent = "";  // a new upload is a new session: its own selfies only
    const files = Array.isArray(report.files) ? report.files : [];
    let accepted = 0;
    let rejected = 0;
    files.forEach((f, i) => {
      const idx = Number.isInteger(f.index) ? f.index : i;
      const entry = state.selection[idx];
      const ok = isAccepted(f);
      if (ok) accepted += 1; else rejected += 1;
      if (!entry) return;
      const warnings = Array.isArray(f.warnings) ? f.warnings : [];
      if (ok) addInitOption($("init_selfie"), `selfie:${idx}`, `Selfie ${idx + 1}` + (f.filename ? ` (${f.filename})` : ""));
      if (ok) setThumbStatus(entry, "accepted", "✓ Accepted", warnings);
      else setThumbStatus(entry, "rejected", `✗ Rejected: ${withoutName(f.message || f.code || "not usable", entry.file.name)}`);
      entry.li.dataset.code = ok ? "" : (f.code || "");
    });
    state.acceptedIndices = files.filter(isAccepted).map((f, i) => (Number.isInteger(f.index) ? f.index : i));
    fillPoses();
    const counts = report.counts || {};
    accepted = body.accepted_count ?? counts.accepted ?? report.accepted ?? accepted;
    rejected = body.rejected_count ?? counts.rejected ?? report.rejected ?? rejected;
    const total = accepted + rejected;
    $("upload-counts").textContent = `${accepted} of ${total} photo${total === 1 ? "" : "s"} accepted · ${rejected} rejected`;
    const wl = $("upload-warnings");
    wl.textContent = "";
    const warnings = body.warnings || report.warnings || [];
    for (const w of warnings) {
      const li = document.createElement("li");
      li.textContent = typeof w === "string" ? w : (w.message || w.code);
      wl.appendChild(li);
    }
    $("upload-report").hidden = false;
    renderSummary(0);
  }

  $("delete-session-btn").addEventListener("click", async () => {
    if (!state.sessionId) return;
    if (!window.confirm("Delete your uploaded photos, their face data and all generated images from the server?")) return;
    const btn = $("delete-session-btn");
    btn.disabled = true;
    try {
      await api(`/sessions/${encodeURIComponent(state.sessionId)}`, { method: "DELETE" });
      state.sessionId = null;
      stopPolling();
      state.job = null;
      remember();
      resetSelection();
      $("gallery").textContent = "";
      $("gallery-empty").hidden = false;
      $("job-panel").hidden = true;
      btn.hidden = true;
      $("generate-hint").textContent = "Your photos were deleted. Upload selfies to start again.";
    } catch (e) {
      reportError(e);
    } finally {
      btn.disabled = false;
      updateButtons();
    }
  });

  // ---------------------------------------------------------------------------------------------
  // Who is in the picture: the selfies' person, or (identity "none") a person described in the form.
  function describing() { return state.canDescribe !== false && $("identity_none").checked; }
  function canGenerate() { return !!state.sessionId || describing(); }

  function applyIdentityChoice() {
    const none = describing();
    // Nothing of the selfies applies: their identity strength, their poses, starting from one of them.
    $("identity-strength-field").hidden = none;
    const selfieStart = $("init_source").querySelector("option[value='selfie']");
    selfieStart.disabled = none;
    if (none && $("init_source").value === "selfie") {
      $("init_source").value = "none";
      $("init_source").dispatchEvent(new Event("change"));
    }
    if (none) $("persona-box").open = true;
    for (const [id, text] of [["prompt-help", "What the picture should show; who is in it comes from the persona and look below."],
                              ["candidates-help", "Make this many, keep the first ones (not ranked: no selfies)."]]) {
      const el = $(id);
      if (el.dataset.selfies === undefined) el.dataset.selfies = el.textContent;
      el.textContent = none ? text : el.dataset.selfies;
    }
    const hint = $("generate-hint");
    if (none && hint.dataset.identity !== "none") {
      state.sessionHint = hint.textContent;   // what it said about the selfies, for the way back
      hint.textContent = "No selfies: the portrait is made from your prompt and the persona and look below.";
    } else if (!none && hint.dataset.identity === "none") {
      hint.textContent = state.sessionHint || "Upload your selfies first; then describe the picture you want.";
    }
    hint.dataset.identity = none ? "none" : "session";
    updateButtons();
  }
  for (const id of ["identity_session", "identity_none"]) $(id).addEventListener("change", applyIdentityChoice);

  // ---------------------------------------------------------------------------------------------
  // Generation form.
  $("identity_strength").addEventListener("input", (e) => {
    state.touchedStrength = true;
    $("identity_strength_out").textContent = Number(e.target.value).toFixed(2);
  });
  $("restore_faces").addEventListener("change", () => { state.touchedRestore = true; });
  $("pose_strength").addEventListener("input", (e) => {
    state.touchedPoseStrength = true;
    $("pose_strength_out").textContent = Number(e.target.value).toFixed(2);
  });
  $("style").addEventListener("change", showStyleDescription);
  for (const id of ["style_strength", "strength"]) {
    $(id).addEventListener("input", (e) => { $(`${id}_out`).textContent = Number(e.target.value).toFixed(2); });
  }
  $("init_source").addEventListener("change", () => {
    const src = $("init_source").value;
    $("init-selfie-field").hidden = src !== "selfie";
    $("init-output-field").hidden = src !== "output";
    $("init-file-field").hidden = src !== "file";
  });
  // The picture file goes inline (base64 data URL); the server decodes it like a selfie.
  $("init_file").addEventListener("change", () => {
    state.initData = null;
    const f = $("init_file").files[0];
    if (!f) return;
    const reader = new FileReader();
    reader.onload = () => { state.initData = String(reader.result); };
    reader.readAsDataURL(f);
  });

  // Selfies in upload order; portraits newest first (and the newest is picked).
  function addInitOption(select, value, label, newestFirst = false) {
    if ([...select.options].some((o) => o.value === value)) return;
    const o = document.createElement("option");
    o.value = value; o.textContent = label;
    if (newestFirst) { select.prepend(o); select.value = value; } else select.appendChild(o);
  }

  // Persona / attributes: only what was filled in is sent (the API refuses empty texts).
  function personaPayload(p) {
    const persona = {};
    if ($("persona_name").value.trim()) persona.name = $("persona_name").value;
    if ($("persona_age").value.trim()) persona.age = intOrRaw($("persona_age").value);
    const traits = $("persona_traits").value.split(",").map((t) => t.trim()).filter(Boolean);
    if (traits.length) persona.traits = traits;
    if (Object.keys(persona).length) p.persona = persona;
    const attributes = {};
    for (const el of document.querySelectorAll("#persona-box [data-attr]")) {
      if (el.value.trim()) attributes[el.dataset.attr] = el.value;
    }
    if (Object.keys(attributes).length) p.attributes = attributes;
  }

  function img2imgPayload(p) {
    const src = $("init_source").value;
    const value = src === "selfie" ? $("init_selfie").value : src === "output" ? $("init_output").value
      : src === "file" ? state.initData : null;
    if (src === "none") return;
    p.init_image = value || "";   // empty: the API names what is missing
    p.strength = Number($("strength").value);
  }

  $("aspect_ratio").addEventListener("change", () => {
    $("custom-size").hidden = $("aspect_ratio").value !== CUSTOM;
  });

  // Numbers go as numbers when they are whole; anything else goes as typed, so the API's own
  // message (which names the value) explains what is wrong.
  function intOrRaw(v) {
    const t = String(v).trim();
    return /^-?\d+$/.test(t) ? Number(t) : t;
  }

  function buildPayload() {
    const p = { prompt: $("prompt").value };
    const neg = $("negative_prompt").value;
    if (neg.trim()) p.negative_prompt = neg;
    p.num_images = intOrRaw($("num_images").value);
    p.quality_mode = $("quality_mode").value;
    if ($("aspect_ratio").value === CUSTOM) {
      p.width = intOrRaw($("width").value);
      p.height = intOrRaw($("height").value);
    } else {
      p.aspect_ratio = $("aspect_ratio").value;
    }
    p.style = $("style").value;
    const hidden = state.hidden || new Set();
    if (!hidden.has("style_strength") && Number($("style_strength").value) < 1) p.style_strength = Number($("style_strength").value);
    const none = describing();
    if (none) p.identity = "none";
    else if (!hidden.has("identity_strength")) p.identity_strength = Number($("identity_strength").value);
    if (!$("true-cfg-field").hidden && $("true_cfg").value.trim() !== "") p.true_cfg = Number($("true_cfg").value);
    if (state.poseControl && $("pose").value && !(none && $("pose").value.startsWith("selfie:"))) {
      p.pose = $("pose").value;
      p.pose_strength = Number($("pose_strength").value);
    }
    personaPayload(p);
    img2imgPayload(p);
    const seed = $("seed").value;
    if (seed.trim() !== "") p.seed = intOrRaw(seed);
    const candidates = $("candidates").value;
    if (candidates.trim() !== "") p.candidates = intOrRaw(candidates);
    p.restore_faces = $("restore_faces").checked;
    if (p.restore_faces) p.restore_model = $("restore_model").value;
    if (state.sessionId && !none) p.session_id = state.sessionId;
    const twinMode = $("identity_mode").value;
    if (!none && twinMode !== "auto") p.identity_mode = twinMode;
    // The twin strength goes with a mode that uses the LoRA; with "auto" only to an engine that declares the
    // field (an engine without twin LoRAs answers "unknown field" to it).
    const twinScale = twinMode === "lora" || twinMode === "both"
      || (twinMode === "auto" && !!(state.requestFields || {}).twin_lora_scale);
    if (!none && twinScale) p.twin_lora_scale = Number($("twin_lora_scale").value);
    if (canStream() && state.canPreview) p.preview = true;   // the forming image arrives with the live events
    return p;
  }

  // The API's messages start with the offending field ("num_images=7 is not between 1 and 4").
  function markField(message) {
    const m = /^([a-z_]+)(=| has )/.exec(message || "");
    if (!m) return;
    const el = $(m[1]);
    if (!el || !el.closest("#generate-form")) return;
    // The message also goes next to the field: the banner at the top may be scrolled out of view.
    const note = document.createElement("p");
    note.className = "field-error small";
    note.id = `${el.id}-error`;
    note.textContent = message;
    (el.closest(".field") || el.parentElement).appendChild(note);
    el.setAttribute("aria-invalid", "true");
    el.setAttribute("aria-describedby", [el.getAttribute("aria-describedby"), note.id].filter(Boolean).join(" "));
    el.focus();
  }

  $("generate-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (isBusy() || !canGenerate()) return;
    clearError();
    const btn = $("generate-btn");
    btn.disabled = true;
    btn.setAttribute("aria-busy", "true");
    try {
      const job = await api("/generate", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(buildPayload()) });
      startWatching(job);
    } catch (err) {
      reportError(err);
      if (err.status === 400) markField(err.message);
      if (err.status === 404 && /^session /.test(err.message)) {
        state.sessionId = null;  // deleted or expired on the server: a new upload is needed
        remember();
        $("delete-session-btn").hidden = true;
        $("generate-hint").textContent = "Your earlier upload is no longer on the server; upload selfies again.";
      }
    } finally {
      btn.removeAttribute("aria-busy");
      updateButtons();
    }
  });

  $("cancel-btn").addEventListener("click", async () => {
    if (!state.job) return;
    const btn = $("cancel-btn");
    btn.disabled = true;
    btn.setAttribute("aria-busy", "true");
    $("job-progress-text").textContent = "Canceling…";
    try {
      const job = await api(`/cancel/${encodeURIComponent(state.job.id)}`, { method: "POST" });
      onJob(job);
    } catch (err) {
      if (err.status !== 409) reportError(err);  // 409: it finished meanwhile; the next poll shows how
      poll();
    } finally {
      btn.removeAttribute("aria-busy");
      updateButtons();
    }
  });

  // ---------------------------------------------------------------------------------------------
  // Watching a job: poll /status, back off on connection errors instead of giving up.
  function isBusy() { return !!state.job && ["queued", "running"].includes(state.job.status); }

  function startWatching(job) {
    state.failures = 0;
    $("net-status").hidden = true;
    $("job-panel").hidden = false;
    onJob(job);
  }

  function stopPolling() { clearTimeout(state.pollTimer); state.pollTimer = null; }

  // Live events (GET /events/<id>, Server-Sent Events): every step, previews of the forming image and
  // the final job as they happen. EventSource cannot send an Authorization header, so with an API key
  // (and in browsers without EventSource) the page polls /status instead; it also falls back to
  // polling for the rest of the job as soon as the stream fails (429 past the server's stream limit,
  // a proxy that cuts it, a lost connection): the polling path knows how to back off and recover.
  function canStream() { return !!window.EventSource && !apiKey(); }

  function closeEvents() {
    if (state.events) { state.events.close(); state.events = null; }
  }

  function watchEvents(job) {
    if (state.events || !canStream() || state.noStreamFor === job.id) return !!state.events;
    const es = new EventSource(`/events/${encodeURIComponent(job.id)}`);
    state.events = es;
    $("job-panel").dataset.live = "events";
    const data = (e) => JSON.parse(e.data);
    es.addEventListener("status", (e) => { if (state.job && state.job.id === job.id) onJob(data(e)); });
    es.addEventListener("done", (e) => { closeEvents(); if (state.job && state.job.id === job.id) onJob(data(e)); });
    es.addEventListener("progress", (e) => {
      const p = data(e);
      if (!state.job || state.job.id !== job.id || !isBusy()) return;
      onJob({ ...state.job, status: "running", position: null,
        progress: { step: p.step, total: p.total, fraction: p.fraction, eta_seconds: p.eta_seconds } });
    });
    es.addEventListener("preview", (e) => {
      const p = data(e);
      if (!state.job || state.job.id !== job.id || !isBusy()) return;
      const img = $("job-preview");
      img.src = p.image;
      img.dataset.step = String(p.step);
      img.hidden = false;
    });
    es.onerror = () => {
      if (state.events !== es) return;
      closeEvents();
      state.noStreamFor = job.id;
      $("job-panel").dataset.live = "polling";
      if (isBusy()) poll();
    };
    return true;
  }

  async function poll() {
    stopPolling();
    if (!state.job) return;
    try {
      const job = await api(`/status/${encodeURIComponent(state.job.id)}`);
      if (state.failures) {
        state.failures = 0;
        const ns = $("net-status");
        ns.textContent = "Reconnected.";
        setTimeout(() => { if (!state.failures) ns.hidden = true; }, 2500);
      }
      onJob(job);
    } catch (err) {
      if (err instanceof NetworkError || err.status >= 500 || err.status === 429) {
        state.failures += 1;
        const wait = Math.min(BACKOFF_MAX_MS, 1000 * 2 ** (state.failures - 1),
          err.retryAfter ? Number(err.retryAfter) * 1000 || BACKOFF_MAX_MS : BACKOFF_MAX_MS);
        showNetProblem(err, wait);
        state.pollTimer = setTimeout(poll, wait);
      } else {
        // 404 and the like: the job is gone (session deleted, another client). Stop and say so.
        state.job = { ...state.job, status: "failed" };
        reportError(err);
        $("job-progress-text").textContent = "Stopped watching the job.";
        updateButtons();
      }
    }
  }

  function showNetProblem(err, wait) {
    const ns = $("net-status");
    ns.textContent = "";
    const what = err instanceof NetworkError ? "Connection to the server lost" : `The server answered ${err.status} (${err.code})`;
    ns.append(`${what}; retrying in ${Math.round(wait / 1000)} s (attempt ${state.failures}). `);
    const b = document.createElement("button");
    b.type = "button";
    b.className = "btn btn-small";
    b.textContent = "Retry now";
    b.addEventListener("click", () => poll());
    ns.appendChild(b);
    ns.hidden = false;
  }

  function fmtEta(s) {
    if (s == null) return "estimating…";
    if (s < 60) return `${Math.max(0, Math.round(s))} s`;
    return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }

  function onJob(job) {
    stopPolling();  // one poll chain at a time, whoever delivered this job state
    const fresh = !state.job || state.job.id !== job.id;
    const changed = fresh || state.job.status !== job.status;
    state.job = job;
    if (fresh) {
      remember();
      closeEvents();               // a stream belongs to one job
      $("job-preview").hidden = true;
    }
    const bar = $("job-progress");
    const p = job.progress || {};
    const total = p.total || 0;
    const step = p.step || 0;
    if (total) { bar.max = total; bar.value = step; } else if (job.status === "succeeded") { bar.max = 1; bar.value = 1; } else { bar.max = 1; bar.value = 0; }
    bar.dataset.step = String(step);
    bar.dataset.total = String(total);
    bar.dataset.status = job.status;
    const text = $("job-progress-text");
    const n = (job.request && job.request.num_images) || "";
    if (job.status === "queued") {
      text.textContent = job.position ? `Queued · position ${job.position} in line` : "Queued…";
    } else if (job.status === "running") {
      text.textContent = total
        ? `Generating ${n ? n + " image" + (n === 1 ? "" : "s") + " · " : ""}step ${step} / ${total} · ETA ${fmtEta(p.eta_seconds)}`
        : "Starting…";
    } else if (job.status === "succeeded") {
      const secs = job.started_at && job.finished_at ? (Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000 : null;
      text.textContent = `Done: ${job.outputs.length} image${job.outputs.length === 1 ? "" : "s"}` +
        (total ? ` · ${total} steps` : "") + (secs != null ? ` in ${secs.toFixed(1)} s` : "");
      renderOutputs(job);
    } else if (job.status === "canceled") {
      text.textContent = "Canceled.";
      if (job.outputs && job.outputs.length) renderOutputs(job);
    } else if (job.status === "failed") {
      const er = job.error || {};
      text.textContent = `Failed: ${er.message || "unknown error"}`;
      showError({ status: 0, code: er.code || "failed", title: "Generation failed", message: er.message || "the job failed" });
    }
    if (changed) $("job-announce").textContent = text.textContent;
    updateButtons();
    // Generate was disabled (and so lost focus) while the job ran: give focus a sensible home.
    if (changed && !fresh && !isBusy()) {
      if (job.status === "succeeded") $("results-heading").focus(); else $("generate-btn").focus();
    }
    if (!isBusy()) {
      closeEvents();
      $("job-preview").hidden = true;
    } else if (!watchEvents(job)) {
      $("job-panel").dataset.live = "polling";
      state.pollTimer = setTimeout(poll, POLL_MS[job.status] || 1000);
    }
  }

  // Raw vs restored: one button swaps the picture (and its download) between the two files.
  function wireRawToggle(li, img, out) {
    const btn = li.querySelector(".result-raw");
    const dl = li.querySelector(".result-download");
    btn.hidden = false;
    btn.setAttribute("aria-label", `Show the unrestored original of ${out.filename}`);
    const urls = { restored: null, raw: null };
    btn.addEventListener("click", async () => {
      const showRaw = btn.getAttribute("aria-pressed") !== "true";
      const key = showRaw ? "raw" : "restored";
      try {
        if (!urls[key]) {
          const u = showRaw ? out.raw_url : out.url;
          urls[key] = apiKey() ? await fetchImage(`${u}?inline=1`) : `${u}?inline=1`;
        }
      } catch (err) { reportError(err); return; }
      img.src = urls[key];
      dl.href = apiKey() ? urls[key] : (showRaw ? out.raw_url : out.url);
      dl.setAttribute("download", showRaw ? out.raw_filename : out.filename);
      btn.setAttribute("aria-pressed", showRaw ? "true" : "false");
      btn.textContent = showRaw ? "Show restored" : "Show raw";
      li.dataset.showing = key;
    });
  }

  async function fetchImage(url) {
    return URL.createObjectURL(await (await send(url)).blob());
  }

  function renderOutputs(job) {
    const gallery = $("gallery");
    if (gallery.querySelector(`[data-job="${CSS.escape(job.id)}"]`)) return;
    const frag = document.createDocumentFragment();
    const head = document.createElement("li");
    head.className = "gallery-job";
    head.dataset.job = job.id;
    const r = job.request || {};
    head.textContent = `“${r.prompt || ""}”` + (r.style ? ` · ${r.style}` : "") + (r.quality_mode ? ` · ${r.quality_mode}` : "") +
      (r.identity === "none" ? " · no selfies" : "");
    const ranking = (job.metadata && job.metadata.ranking) || null;
    frag.appendChild(head);
    for (const out of job.outputs || []) {
      const li = $("result-template").content.firstElementChild.cloneNode(true);
      li.querySelector(".result-safety").textContent = safetyText(out.safety);
      if (out.safety) li.dataset.safety = out.safety.result;
      if (!out.filename) {
        // Blocked by the safety check: never stored, nothing to show or download.
        li.classList.add("result-blocked");
        li.querySelector(".result-view").remove();
        li.querySelector(".result-actions").remove();
        li.querySelector(".result-name").textContent = `Image ${out.index}`;
        li.querySelector(".result-seed").textContent = `Seed ${out.seed}`;
        li.querySelector(".result-extra").textContent = out.note || "";
        frag.appendChild(li);
        continue;
      }
      li.dataset.filename = out.filename;
      li.dataset.seed = String(out.seed);
      const img = li.querySelector("img");
      img.alt = `Generated portrait ${out.filename}, seed ${out.seed}`;
      if (out.width && out.width < 256) img.classList.add("pixelated");
      if (out.width && out.height) { img.width = out.width; img.height = out.height; }
      const view = li.querySelector(".result-view");
      view.setAttribute("aria-label", `Open ${out.filename} full size`);
      li.querySelector(".result-name").textContent = out.filename;
      li.querySelector(".result-seed").textContent = `Seed ${out.seed}`;
      const extra = [];
      if (out.width && out.height) extra.push(`${out.width}×${out.height}`);
      if (out.candidate) {
        extra.push(`candidate ${out.candidate} of ${(job.metadata && job.metadata.candidates || []).length}` +
          (ranking && ranking.ranked === false ? " (not ranked)" : ""));
      }
      if (out.restored) extra.push(`restored (${out.restore_model})`);
      li.querySelector(".result-extra").textContent = extra.join(" · ");
      // The score beside its reference: how much the person's own selfies agree with each other.
      const likeness = [];
      if (typeof out.identity_similarity === "number") likeness.push(`likeness ${out.identity_similarity.toFixed(2)}`);
      else if (out.note) likeness.push(out.note);
      else if (r.identity === "none") likeness.push("no selfies: no likeness score");
      if (typeof out.self_similarity === "number" && typeof out.identity_similarity === "number") {
        likeness.push(`your selfies agree at ${out.self_similarity.toFixed(2)}`);
      }
      if (typeof out.identity_similarity_raw === "number") likeness.push(`raw ${out.identity_similarity_raw.toFixed(2)}`);
      li.querySelector(".result-likeness").textContent = likeness.join(" · ");
      const dl = li.querySelector(".result-download");
      dl.setAttribute("download", out.filename);
      dl.setAttribute("aria-label", `Download ${out.filename}`);
      if (apiKey()) {
        // The key cannot ride on <img src> or <a href>: fetch the PNG with it, show it from a blob URL.
        li.dataset.loading = "true";
        fetchImage(`${out.url}?inline=1`).then((blobUrl) => {
          img.src = blobUrl; view.href = blobUrl; dl.href = blobUrl;
          delete li.dataset.loading;
        }, (err) => {
          delete li.dataset.loading;
          li.querySelector(".result-extra").textContent = `could not load: ${err.message}`;
          reportError(err);
        });
      } else {
        // The gallery shows the small JPEG thumbnail; the link opens the full PNG.
        img.src = out.thumbnail_url ? `${out.thumbnail_url}?inline=1` : `${out.url}?inline=1`;
        view.href = `${out.url}?inline=1`;
        dl.href = out.url;
      }
      if (out.raw_url) wireRawToggle(li, img, out);
      addInitOption($("init_output"), `${job.id}/${out.filename}`, `${out.filename} · seed ${out.seed} · “${(r.prompt || "").slice(0, 30)}”`, true);
      const reuse = li.querySelector(".result-reuse");
      reuse.setAttribute("aria-label", `Use seed ${out.seed} for the next generation`);
      reuse.addEventListener("click", () => { $("seed").value = String(out.seed); $("seed").focus(); });
      frag.appendChild(li);
    }
    gallery.prepend(frag);
    $("gallery-empty").hidden = true;
  }

  // The output safety check's verdict on one image (result, the classifier's score).
  function safetyText(safety) {
    if (!safety) return "";
    const score = typeof safety.score === "number" ? ` (score ${safety.score.toFixed(2)})` : "";
    return {
      passed: `safety check passed${score}`,
      flagged: `flagged by the safety check${score}`,
      blocked: `blocked by the safety check${score}: not stored`,
      unchecked: "safety check off",
    }[safety.result] || `safety: ${safety.result}`;
  }

  // ---------------------------------------------------------------------------------------------
  function updateButtons() {
    const busyJob = isBusy();
    const n = state.selection.length;
    $("upload-btn").disabled = !state.ready || state.uploading || !n || state.locked;
    $("upload-btn").setAttribute("aria-busy", state.uploading ? "true" : "false");
    $("upload-btn").textContent = state.uploading ? "Uploading…" : "Upload and check";
    $("clear-btn").disabled = state.uploading || !n;
    $("files").disabled = state.uploading;
    for (const s of state.selection) s.li.querySelector(".thumb-remove").disabled = state.uploading || state.locked;
    $("generate-fields").disabled = !canGenerate();
    const gen = $("generate-btn");
    if (gen.getAttribute("aria-busy") !== "true") gen.disabled = !state.ready || !canGenerate() || busyJob;
    gen.textContent = busyJob ? "Generating…" : "Generate";
    const cancel = $("cancel-btn");
    if (cancel.getAttribute("aria-busy") !== "true") cancel.disabled = !busyJob;
  }

  applyOptions({});
  // The twin studio panel (static/twin.js) reads the session and calls the API through these.
  window.twinPage = { sessionId: () => state.sessionId, api, reportError, canStream };
  $("twin_lora_scale").addEventListener("input", (e) => {
    $("twin_lora_scale_out").textContent = Number(e.target.value).toFixed(2);
  });
  checkHealth();
  updateButtons();
})();
