"""GET /health and GET /system-status, read off a Runtime (utils/service/runtime.py)."""
from __future__ import annotations

import time
from typing import Any

from utils import errors
from utils.contracts import ClusterStatus, Reachable

from utils.version import VERSION


def health(rt) -> dict:
    body: dict[str, Any] = {"status": "ok", "state": rt.state, "version": VERSION,
                            "uptime_seconds": round(time.time() - rt.started_at, 1),
                            # Which credential the other endpoints want (never the keys themselves):
                            # the /test page shows its API-key field from this.
                            "auth": "api_key" if rt.settings.api_key_list else "client_token"}
    if rt.setup_error:
        body["error"] = rt.setup_error
    if rt.draining:
        body["draining"] = True
    if rt.state == "ready" and rt.holds_models:
        _engine_health(rt.engines, body)
    elif rt.state == "starting" and rt.holds_models and any(getattr(g, "state", None) == "warming" for g in rt.engines):
        body["state"] = "warming"   # models loaded, warm-up (torch.compile) under way; ready next
    if isinstance(rt.store, Reachable):
        # The API answers 503 queue_unavailable while Redis is away: say so here (health stays 200).
        try:
            rt.store.ping()
            body["queue"] = {"backend": "redis", "reachable": True}
        except errors.TwinError as e:
            body["queue"] = {"backend": "redis", "reachable": False}
            body["state"], body["error"] = "queue_unavailable", e.message
    reachable, why = storage_reachable(rt.storage)
    # Uploads and submits answer 503 storage_unavailable while the bucket is away: say so here (health stays 200).
    body["storage"] = {"backend": rt.storage.backend, "reachable": reachable}
    if not reachable:
        body["state"], body["error"] = "storage_unavailable", why
    if rt.state == "ready":
        info = rt.model_info()
        body["profile"] = info.get("profile")
        body["is_demo"] = info.get("is_demo")
    return body


def storage_reachable(storage) -> tuple[bool, str | None]:
    try:
        storage.ping()
        return True, None
    except errors.TwinError as e:
        return False, e.message


def _engine_health(engines: list, body: dict) -> None:
    """A generator process that crashed is "restarting" (or "setup_failed" if that failed): say so; one that
    restarted but could not reload its base model serves the default one (``model_error``)."""
    for g in engines:
        if g.state in ("restarting", "setup_failed", "warming"):
            body["state"] = g.state
            if g.error is not None:
                body["error"] = g.error.message
            break
    for g in engines:
        if isinstance(g.model_error, str):
            body["model_error"] = g.model_error
            break


def system_status(rt) -> dict:
    s = rt.settings
    info = rt.model_info() if rt.state == "ready" else {}
    counts = rt.store.counts()
    options = rt.engines[0].published_options() if rt.state == "ready" and rt.engines else None
    cluster = rt.queue.cluster_status() if isinstance(rt.queue, ClusterStatus) else None
    return {
        "state": rt.state,
        "version": VERSION,
        "mode": "cluster" if cluster else "local",
        # GET /models and POST /models/load work here: clients such as the /test page ask for the catalogue
        # only then, instead of meeting a 501.
        "model_registry": rt.models.available,
        "uptime_seconds": round(time.time() - rt.started_at, 1),
        # family: sdxl | flux; memory: FLUX's TWIN_FLUX_MEMORY choice ({mode, backend, reason}); identity_note:
        # why a family runs without an identity method (FLUX without infiniteyou).
        "model": {"profile": info.get("profile"), "family": info.get("family"), "variant": info.get("variant"),
                  "model_name": info.get("model_name"), "is_demo": info.get("is_demo"), "dtype": info.get("dtype"),
                  "memory": info.get("memory"), "identity_note": info.get("identity_note")},
        "face_backend": rt.faces.backend_name,
        "storage": dict(rt.storage.describe(), reachable=storage_reachable(rt.storage)[0],
                        download_redirect=s.download_redirect),
        "device": device_info(info.get("device")),
        # The speed plan in force (utils/engine/speed): compile, quantization, step cache, VAE, warm-up time;
        # None until ready, and on an API node of a cluster (the GPU workers hold the models).
        "optimizations": info.get("optimizations"),
        # Local mode: job threads here; cluster mode: live GPU workers (listed under "cluster").
        "workers": len(cluster["workers"]) if cluster else len(rt.engines),
        "queue": {"depth": counts["queued"], "max": s.queue_max, "running": counts["running"]},
        "jobs": counts,
        "limits": {"max_selfies": s.max_selfies, "max_file_mb": s.max_file_mb, "max_upload_mb": s.max_upload_mb,
                   "max_images": options["max_images"] if options else None,
                   "min_side": s.min_image_side, "max_side": s.max_image_side,
                   "max_prompt_chars": s.max_prompt_chars},
        "options": options,
        "safety": safety_status(rt),
        **({"cluster": cluster} if cluster else {}),
    }


def safety_status(rt) -> dict:
    """The safety mode, the classifier, the term list, the signer (development or configured: how to install
    a real certificate is in docs/SAFETY.md), the watermark and the apparent-age gate (off with dlib, and why).
    On a cluster's API node the classifier lives on the GPU workers."""
    from utils.safety.policy import backend_age_gate
    from utils.service.output_safety import face_age_model
    body = rt.safety.status(age_gate=backend_age_gate(rt.faces.backend_name, face_age_model(rt.faces)))
    if not rt.holds_models:
        body["classifier"] = f"on the GPU workers ({rt.settings.safety_model_repo})"
    body["certificate_help"] = ("set TWIN_C2PA_CERT and TWIN_C2PA_KEY (PEM chain and key of a certificate from a "
                                "CA on the C2PA trust list) on every node: docs/SAFETY.md, 'Installing a certificate'")
    return body


def device_info(device: str | None) -> dict:
    out: dict[str, Any] = {"device": device or "unknown", "type": "cpu", "name": "CPU"}
    if device and str(device).startswith("cuda"):
        try:
            import torch
            idx = torch.device(device).index or 0
            free, total = torch.cuda.mem_get_info(idx)
            out.update(type="cuda", name=torch.cuda.get_device_name(idx),
                       vram_used_mb=round((total - free) / 1048576), vram_total_mb=round(total / 1048576))
        except Exception:  # noqa: BLE001
            out.update(type="cuda")
    return out
