"""The OpenAPI 3.0 description of the HTTP API, built in code from the settings and the generator's
own tables, served at ``/openapi.json`` and fuzzed by tests/test_fuzz.py (schemathesis).

The request schemas describe what the handlers really accept (limits come from the same settings the
validators read), so a fuzzer's "valid" example is valid for the server too; the response schemas
describe every status a handler can answer with, so an undocumented status is a finding.
"""
from __future__ import annotations

from typing import Any

from utils.api.idempotency import KEY_RE as IDEMPOTENCY_KEY_RE
from utils.api.security import TEXT_FIELDS
from utils.jobs.webhooks import WEBHOOK_FIELDS
from utils.config import Settings
from utils.request_fields import object_schema
from utils.storage import ID_RE, OUTPUT_NAME_RE

# Control characters refused in prompt fields (utils/security.check_text_fields); tab, CR and LF pass.
_NO_CONTROLS = "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]*$"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, retry_after: bool = False) -> dict:
    resp: dict[str, Any] = {"description": description,
                            "content": {"application/json": {"schema": _ref("Error")}}}
    if retry_after:
        resp["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                           "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    return resp


def _nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


def build_spec(settings: Settings) -> dict[str, Any]:
    s = settings
    keyed = bool(s.api_key_list)
    c = _common(s, keyed)
    paths = {**_upload_generate_paths(s, c), **_job_paths(s, c), **_service_paths(c), **_model_paths(),
             **_models_load_path(), **_twin_paths(s, c),
             "/openapi.json": {"get": {"operationId": "openapi", "responses": {"200": {
                 "description": "This document.", "content": {"application/json": {"schema": {"type": "object"}}}}}}}}
    security_schemes: dict[str, Any] = {
        "clientToken": {"type": "apiKey", "in": "header", "name": "X-Client-Token",
                        "description": "Without API keys: the client_token /upload returned (or its cookie)."}}
    if keyed:
        security_schemes["bearerAuth"] = {"type": "http", "scheme": "bearer"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Digital twin API", "version": _version(),
                 "description": ("Upload selfies, generate portraits. Sessions and jobs belong to the caller "
                                 "(API key, or the per-client token issued at upload); another caller gets 404.")},
        "paths": paths,
        "components": {"schemas": _schemas(s), "securitySchemes": security_schemes},
        "security": [{"bearerAuth": []}] if keyed else [{"clientToken": []}, {}],
    }


def _version() -> str:
    from utils.version import VERSION
    return VERSION


