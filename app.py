"""The Flask API: ``create_app`` builds the service's Runtime from the settings (utils/service/wiring.py)
and registers the blueprints of utils/api/ and the one error handler, which turns every failure into
``{"error": {"code", "message"}}``.

Production: ``gunicorn -c gunicorn.conf.py 'app:create_app()'`` (one worker process, gthread threads:
the models and the job threads live in that one process). Development: ``python app.py``.
"""
from __future__ import annotations

import logging
import sys

from flask import Flask, request

from utils import errors
from utils.api import error_handler, hooks, jobs, meta, models, security, sessions
from utils.api.openapi import build_spec
from utils.cli.storage import check_storage_command
from utils.config import Settings
from utils.logging import configure_logging
from utils.service import wiring

log = logging.getLogger("twin.app")


def create_app(settings: Settings | None = None, *, generator=None, faces=None, idempotency_store=None,
               safety=None) -> Flask:
    """``generator`` (one engine or a list), ``faces``, ``idempotency_store``, ``safety``: test doubles, else
    built from the settings."""
    settings = settings or Settings.from_env()
    if _resolving_a_flask_command():
        return command_line_app(settings)
    configure_logging(settings.log_level)
    # Request threads must get the GIL back quickly while a job thread runs Python-heavy pipeline code.
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    security.check_start(settings)
    styles = wiring.style_catalogue(settings)  # read now: a broken style file stops start-up, naming the line
    engines = None if generator is None else list(generator) if isinstance(generator, (list, tuple)) else [generator]
    app = Flask(__name__)
    configure_flask(app, settings)
    limiter = security.rate_limiter(app, settings)
    runtime = wiring.build_runtime(settings, engines=engines, faces=faces, safety=safety)
    app.extensions["twin"] = runtime
    runtime.start()
    idem = idempotency_store or wiring.build_idempotency(settings, runtime.store)
    runtime.sessions.deleted_hooks.append(idem.forget_session)
    app.extensions["twin_idempotency"] = idem
    app.extensions["twin_limiter"] = limiter
    app.before_request(hooks.start_request)
    app.after_request(hooks.finish_request)
    app.register_error_handler(Exception, error_handler.handle_error)
    app.extensions["twin_settings"] = settings
    app.cli.add_command(check_storage_command)
    for bp in (sessions.blueprint(limiter, settings), jobs.blueprint(limiter, settings),
               models.blueprint(limiter, settings), meta.blueprint(settings, styles, build_spec(settings))):
        app.register_blueprint(bp)
    return app


def command_line_app(settings: Settings) -> Flask:
    """What ``flask --app app <command>`` gets: the commands and the settings, no Runtime (no job thread,
    no model, no recovery of the job database: a preflight must not touch a live server's jobs)."""
    app = Flask(__name__)
    app.extensions["twin_settings"] = settings
    app.cli.add_command(check_storage_command)
    return app


def _resolving_a_flask_command() -> bool:
    """True while the ``flask`` command line loads the app to find one of its commands (``check-storage``,
    ``--help``): create_app is then called inside the FlaskGroup's own click context. ``flask run`` and
    gunicorn load the app elsewhere and get the whole service."""
    import click
    from flask.cli import FlaskGroup
    ctx = click.get_current_context(silent=True)
    return ctx is not None and isinstance(ctx.command, FlaskGroup)


def configure_flask(app: Flask, settings: Settings) -> None:
    # Werkzeug enforces the whole-request limit before a byte is parsed (-> 413).
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_upload_mb * 1024 * 1024)
    app.config["MAX_FORM_PARTS"] = settings.max_selfies + 16
    app.json.sort_keys = False
    # "/download//etc/passwd" (a decoded %2f) must be a plain 404, not a 308 redirect to a cleaned-up path.
    app.url_map.merge_slashes = False
    if settings.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    if settings.cors_origin_list:
        from flask_cors import CORS
        CORS(app, origins=settings.cors_origin_list, supports_credentials=True,
             expose_headers=["Retry-After", "Location", "X-Request-Id"])


if __name__ == "__main__":  # development only; production runs gunicorn (start_app.sh)
    _settings = Settings.from_env()
    create_app(_settings).run(host=_settings.host, port=_settings.port, threaded=True, use_reloader=False)
