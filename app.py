"""The Flask API. Route handlers are thin: they read the request, call utils.services.Runtime, and
shape the answer. One error handler turns every failure into ``{"error": {"code", "message"}}``.

Production: ``gunicorn -c gunicorn.conf.py 'app:create_app()'`` (one worker process, gthread threads:
the models and the job threads live in that one process). Development: ``python app.py``.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
import uuid

from flask import Flask, Response, g, jsonify, render_template, request, send_file
from werkzeug.exceptions import HTTPException

from utils import errors
from utils.api import events as api_events, idempotency, security
from utils.jobs.webhooks import WEBHOOK_FIELDS
from utils.api.auth import COOKIE_NAME, require_admin, resolve_caller
from utils.config import Settings
from utils.request_fields import published_fields
from utils.api.render import job_json
from utils.logging import configure_logging, request_id_var, session_id_var, job_id_var
from utils.api.openapi import build_spec
from utils.services import Runtime, build_faces, build_generators, build_idempotency, style_catalogue
from utils.storage import is_output_name

log = logging.getLogger("twin.app")

# Error messages name the offending value; a hostile value must not make the answer as large as the request.
MAX_MESSAGE_CHARS = 500
# Endpoints that touch a caller's sessions and jobs (API key or client token decides what they see).
OWNED_ENDPOINTS = frozenset({"upload", "generate", "status", "events", "preview", "cancel", "download", "delete_session"})


def create_app(settings: Settings | None = None, *, generator=None, faces=None, idempotency_store=None) -> Flask:
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    # Request threads must get the GIL back quickly while a job thread runs Python-heavy pipeline code.
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    if not settings.is_loopback_bind and not settings.api_key_list and not settings.allow_anonymous:
        raise errors.ConfigError(f"TWIN_HOST={settings.host!r} is not a loopback address and TWIN_API_KEYS is "
                                 "empty: set API keys, or TWIN_ALLOW_ANONYMOUS=1 to serve without them")
    security.check_rate_limits(settings)
    styles = style_catalogue(settings)  # read now: a broken style file stops start-up, naming the line
    auth_message, auth_fields = security.describe_auth(settings)
    log.info(auth_message, extra=auth_fields)
    if generator is None:
        generators = build_generators(settings)
    else:
        generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    faces = faces if faces is not None else build_faces(settings)

    app = Flask(__name__)
    # Werkzeug enforces the whole-request limit before a byte is parsed (-> 413).
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_upload_mb * 1024 * 1024)
    app.config["MAX_FORM_PARTS"] = settings.max_selfies + 16
    app.json.sort_keys = False
    # "/download//etc/passwd" (a decoded %2f) must be a plain 404, not a 308 redirect to a cleaned-up path.
    app.url_map.merge_slashes = False
    if settings.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    from flask_limiter import Limiter
    from flask_limiter.errors import RateLimitExceeded
    # Local mode: in-memory counters (one gunicorn worker process serves the app, see gunicorn.conf.py).
    # Cluster mode: counters in the shared Redis, so a limit holds across API nodes; while Redis is away
    # the limiter lets requests through (they get 503 queue_unavailable from the job store instead of a 500).
    limiter = Limiter(lambda: security.rate_limit_key(request, settings.api_key_list), app=app,
                      storage_uri=settings.queue_url or "memory://", headers_enabled=False, default_limits=[],
                      swallow_errors=settings.cluster)
    spec = build_spec(settings)
    if settings.cors_origin_list:
        from flask_cors import CORS
        CORS(app, origins=settings.cors_origin_list, supports_credentials=True,
             expose_headers=["Retry-After", "Location", "X-Request-Id"])

    runtime = Runtime(settings, generators, faces)
    app.extensions["twin"] = runtime
    runtime.start()

    # The store TWIN_QUEUE_URL picks (services.build_idempotency); tests may pass another.
    idem = idempotency_store or build_idempotency(settings, runtime.storage.db_path, runtime.store)
    runtime.session_deleted_hooks.append(idem.forget_session)

    def idempotent(endpoint: str, owner: str | None, fp_parts: tuple, answer):
        """answer() -> (status, body, headers, session_id); with an Idempotency-Key from a known caller,
        the first answer is kept and given again for the same request (see utils/api/idempotency.py)."""
        key = idempotency.parse_key(request.headers.get(idempotency.HEADER))
        if key is None or owner is None:
            status, body, headers, _ = answer()
            return status, body, headers
        replay = idem.begin(owner, endpoint, key, idempotency.fingerprint(*fp_parts))
        if replay is not None:
            status, body, headers = replay
            return status, body, {**headers, "Idempotent-Replayed": "true"}
        try:
            status, body, headers, session_id = answer()
        except BaseException:
            idem.abandon(owner, endpoint, key)
            raise
        idem.complete(owner, endpoint, key, status, body, headers, session_id)
        return status, body, headers

    def json_response(status: int, body: dict, headers: dict):
        resp = jsonify(body)
        resp.status_code = status
        for k, v in headers.items():
            resp.headers[k] = v
        return resp

    def caller(issue: bool = False):
        return resolve_caller(request.headers, request.cookies, settings.api_key_list, issue=issue)

    # Job URLs are built from the script root, not url_for: the event stream renders jobs after its
    # request context is gone, and every other handler renders them the same way.
    def output_url(job_id: str, filename: str, root: str | None = None) -> str:
        return f"{request.script_root if root is None else root}/download/{job_id}/{filename}"

    def render_job(job: dict, root: str | None = None) -> dict:
        root = request.script_root if root is None else root
        return job_json(job, runtime.store, url_for_output=lambda j, f: output_url(j, f, root),
                        status_url=f"{root}/status/{job['id']}")

    # --- request context and logging ---
    @app.before_request
    def _start() -> None:
        g.t0 = time.perf_counter()
        rid = request.headers.get("X-Request-Id", "")
        rid = rid if rid.isascii() and 0 < len(rid) <= 64 and rid.replace("-", "").isalnum() else uuid.uuid4().hex
        g.request_id = rid
        request_id_var.set(rid)
        session_id_var.set(None)
        job_id_var.set(None)
        if settings.api_key_list and request.endpoint in OWNED_ENDPOINTS:
            caller()  # 401 before the body is looked at: no parsing work for a caller without a key

    @app.after_request
    def _finish(resp):
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        # Browsers must not sniff a served file into another type, and no shared cache (RunPod's proxy)
        # may keep a caller's portraits, job records or session answers.
        resp.headers["X-Content-Type-Options"] = "nosniff"
        if request.endpoint in OWNED_ENDPOINTS:
            resp.headers["Cache-Control"] = "private, no-store"
        if request.path != "/health" and not request.path.startswith("/static"):
            log.info("request", extra={"method": request.method, "path": request.path, "status": resp.status_code,
                                       "ms": round((time.perf_counter() - g.get("t0", time.perf_counter())) * 1000, 2)})
        return resp

    @app.errorhandler(Exception)
    def _error(e: Exception):
        if isinstance(e, errors.TwinError):
            status, headers, body = e.http_status, dict(e.headers), e.to_dict()
        elif isinstance(e, RateLimitExceeded):
            status = 429
            headers = {"Retry-After": str(security.retry_after_seconds(limiter))}
            body = {"code": "rate_limited", "message": f"too many requests to {request.path}: the limit is "
                                                       f"{e.description} per caller; retry after {headers['Retry-After']} s"}
        elif isinstance(e, HTTPException):
            status, headers = e.code or 500, {}
            code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
                    413: "payload_too_large", 415: "unsupported_media_type"}.get(status, "http_error")
            message = e.description or e.name
            if status == 413 and request.path == "/generate":
                message = f"the JSON body is larger than TWIN_MAX_JSON_KB={settings.max_json_kb:g} kB"
            elif status == 413:
                message = (f"the request is larger than TWIN_MAX_UPLOAD_MB={settings.max_upload_mb:g} MB "
                           f"(or has more than {settings.max_selfies} files)")
            elif status == 400 and request.is_json:
                message = "the body is not valid JSON"
            body = {"code": code, "message": message}
            if status == 405 and e.valid_methods:  # type: ignore[attr-defined]
                headers["Allow"] = ", ".join(e.valid_methods)  # type: ignore[attr-defined]
        else:
            status, headers = 500, {}
            body = {"code": "internal_error", "message": "an internal error occurred; the request id names it in the log"}
            log.error("unhandled error", extra={"traceback": traceback.format_exc()})
        if len(body.get("message") or "") > MAX_MESSAGE_CHARS:  # e.g. a 100 kB unknown field name, echoed
            body["message"] = body["message"][:MAX_MESSAGE_CHARS] + "… (truncated)"
        return json_response(status, {"error": body}, headers)

    # --- endpoints ---
    @app.post("/upload")
    @limiter.limit(settings.rate_limit_upload)
    def upload():
        if not request.mimetype.startswith("multipart/form-data"):
            raise errors.UnsupportedMedia("send the images as multipart/form-data in field 'files'")
        who = caller(issue=True)
        uploads = request.files.getlist("files") or request.files.getlist("file")
        # Read at most one byte past the per-file limit: an oversized file is refused without loading it all.
        limit = int(settings.max_file_mb * 1024 * 1024)
        files = [(f.filename or f"file_{i}", f.read(limit + 1)) for i, f in enumerate(uploads)]
        for name, data in files:
            if len(data) > limit:
                raise errors.PayloadTooLarge(f"file {name!r} is larger than the limit per file of "
                                             f"{settings.max_file_mb:g} MB (TWIN_MAX_FILE_MB)")

        def answer():
            body = runtime.upload(files, who.owner)
            return 200, body, {}, body["session_id"]
        # A caller who just got its first token cannot be repeating itself: no key applies.
        fp = tuple(x for name, data in files for x in (name, data))
        status, body, headers = idempotent("upload", None if who.new_token else who.owner, fp, answer)
        session_id_var.set(body["session_id"])
        if who.new_token:
            body = {**body, "client_token": who.new_token}
        resp = json_response(status, body, headers)
        if who.new_token:
            resp.set_cookie(COOKIE_NAME, who.new_token, httponly=True, samesite="Lax",
                            secure=request.is_secure, max_age=int(settings.retention_hours * 3600) or None)
        return resp

    @app.post("/generate")
    @limiter.limit(settings.rate_limit_generate)
    def generate():
        if not request.is_json:
            raise errors.UnsupportedMedia("send a JSON object with Content-Type: application/json")
        # A prompt body needs kilobytes; the upload-sized app-wide limit must not apply to parsed JSON.
        request.max_content_length = int(settings.max_json_kb * 1024)
        try:
            payload = request.get_json()
        except RecursionError:  # json.loads on absurdly nested input; not a ValueError
            raise errors.InvalidRequest("the JSON body is nested too deeply") from None
        who = caller()
        security.check_text_fields(payload)

        def answer():
            body_ = dict(payload) if isinstance(payload, dict) else payload
            webhook = runtime.webhooks.parse(body_) if isinstance(body_, dict) else None  # SSRF checks before the job exists
            job = runtime.submit(body_, who.owner, webhook=webhook)
            body = render_job(job)
            return 202, body, {"Location": body["status_url"]}, job["session_id"]
        status, body, headers = idempotent("generate", who.owner, (payload,), answer)
        session_id_var.set(body["session_id"])
        job_id_var.set(body["id"])
        return json_response(status, body, headers)

    @app.get("/status/<job_id>")
    def status(job_id: str):
        job_id_var.set(job_id)
        return jsonify(render_job(runtime.owned_job(job_id, caller().owner)))

    @app.get("/events/<job_id>")
    def events(job_id: str):
        job_id_var.set(job_id)
        job = runtime.owned_job(job_id, caller().owner)
        after = api_events.parse_last_event_id(request.headers.get("Last-Event-ID",
                                                                   request.args.get("last_event_id")))
        if not runtime.stream_slots.acquire(blocking=False):
            raise api_events.TooManyStreams(f"{settings.max_event_streams} event streams are open "
                                            "(TWIN_MAX_EVENT_STREAMS); poll /status or retry later")
        try:
            root = request.script_root  # the body is rendered after the request context is gone

            def render(ev, current):
                return api_events.render_event(ev, current, output_url=lambda j, f: output_url(j, f, root),
                                               render_job=lambda j: render_job(j, root))
            # EventStream.close() gives the slot back whenever the server closes the response.
            body = api_events.EventStream(runtime, job, after, render, runtime.stream_slots)
            resp = Response(body, mimetype="text/event-stream")
        except BaseException:
            runtime.stream_slots.release()
            raise
        resp.headers["X-Accel-Buffering"] = "no"  # nginx and similar proxies must not buffer the stream
        return resp

    @app.get("/preview/<job_id>")
    def preview(job_id: str):
        job_id_var.set(job_id)
        step, jpeg = runtime.preview(job_id, caller().owner)
        resp = Response(jpeg, mimetype="image/jpeg")
        resp.headers["X-Preview-Step"] = str(step)
        return resp

    @app.post("/cancel/<job_id>")
    def cancel(job_id: str):
        job_id_var.set(job_id)
        return jsonify(render_job(runtime.cancel(job_id, caller().owner)))

    @app.get("/download/<job_id>/<filename>")
    def download(job_id: str, filename: str):
        job_id_var.set(job_id)
        if not is_output_name(filename):
            raise errors.NotFound(f"file {filename!r} not found")
        path = runtime.output_path(job_id, filename, caller().owner)
        mimetype = "image/jpeg" if filename.endswith(".jpg") else "image/png"
        return send_file(path, mimetype=mimetype, as_attachment=request.args.get("inline") != "1",
                         download_name=filename, max_age=0)

    @app.delete("/sessions/<session_id>")
    def delete_session(session_id: str):
        session_id_var.set(session_id)
        return jsonify(runtime.delete_session(session_id, caller().owner))

    @app.get("/health")
    def health():
        return jsonify(runtime.health())

    @app.get("/system-status")
    def system_status():
        body = runtime.system_status()
        if body.get("options"):  # the service's own request fields beside the generator's
            body["options"]["request_fields"] = {**body["options"].get("request_fields", {}),
                                                 **published_fields(WEBHOOK_FIELDS, settings)}
            body["options"]["webhooks"] = bool(settings.webhook_secret)
        return jsonify(body)

    @app.get("/styles")
    def list_styles():
        return jsonify(styles)

    @app.get("/models")
    def list_models():
        body = runtime.models_catalogue()
        # Cluster mode adds each worker's model and load state (and "active" lists every loaded model).
        return jsonify({k: body[k] for k in ("active", "models", "workers") if k in body})

    @app.get("/loras")
    def list_loras():
        return jsonify({"loras": runtime.models_catalogue()["loras"]})

    @app.post("/models/load")
    def load_model():
        require_admin(request.headers, settings.api_key_list, settings.admin_key_list)
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or set(body) - {"model", "workers"} or "model" not in body:
            raise errors.InvalidRequest('the body must be {"model": "<name from GET /models>"} (cluster mode: '
                                        'optionally "workers": [names])')
        answer = runtime.load_model(body["model"], body.get("workers"))
        # Cluster mode: workers still loading when TWIN_MODEL_LOAD_WAIT_SECONDS ran out switch later.
        return json_response(202 if answer.get("pending") else 200, answer, {})

    @app.get("/openapi.json")
    def openapi():
        return jsonify(spec)

    @app.get("/test")
    def test_page():
        return render_template("test.html")

    @app.get("/")
    def index():
        return jsonify({"service": "digital-twin", "health": "/health", "test_page": "/test",
                        "openapi": "/openapi.json", "styles": "/styles"})

    return app


if __name__ == "__main__":  # development only; production runs gunicorn (start_app.sh)
    _settings = Settings.from_env()
    create_app(_settings).run(host=_settings.host, port=_settings.port, threaded=True, use_reloader=False)