def _common(s: Settings, keyed: bool) -> dict[str, Any]:
    """Parameters and error responses several paths share."""
    id_param = {"type": "string", "pattern": ID_RE.pattern}
    return {
        "id_param": id_param,
        "job_id": {"name": "job_id", "in": "path", "required": True, "schema": id_param},
        "idem_key": {"name": "Idempotency-Key", "in": "header", "required": False,
                     "description": ("Repeat a request safely: the same key with the same body from the same caller "
                                     f"within {s.idempotency_hours:g} h answers the first answer again "
                                     "(Idempotent-Replayed: true)."),
                     "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_RE.pattern}},
        "owned": {"401": _error("API keys are configured and the request has no valid one.")} if keyed else {},
        "limited": {"429": _error("Rate limit or queue limit reached.", retry_after=True)},
    }


def _generate_request(s: Settings) -> dict[str, Any]:
    from utils.service.wiring import request_applicability, request_fields
    generate_request = object_schema(
        request_fields(), s,
        description=("width and height go together and exclude aspect_ratio; without session_id the caller's "
                     "latest upload is used; identity='none' takes no session_id (the job gets a session of its "
                     "own, with no selfies). Unknown fields are refused."),
        extra_properties={"session_id": {"type": "string"},
                          **{f.name: f.schema(s) for f in WEBHOOK_FIELDS}})
    # The text checks of utils/api/security.check_text_fields, as patterns (a fuzzer's "valid" prompt is valid).
    props = generate_request["properties"]
    for name in TEXT_FIELDS:
        props[name]["pattern"] = _NO_CONTROLS
    # Fields that apply to some model families only (and when): a field given for a model it does not apply
    # to is a 400 field_not_applicable naming field and family.
    for name, families in request_applicability().items():
        props[name]["x-applies-to"] = families
    props["prompt"]["pattern"] = _NO_CONTROLS.replace(
        "]*$", "]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]*$")
    return generate_request


def _job_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "job_id", "status", "session_id", "position", "progress", "created_at", "started_at",
                     "finished_at", "request", "outputs", "metadata", "error", "status_url"],
        "properties": {
            "id": {"type": "string"}, "job_id": {"type": "string"},
            "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]},
            "kind": {"type": "string", "enum": ["generate", "train"],
                     "description": "train: a twin LoRA training (POST /sessions/{session_id}/train)"},
            "session_id": _nullable({"type": "string"}),
            "position": _nullable({"type": "integer", "minimum": 1}),
            "progress": {"type": "object", "required": ["step", "total", "fraction", "eta_seconds"], "properties": {
                "step": {"type": "integer", "minimum": 0}, "total": {"type": "integer", "minimum": 0},
                "fraction": {"type": "number", "minimum": 0, "maximum": 1},
                "eta_seconds": _nullable({"type": "number", "minimum": 0})}},
            "created_at": {"type": "string"}, "started_at": _nullable({"type": "string"}),
            "finished_at": _nullable({"type": "string"}),
            "request": {"type": "object"},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["seed", "width", "height", "safety"],
                "description": "A stored output has filename and url; an image the safety check blocked has "
                               "neither (never stored): index, seed, safety and a note.",
                "properties": {
                    "filename": {"type": "string", "pattern": OUTPUT_NAME_RE.pattern},
                    "index": {"type": "integer", "description": "a blocked image's place among the outputs"},
                    "safety": {"type": "object", "required": ["result", "score", "model"], "properties": {
                        "result": {"type": "string", "enum": ["passed", "flagged", "blocked", "unchecked"]},
                        "score": _nullable({"type": "number", "minimum": 0, "maximum": 1,
                                            "description": "the classifier's probability of explicit content"}),
                        "model": _nullable({"type": "string"})}},
                    "seed": {"type": "integer"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                    "url": {"type": "string"}, "thumbnail_url": {"type": "string"},
                    "identity_similarity": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
                    "self_similarity": _nullable({"type": "number", "description": "the session's selfies' "
                                                  "median pairwise likeness: the reference for the score"}),
                    "note": {"type": "string"},
                    "candidate": {"type": "integer", "description": "best-of-N: which candidate this is"},
                    "restored": {"type": "boolean"}, "restore_model": {"type": "string"},
                    "faces_restored": {"type": "integer"},
                    "raw_filename": {"type": "string", "pattern": OUTPUT_NAME_RE.pattern},
                    "raw_url": {"type": "string", "description": "the unrestored original"},
                    "identity_similarity_raw": _nullable({"type": "number", "minimum": 0, "maximum": 1})}}},
            "metadata": _nullable({"type": "object"}),
            "error": _nullable({"type": "object", "required": ["code", "message"],
                                "description": "a failed job's reason; safety_blocked: every image was blocked by "
                                               "the safety check and none was stored",
                                "properties": {"code": {"type": "string"}, "message": _nullable({"type": "string"})}}),
            "status_url": _nullable({"type": "string"}),
            "webhook": _nullable({"type": "object", "properties": {
                "url": {"type": "string"}, "events": {"type": "array", "items": {"type": "string"}},
                "deliveries": {"type": "array", "items": {"type": "object"}}}}),
            "client_token": {"type": "string", "description": "Only in the answer to an identity='none' "
                             "/generate from a caller without a token: its new token (also set as a cookie)."},
        },
    }


