"""POST /generate, GET /status, /events (SSE), /preview, POST /cancel, GET /download."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify, redirect, request, send_file

from utils import errors
from utils.api import events as api_events, security
from utils.api.context import caller, json_response, output_url, render_job, runtime, with_client_cookie
from utils.api.idempotency import idempotent
from utils.logging import job_id_var, session_id_var
from utils.service.jobs import output_mimetype
from utils.storage import is_output_name


def blueprint(limiter, settings) -> Blueprint:
    bp = Blueprint("jobs", __name__)
    bp.add_url_rule("/generate", view_func=limiter.limit(settings.rate_limit_generate)(generate), methods=["POST"])
    bp.add_url_rule("/status/<job_id>", view_func=status)
    bp.add_url_rule("/events/<job_id>", view_func=events)
    bp.add_url_rule("/preview/<job_id>", view_func=preview)
    bp.add_url_rule("/cancel/<job_id>", view_func=cancel, methods=["POST"])
    bp.add_url_rule("/download/<job_id>/<filename>", view_func=download)
    return bp


def generate():
    if not request.is_json:
        raise errors.UnsupportedMedia("send a JSON object with Content-Type: application/json")
    # A prompt body needs kilobytes; the upload-sized app-wide limit must not apply to parsed JSON.
    request.max_content_length = int(runtime().settings.max_json_kb * 1024)
    try:
        payload = request.get_json()
    except RecursionError:  # json.loads on absurdly nested input; not a ValueError
        raise errors.InvalidRequest("the JSON body is nested too deeply") from None
    # An avatar without selfies (identity='none') may be the caller's first request: it gets its token here,
    # as /upload issues one, so the job has an owner.
    who = caller(issue=isinstance(payload, dict) and payload.get("identity") == "none")
    security.check_text_fields(payload)
    rt = runtime()

    def answer():
        rt.require_ready()
        body_ = dict(payload) if isinstance(payload, dict) else payload
        webhook = rt.webhooks.parse(body_) if isinstance(body_, dict) else None  # SSRF checks before the job exists
        job = rt.jobs.submit(body_, who.owner, webhook=webhook)
        body = render_job(job)
        return 202, body, {"Location": body["status_url"]}, job["session_id"]
    # A caller who just got its first token cannot be repeating itself: no key applies.
    code, body, headers = idempotent("generate", None if who.new_token else who.owner, (payload,), answer)
    session_id_var.set(body["session_id"])
    job_id_var.set(body["id"])
    if who.new_token:
        body = {**body, "client_token": who.new_token}
    return with_client_cookie(json_response(code, body, headers), who)


def status(job_id: str):
    job_id_var.set(job_id)
    return jsonify(render_job(runtime().jobs.owned(job_id, caller().owner)))


def events(job_id: str):
    job_id_var.set(job_id)
    return _event_stream(runtime(), job_id)


def preview(job_id: str):
    job_id_var.set(job_id)
    step, jpeg = runtime().preview(job_id, caller().owner)
    resp = Response(jpeg, mimetype="image/jpeg")
    resp.headers["X-Preview-Step"] = str(step)
    return resp


def cancel(job_id: str):
    job_id_var.set(job_id)
    return jsonify(render_job(runtime().jobs.cancel(job_id, caller().owner)))


def download(job_id: str, filename: str):
    """The owner's job file: streamed through here, or (TWIN_DOWNLOAD_REDIRECT=1, a bucket) a 302 to a
    presigned URL that answers with the same Content-Disposition."""
    job_id_var.set(job_id)
    if not is_output_name(filename):
        raise errors.NotFound(f"file {filename!r} not found")
    jobs, owner, inline = runtime().jobs, caller().owner, request.args.get("inline") == "1"
    url = jobs.download_url(job_id, filename, owner, inline=inline)
    if url is not None:
        resp = redirect(url, code=302)
        resp.headers["Cache-Control"] = "no-store"   # the URL expires; never cache the redirect
        return resp
    found = jobs.output_file(job_id, filename, owner)
    if found.path is not None:   # a local file: sendfile, ranges and ETag as ever
        return send_file(found.path, mimetype=output_mimetype(filename), as_attachment=not inline,
                         download_name=filename, max_age=0)
    resp = send_file(found.stream, mimetype=output_mimetype(filename), as_attachment=not inline,
                     download_name=filename, max_age=0, etag=found.etag or False,
                     last_modified=found.modified, conditional=False)
    resp.content_length = found.size
    return resp


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
