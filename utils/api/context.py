"""What every route needs of the request and the app: the Runtime, the settings, the caller, JSON answers
and the one way a job is rendered (with its URLs)."""
from __future__ import annotations

from flask import current_app, jsonify, request

from utils.api.auth import COOKIE_NAME, Caller, resolve_caller
from utils.api.render import job_json


def runtime():
    """This app's Runtime (utils/service/runtime.py)."""
    return current_app.extensions["twin"]


def caller(issue: bool = False) -> Caller:
    return resolve_caller(request.headers, request.cookies, runtime().settings.api_key_list, issue=issue)


def json_response(status: int, body: dict, headers: dict | None = None):
    resp = jsonify(body)
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def with_client_cookie(resp, who: Caller):
    """A token issued by this request (/upload, or an identity='none' /generate) also goes out as the
    HttpOnly cookie, living as long as the caller's data may (TWIN_RETENTION_HOURS)."""
    if who.new_token:
        resp.set_cookie(COOKIE_NAME, who.new_token, httponly=True, samesite="Lax", secure=request.is_secure,
                        max_age=int(runtime().settings.retention_hours * 3600) or None)
    return resp


# Job URLs are built from the script root, not url_for: the event stream renders jobs after its request
# context is gone, and every other handler renders them the same way.
def output_url(job_id: str, filename: str, root: str | None = None) -> str:
    return f"{request.script_root if root is None else root}/download/{job_id}/{filename}"


def render_job(job: dict, root: str | None = None, store=None) -> dict:
    root = request.script_root if root is None else root
    return job_json(job, store if store is not None else runtime().store,
                    url_for_output=lambda j, f: output_url(j, f, root), status_url=f"{root}/status/{job['id']}")