def _schemas(s: Settings) -> dict[str, Any]:
    generate_request, job = _generate_request(s), _job_schema()
    return {
        "Error": {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
            "error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}}}}},
        "GenerateRequest": generate_request,
        "TrainRequest": _train_request(s),
        "Session": _session_schema(),
        "Job": job,
        "UploadResult": {"type": "object",
                         "required": ["success", "session_id", "total", "accepted_count", "rejected_count",
                                      "warnings", "report"],
                         "properties": {
                             "success": {"type": "boolean"}, "session_id": {"type": "string"},
                             "total": {"type": "integer", "minimum": 1},
                             "accepted_count": {"type": "integer", "minimum": 1},
                             "rejected_count": {"type": "integer", "minimum": 0},
                             "warnings": {"type": "array", "items": {"type": "object"}},
                             "report": {"type": "object"},
                             "safety": {"type": "object", "required": ["state", "reason"], "description":
                                        "the session's apparent-age gate: held (explicit content blocked whatever "
                                        "the safety mode), clear, or off (no age model); never the estimate",
                                        "properties": {"state": {"type": "string", "enum": ["held", "clear", "off"]},
                                                       "reason": {"type": "string"}}},
                             "self_similarity": _nullable({"type": "number", "description": "median pairwise "
                                                           "likeness of the accepted selfies (null with one)"}),
                             "client_token": {"type": "string", "description": "Issued to a caller without one "
                                                                               "(no API keys): send it back as "
                                                                               "X-Client-Token or the cookie."}}},
        "Deleted": {"type": "object", "required": ["deleted", "session_id"], "properties": {
            "deleted": {"type": "boolean", "enum": [True]}, "session_id": {"type": "string"}}},
        "Health": {"type": "object", "required": ["status", "state", "version", "uptime_seconds"], "properties": {
            "status": {"type": "string", "enum": ["ok"]},
            "state": {"type": "string", "enum": ["starting", "warming", "ready", "setup_failed", "restarting", "queue_unavailable",
                                                 "storage_unavailable"],
                      "description": "warming: models loaded, the warm-up (torch.compile, TWIN_COMPILE) runs; restarting: the generator process crashed and is being started again; "
                                     "queue_unavailable / storage_unavailable: Redis / the storage bucket does not answer."},
            "storage": {"type": "object", "properties": {"backend": {"type": "string", "enum": ["local", "s3"]},
                                                         "reachable": {"type": "boolean"}}},
            "draining": {"type": "boolean", "description": "true after SIGTERM: no new jobs are accepted."},
            "version": {"type": "string"}, "uptime_seconds": {"type": "number"}, "error": {"type": "string"},
            "profile": _nullable({"type": "string"}), "is_demo": _nullable({"type": "boolean"}),
            "auth": {"type": "string", "enum": ["api_key", "client_token"],
                     "description": "api_key: send Authorization: Bearer <key>; client_token: the token /upload issues."}}},
    }


def _upload_generate_paths(s: Settings, c: dict) -> dict[str, Any]:
    idem_key, owned, limited = c["idem_key"], c["owned"], c["limited"]
    return {
        "/upload": {"post": {
            "operationId": "upload", "parameters": [idem_key],
            "summary": "Upload selfies; builds one identity (a session) from the usable ones.",
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["files"], "properties": {
                    "files": {"type": "array", "minItems": 1, "maxItems": s.max_selfies,
                              "items": {"type": "string", "format": "binary"}}}}}}},
            "responses": {
                "200": {"description": "Session created; per-file report.",
                        "content": {"application/json": {"schema": _ref("UploadResult")}}},
                "400": _error("No files."),
                "413": _error(f"More than {s.max_selfies} files, a file over {s.max_file_mb:g} MB or a request "
                              f"over {s.max_upload_mb:g} MB."),
                "415": _error("Not multipart/form-data."),
                "409": _error("A request with this Idempotency-Key is still being answered.", retry_after=True),
                "422": _error("No file has a usable face (details.report says why for each), or the "
                              "Idempotency-Key was used with other files."),
                "507": _error("The data disk is full."),
                **owned, **limited,
                "503": _error("The models are still loading or failed to load (not_ready), or "
                              f"{s.max_concurrent_uploads} upload(s) are being checked already and none finished "
                              f"within {s.upload_wait_seconds:g} s (busy), or the storage bucket does not answer "
                              "(storage_unavailable).", retry_after=True)}}},
        "/generate": {"post": {
            "operationId": "generate", "parameters": [idem_key],
            "summary": "Queue a generation job for one of the caller's sessions, or (identity='none') "
                       "for no selfies at all.",
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref("GenerateRequest")}}},
            "responses": {
                "202": {"description": "Queued.", "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": _ref("Job")}}},
                "400": _error("Invalid body or values; no session yet (no_session); session_id of an "
                              "identity='none' job's session (no_selfies); identity='none' with session_id; "
                              "prompt_refused: the prompt, persona, attributes or style names explicit sexual "
                              "content while a face identity is used (details: field, term, group; "
                              "negative_prompt is never refused)."),
                "404": _error("session_id is not one of the caller's sessions."),
                "413": _error(f"Body over {s.max_json_kb:g} kB."),
                "415": _error("Not application/json."),
                "409": _error("A request with this Idempotency-Key is still being answered.", retry_after=True),
                "422": _error("The Idempotency-Key was used with a different body."),
                "507": _error("The data disk is full."),
                **owned, **limited,
                "503": _error("The models are still loading or failed to load (not_ready), or the storage bucket "
                              "does not answer (storage_unavailable).", retry_after=True)}}},
    }


