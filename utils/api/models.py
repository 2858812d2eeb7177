"""GET /models, GET /loras, POST /models/load (admin only)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from utils import errors
from utils.api.auth import require_admin
from utils.api.context import json_response, runtime


def blueprint(limiter, settings) -> Blueprint:
    bp = Blueprint("models", __name__)

    @bp.get("/models")
    def list_models():
        rt = runtime()
        rt.require_ready()
        body = rt.models.catalogue()
        # Cluster mode adds each worker's model and load state (and "active" lists every loaded model).
        return jsonify({k: body[k] for k in ("active", "models", "workers") if k in body})

    @bp.get("/loras")
    def list_loras():
        rt = runtime()
        rt.require_ready()
        return jsonify({"loras": rt.models.catalogue()["loras"]})

    @bp.post("/models/load")
    def load_model():
        require_admin(request.headers, settings.api_key_list, settings.admin_key_list)
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or set(body) - {"model", "workers"} or "model" not in body:
            raise errors.InvalidRequest('the body must be {"model": "<name from GET /models>"} (cluster mode: '
                                        'optionally "workers": [names])')
        rt = runtime()
        rt.require_ready()
        answer = rt.models.load(body["model"], body.get("workers"))
        # Cluster mode: workers still loading when TWIN_MODEL_LOAD_WAIT_SECONDS ran out switch later.
        return json_response(202 if answer.get("pending") else 200, answer)

    return bp
