"""POST /generate, GET /status, /events (SSE), /preview, POST /cancel, GET /download."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify, request, send_file

from utils import errors
from utils.api import events as api_events, security
from utils.api.context import caller, json_response, output_url, render_job, runtime
from utils.api.idempotency import idempotent
from utils.logging import job_id_var, session_id_var
from utils.storage import is_output_name


def blueprint(limiter, settings) -> Blueprint:
    bp = Blueprint("jobs", __name__)

    @bp.post("/generate")
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
        rt = runtime()

        def answer():
            rt.require_ready()
            body_ = dict(payload) if isinstance(payload, dict) else payload
            webhook = rt.webhooks.parse(body_) if isinstance(body_, dict) else None  # SSRF checks before the job exists
            job = rt.jobs.submit(body_, who.owner, webhook=webhook)
            body = render_job(job)
            return 202, body, {"Location": body["status_url"]}, job["session_id"]
        status, body, headers = idempotent("generate", who.owner, (payload,), answer)
        session_id_var.set(body["session_id"])
        job_id_var.set(body["id"])
        return json_response(status, body, headers)

    @bp.get("/status/<job_id>")
    def status(job_id: str):
        job_id_var.set(job_id)
        return jsonify(render_job(runtime().jobs.owned(job_id, caller().owner)))

    @bp.get("/events/<job_id>")
    def events(job_id: str):
        job_id_var.set(job_id)
        return _event_stream(runtime(), job_id)

    @bp.get("/preview/<job_id>")
    def preview(job_id: str):
        job_id_var.set(job_id)
        step, jpeg = runtime().preview(job_id, caller().owner)
        resp = Response(jpeg, mimetype="image/jpeg")
        resp.headers["X-Preview-Step"] = str(step)
        return resp

    @bp.post("/cancel/<job_id>")
    def cancel(job_id: str):
        job_id_var.set(job_id)
        return jsonify(render_job(runtime().jobs.cancel(job_id, caller().owner)))

    @bp.get("/download/<job_id>/<filename>")
    def download(job_id: str, filename: str):
        job_id_var.set(job_id)
        if not is_output_name(filename):
            raise errors.NotFound(f"file {filename!r} not found")
        path = runtime().jobs.output_path(job_id, filename, caller().owner)
        mimetype = "image/jpeg" if filename.endswith(".jpg") else "image/png"
        return send_file(path, mimetype=mimetype, as_attachment=request.args.get("inline") != "1",
                         download_name=filename, max_age=0)

    return bp


def _event_stream(rt, job_id: str) -> Response:
    job = rt.jobs.owned(job_id, caller().owner)
    after = api_events.parse_last_event_id(request.headers.get("Last-Event-ID", request.args.get("last_event_id")))
    if not rt.stream_slots.acquire(blocking=False):
        raise api_events.TooManyStreams(f"{rt.settings.max_event_streams} event streams are open "
                                        "(TWIN_MAX_EVENT_STREAMS); poll /status or retry later")
    try:
        root = request.script_root  # the body is rendered after the request context is gone

        def render(ev, current):
            return api_events.render_event(ev, current, output_url=lambda j, f: output_url(j, f, root),
                                           render_job=lambda j: render_job(j, root, rt.store))
        # EventStream.close() gives the slot back whenever the server closes the response.
        resp = Response(api_events.EventStream(rt, job, after, render, rt.stream_slots),
                        mimetype="text/event-stream")
    except BaseException:
        rt.stream_slots.release()
        raise
    resp.headers["X-Accel-Buffering"] = "no"  # nginx and similar proxies must not buffer the stream
    return resp