def _events_path(job_id: dict, owned: dict) -> dict[str, Any]:
    """GET /events/{job_id}: the Server-Sent Events stream of one job."""
    return {"get": {
        "operationId": "events", "parameters": [
            job_id,
            {"name": "Last-Event-ID", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"}},
            {"name": "last_event_id", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"}}],
        "summary": "The job's live events as Server-Sent Events: status, progress, output, done (then the "
                   "stream ends). Resume with Last-Event-ID.",
        "responses": {"200": {
            "description": ("Each event: `id:` (1, 2, … per job), `event:` and one `data:` line of JSON — status and "
                            "done: the job JSON; progress: job_id, step, total, fraction, eta_seconds (+ steps, loss: training); output: "
                            "the output entry with its url. `: heartbeat` comments keep an idle stream open."),
            # OpenAPI 3.0: the schema of a text/event-stream describes one event.
            "content": {"text/event-stream": {"schema": {
                "type": "object", "required": ["event", "data"],
                "properties": {"event": {"type": "string", "enum": ["status", "progress", "preview", "output", "done"]},
                               "data": {"type": "string"},
                               "id": {"type": "string", "pattern": "^[0-9]+$"}}}}}},
                      "400": _error("Last-Event-ID is not an event id."),
                      "404": _error("No such job for this caller."),
                      "429": _error("TWIN_MAX_EVENT_STREAMS streams are open.", retry_after=True),
                      **owned}}}


def _job_paths(s: Settings, c: dict) -> dict[str, Any]:
    job_id, owned = c["job_id"], c["owned"]
    return {
        "/status/{job_id}": {"get": {
            "operationId": "status", "parameters": [job_id],
            "responses": {"200": {"description": "The job.", "content": {"application/json": {"schema": _ref("Job")}}},
                          "404": _error("No such job for this caller."), **owned}}},
        "/events/{job_id}": _events_path(job_id, owned),
        "/preview/{job_id}": {"get": {
            "operationId": "preview", "parameters": [job_id],
            "summary": "The latest live preview of a running job that asked for preview: true.",
            "responses": {"200": {"description": "A small JPEG of the forming image (header X-Preview-Step).",
                                  "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                          "404": _error("No such job for this caller, or no preview now."), **owned}}},
        "/cancel/{job_id}": {"post": {
            "operationId": "cancel", "parameters": [job_id],
            "responses": {"200": {"description": "Canceled (or stopping).",
                                  "content": {"application/json": {"schema": _ref("Job")}}},
                          "404": _error("No such job for this caller."),
                          "409": _error("The job already finished."), **owned}}},
        "/download/{job_id}/{filename}": {"get": {
            "operationId": "download",
            "parameters": [job_id,
                           {"name": "filename", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": OUTPUT_NAME_RE.pattern}},
                           {"name": "inline", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["0", "1"]}}],
            "responses": {"200": {"description": "The PNG (or, for *.thumb.jpg, its JPEG thumbnail).",
                                  "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                              "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                          **({"302": {"description": f"TWIN_DOWNLOAD_REDIRECT: a presigned URL of the file in the "
                                                     f"bucket, valid {s.presign_seconds} s (Location).",
                                      "headers": {"Location": {"schema": {"type": "string"}}}}}
                             if s.download_redirect else {}),
                          "404": _error("No such job or file for this caller."),
                          "503": _error("The storage bucket does not answer (storage_unavailable).", retry_after=True),
                          **owned}}},
    }


def _service_paths(c: dict) -> dict[str, Any]:
    id_param, owned = c["id_param"], c["owned"]
    return {
        "/sessions/{session_id}": {"get": session_get(c), "delete": {
            "operationId": "delete_session",
            "summary": "Delete a session: photos, crops, embeddings, identity, outputs and its job records.",
            "parameters": [{"name": "session_id", "in": "path", "required": True, "schema": id_param}],
            "responses": {"200": {"description": "Deleted.", "content": {"application/json": {"schema": _ref("Deleted")}}},
                          "404": _error("No such session for this caller."),
                          "503": _error("The storage bucket does not answer (storage_unavailable): nothing was "
                                        "deleted; send the request again.", retry_after=True), **owned}}},
        "/health": {"get": {"operationId": "health", "responses": {
            "200": {"description": "Always 200; state says whether the models are ready.",
                    "content": {"application/json": {"schema": _ref("Health")}}}}}},
        "/system-status": {"get": {"operationId": "system_status", "responses": {
            "200": {"description": "Model, device, queue and job counts; safety: the mode, the classifier, the "
                                   "term list, the C2PA signer (dev or configured), the watermark, the age gate.",
                    "content": {"application/json": {"schema": {"type": "object", "required": ["state", "queue", "jobs"]}}}}}}},
        "/styles": {"get": {"operationId": "styles", "responses": {
            "200": {"description": "The style library (styles/styles.json): each preset's template, negative and defaults.",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["default_style", "styles"], "properties": {
                            "default_style": {"type": "string"},
                            "styles": {"type": "array", "items": {
                                "type": "object", "required": ["name", "positive", "negative", "defaults"],
                                "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                                               "positive": {"type": "string"}, "negative": {"type": "string"},
                                               "defaults": {"type": "object"}}}}}}}}}}}},
    }


def _model_paths() -> dict[str, Any]:
    return {
        "/models": {"get": {"operationId": "models", "responses": {
            "200": {"description": "Base models available locally (the diffusers folder and every single-file "
                                   "checkpoint under TWIN_MODEL_DIR/checkpoints/) and the active one. Cluster mode: "
                                   "the union of the live GPU workers' models, `active` lists the models loaded on "
                                   "them, `workers` says which worker holds which (and its load state).",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["active", "models"], "properties": {
                            "active": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                            "models": {"type": "array", "items": {
                                "type": "object", "required": ["name", "kind", "active"],
                                "properties": {"name": {"type": "string"},
                                               "family": _nullable({"type": "string",
                                                                    "description": "sdxl | flux"}),
                                               "kind": {"type": "string", "enum": ["diffusers-folder", "single-file"]},
                                               "file": _nullable({"type": "string"}),
                                               "active": {"type": "boolean"},
                                               "workers": {"type": "array", "items": {"type": "string"}}}}},
                            "workers": {"type": "array", "items": {
                                "type": "object", "required": ["name", "model", "state"],
                                "properties": {"name": {"type": "string"}, "model": _nullable({"type": "string"}),
                                               "family": _nullable({"type": "string"}),
                                               "state": {"type": "string", "enum": ["idle", "loading", "failed"]},
                                               "target": {"type": "string"}, "error": {"type": "string"}}}}}}}}},
            "503": _error("The model is still loading.", retry_after=True)}}},
        "/loras": {"get": {"operationId": "loras", "responses": {
            "200": {"description": "Every style LoRA of the LoRA folder, its family (sdxl | flux; null: its keys "
                                   "name neither) and whether the active model loaded it (the `lora` request "
                                   "field's values: a LoRA of another family is a 400 naming both).",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["loras"],
                        "properties": {"loras": {"type": "array", "items": {
                            "type": "object", "required": ["name", "family", "loaded"],
                            "properties": {"name": {"type": "string"}, "family": _nullable({"type": "string"}),
                                           "loaded": {"type": "boolean"}}}}}}}}},
            "503": _error("The model is still loading.", retry_after=True)}}},
    }


