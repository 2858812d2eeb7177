"""POST /upload, GET and DELETE /sessions/<id>, and the twin studio: POST /sessions/<id>/train (a training
job), GET /sessions/<id>/lora (the trained LoRA)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request, send_file

from utils import errors
from utils.api.context import caller, json_response, render_job, runtime, with_client_cookie
from utils.api.idempotency import idempotent
from utils.logging import job_id_var, session_id_var
from utils.service.sessions import check_file_size


def blueprint(limiter, settings) -> Blueprint:
    bp = Blueprint("sessions", __name__)
    bp.add_url_rule("/upload", view_func=limiter.limit(settings.rate_limit_upload)(upload), methods=["POST"])
    bp.add_url_rule("/sessions/<session_id>", view_func=delete_session, methods=["DELETE"])
    bp.add_url_rule("/sessions/<session_id>", view_func=get_session, methods=["GET"])
    bp.add_url_rule("/sessions/<session_id>/train", view_func=limiter.limit(settings.rate_limit_generate)(train),
                    methods=["POST"])
    bp.add_url_rule("/sessions/<session_id>/lora", view_func=download_lora, methods=["GET"])
    return bp


def upload():
    if not request.mimetype.startswith("multipart/form-data"):
        raise errors.UnsupportedMedia("send the images as multipart/form-data in field 'files'")
    rt = runtime()
    settings = rt.settings
    who = caller(issue=True)
    uploads = request.files.getlist("files") or request.files.getlist("file")
    # Read at most one byte past the per-file limit: an oversized file is refused without loading it all.
    limit = int(settings.max_file_mb * 1024 * 1024)
    files = [(f.filename or f"file_{i}", f.read(limit + 1)) for i, f in enumerate(uploads)]
    for name, data in files:
        check_file_size(name, len(data), settings)

    def answer():
        rt.require_ready()
        body = rt.sessions.upload(files, who.owner)
        return 200, body, {}, body["session_id"]
    # A caller who just got its first token cannot be repeating itself: no key applies.
    fp = tuple(x for name, data in files for x in (name, data))
    code, body, headers = idempotent("upload", None if who.new_token else who.owner, fp, answer)
    session_id_var.set(body["session_id"])
    if who.new_token:
        body = {**body, "client_token": who.new_token}
    return with_client_cookie(json_response(code, body, headers), who)


def delete_session(session_id: str):
    session_id_var.set(session_id)
    return runtime().sessions.delete(session_id, caller().owner)


def get_session(session_id: str):
    session_id_var.set(session_id)
    rt = runtime()
    return jsonify(rt.sessions.describe(session_id, caller().owner, rt.training.twin))


def train(session_id: str):
    """A twin LoRA training of the caller's session: 202 + the job JSON (``"kind": "train"``)."""
    session_id_var.set(session_id)
    payload: object = {}
    if request.content_length or request.is_json:
        if not request.is_json:
            raise errors.UnsupportedMedia("send a JSON object with Content-Type: application/json")
        request.max_content_length = int(runtime().settings.max_json_kb * 1024)
        payload = request.get_json()
    rt, who = runtime(), caller()

    def answer():
        rt.require_ready()
        body_ = dict(payload) if isinstance(payload, dict) else payload
        webhook = rt.webhooks.parse(body_) if isinstance(body_, dict) else None
        job = rt.training.submit(session_id, body_, who.owner, webhook=webhook)
        body = render_job(job)
        return 202, body, {"Location": body["status_url"]}, session_id
    code, body, headers = idempotent("train", who.owner, (session_id, payload), answer)
    job_id_var.set(body["id"])
    return json_response(code, body, headers)


def download_lora(session_id: str):
    session_id_var.set(session_id)
    path = runtime().training.lora_file(session_id, caller().owner)
    return send_file(path, mimetype="application/octet-stream", as_attachment=True,
                     download_name=f"twin_lora_{session_id}.safetensors", max_age=0)
