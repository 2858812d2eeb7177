"""GET /health, /system-status, /styles, /openapi.json, /test (the browser page) and /."""
from __future__ import annotations

from flask import Blueprint, jsonify, render_template

from utils.api.context import runtime
from utils.jobs.webhooks import WEBHOOK_FIELDS
from utils.request_fields import published_fields
from utils.service import status


def blueprint(settings, styles: dict, spec: dict) -> Blueprint:
    bp = Blueprint("meta", __name__)

    @bp.get("/health")
    def health():
        return jsonify(status.health(runtime()))

    @bp.get("/system-status")
    def system_status():
        body = status.system_status(runtime())
        if body.get("options"):  # the service's own request fields beside the generator's
            body["options"]["request_fields"] = {**body["options"].get("request_fields", {}),
                                                 **published_fields(WEBHOOK_FIELDS, settings)}
            body["options"]["webhooks"] = bool(settings.webhook_secret)
        return jsonify(body)

    @bp.get("/styles")
    def list_styles():
        return jsonify(styles)

    @bp.get("/openapi.json")
    def openapi():
        return jsonify(spec)

    @bp.get("/test")
    def test_page():
        return render_template("test.html")

    @bp.get("/")
    def index():
        return jsonify({"service": "digital-twin", "health": "/health", "test_page": "/test",
                        "openapi": "/openapi.json", "styles": "/styles"})

    return bp