def _models_load_path() -> dict[str, Any]:
    return {
        "/models/load": {"post": {
            "operationId": "loadModel",
            "description": "Admin only (TWIN_ADMIN_KEYS): load a base model beside the active one and switch to "
                           "it between jobs, then free the old one. Jobs that name another `model` fail with "
                           "model_not_loaded; jobs without `model` run on the active one and report it. Cluster "
                           "mode: every live GPU worker that has the model (or those in `workers`) does so and "
                           "answers for itself; the API waits up to TWIN_MODEL_LOAD_WAIT_SECONDS.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["model"], "additionalProperties": False,
                "properties": {"model": {"type": "string", "minLength": 1},
                               "workers": {"type": "array", "minItems": 1, "items": {"type": "string"},
                                           "description": "Cluster mode: the GPU workers to switch (GET /models "
                                                          "lists them); default every live worker with the model."}}}}}},
            "responses": {
                "200": {"description": "Switched (or already active). Local mode: one answer for the process; "
                                       "cluster mode: `workers` is a list of per-worker answers.",
                        "content": {"application/json": {"schema": {
                    "type": "object", "required": ["model"], "properties": {
                        "model": {"type": "string"}, "previous": {"type": "string"}, "switched": {"type": "boolean"},
                        "load_s": {"type": "number"}, "swap_wait_s": {"type": "number"}, "swap_s": {"type": "number"},
                        "workers": {"oneOf": [{"type": "integer"}, {"type": "array", "items": {
                            "type": "object", "required": ["name", "ok"], "properties": {
                                "name": {"type": "string"}, "model": _nullable({"type": "string"}),
                                "previous": _nullable({"type": "string"}), "ok": {"type": "boolean"},
                                "swap_s": {"type": "number"}, "pending": {"type": "boolean"},
                                "error": {"type": "object"}}}}]},
                        "pending": {"type": "array", "items": {"type": "string"}},
                        "queued": {"type": "object", "description": "Local mode, after a switch: the queued jobs "
                                   "that will run on the new model (no `model` field) and those pinned to "
                                   "another model (they fail with model_not_loaded unless it is loaded back "
                                   "before they start).", "properties": {
                                       "run_on_new_model": {"type": "array", "items": {"type": "string"}},
                                       "pinned_elsewhere": {"type": "array", "items": {"type": "string"}}}}}}}}},
                "202": {"description": "Cluster mode: some workers were still loading when the wait ended "
                                       "(`pending` names them); they switch when done."},
                "400": _error("The body is not {\"model\": name}."),
                "401": _error("API keys are on and the key is missing or unknown."),
                "403": _error("Not an admin key, or TWIN_ADMIN_KEYS is not set."),
                "404": _error("No local base model of that name (unknown_model); cluster mode: no live worker of a "
                              "name in `workers` (unknown_worker)."),
                "422": _error("The checkpoint failed to load (model_load_failed, the file named); the old model keeps serving."),
                "503": _error("The model is still loading.", retry_after=True)}}},
    }


