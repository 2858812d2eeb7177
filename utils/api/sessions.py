"""POST /upload and DELETE /sessions/<id>."""
from __future__ import annotations

from flask import Blueprint, request

from utils import errors
from utils.api.context import caller, json_response, runtime, with_client_cookie
from utils.api.idempotency import idempotent
from utils.logging import session_id_var
from utils.service.sessions import check_file_size


def blueprint(limiter, settings) -> Blueprint:
    bp = Blueprint("sessions", __name__)
    bp.add_url_rule("/upload", view_func=limiter.limit(settings.rate_limit_upload)(upload), methods=["POST"])
    bp.add_url_rule("/sessions/<session_id>", view_func=delete_session, methods=["DELETE"])
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