# --- twin studio (POST /sessions/<id>/train, GET /sessions/<id>, GET /sessions/<id>/lora) ------------------

def _train_request(s: Settings) -> dict[str, Any]:
    from utils.engine.training import TRAIN_FIELDS
    return object_schema(TRAIN_FIELDS, s, description="A twin LoRA training of the session's accepted selfies; "
                         "every field is optional. Unknown fields are refused.",
                         extra_properties={f.name: f.schema(s) for f in WEBHOOK_FIELDS})


def _session_schema() -> dict[str, Any]:
    twin = {"type": "object", "required": ["state"], "properties": {
        "state": {"type": "string", "enum": ["none", "queued", "training", "ready", "unsupported"]},
        "job_id": _nullable({"type": "string"}), "token": {"type": "string"},
        "steps": _nullable({"type": "integer"}), "rank": _nullable({"type": "integer"}),
        "trained_at": _nullable({"type": "number"}), "base_model": _nullable({"type": "string"}),
        "family": _nullable({"type": "string"}), "identity_model": _nullable({"type": "string"}),
        "loss_final": _nullable({"type": "number"}), "lora_bytes": _nullable({"type": "integer"}),
        "ready": {"type": "boolean"}}}
    return {"type": "object", "required": ["session_id", "kind", "created_at", "selfies", "identity", "twin_model"],
            "properties": {"session_id": {"type": "string"}, "kind": {"type": "string", "enum": ["selfies", "persona"]},
                           "created_at": {"type": "number"}, "selfies": {"type": "object"},
                           "identity": {"type": "object"}, "self_similarity": _nullable({"type": "number"}),
                           "twin_model": twin}}


def _twin_paths(s: Settings, c: dict) -> dict[str, Any]:
    owned, limited = c["owned"], c["limited"]
    sid = {"name": "session_id", "in": "path", "required": True, "schema": c["id_param"]}
    return {
        "/sessions/{session_id}/train": {"post": {
            "operationId": "train_twin", "parameters": [sid, c["idem_key"]],
            "summary": "Queue a twin LoRA training of one of the caller's sessions (a job of kind train: "
                       "/status, /events with step, steps and loss, /cancel as any job).",
            "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("TrainRequest")}}},
            "responses": {
                "202": {"description": "Queued.", "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": _ref("Job")}}},
                "400": _error("Invalid body or values (the message names the field); a persona session (no_selfies)."),
                "404": _error("No such session for this caller."),
                "409": _error("The session is training already (training_running), the engine cannot train "
                              "(training_not_supported), or this Idempotency-Key is in flight."),
                "413": _error(f"Body over {s.max_json_kb:g} kB."), "415": _error("Not application/json."),
                "422": _error("The Idempotency-Key was used with a different body."),
                "501": _error("The storage backend cannot hold twin LoRAs (twin_storage_unsupported: S3)."),
                "507": _error("The data disk is full."), **owned, **limited,
                "503": _error("The models are still loading (not_ready).", retry_after=True)}}},
        "/sessions/{session_id}/lora": {"get": {
            "operationId": "download_twin_lora", "parameters": [sid],
            "summary": "The session's trained twin LoRA (diffusers' load_lora_weights layout).",
            "responses": {"200": {"description": "twin_lora.safetensors",
                                  "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}},
                          "404": _error("No such session for this caller, or no trained LoRA (no_twin_lora)."),
                          "501": _error("The storage backend cannot hold twin LoRAs."), **owned}}},
    }


def session_get(c: dict) -> dict[str, Any]:
    """GET /sessions/{session_id}, beside the DELETE of the same path."""
    return {"operationId": "get_session",
            "summary": "The caller's session: accepted selfies, identity files and the twin LoRA's state.",
            "parameters": [{"name": "session_id", "in": "path", "required": True, "schema": c["id_param"]}],
            "responses": {"200": {"description": "The session.",
                                  "content": {"application/json": {"schema": _ref("Session")}}},
                          "404": _error("No such session for this caller."), **c["owned"]}}
