"""JSON-lines logging on stdout with request_id / session_id / job_id on every line.

The ids live in contextvars, so a request handler or a job worker sets them once and every log line
written below it carries them. Never log image data, embeddings or secrets: callers pass ids and
counts only.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from typing import Iterator

from pythonjsonlogger.json import JsonFormatter

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

_CONTEXT = {"request_id": request_id_var, "session_id": session_id_var, "job_id": job_id_var}


class ContextFilter(logging.Filter):
    """Copies the current ids onto each record (an explicit ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


_HANDLER_MARK = "_twin_json_handler"


def configure_logging(level: str = "INFO", stream=None) -> None:
    """Idempotent: installs one JSON handler on the root logger."""
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stdout)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(session_id)s %(job_id)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    ))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    # werkzeug's own access lines are plain text; gunicorn logs access itself.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Set request_id/session_id/job_id for the duration of a block."""
    tokens = [(_CONTEXT[k], _CONTEXT[k].set(v)) for k, v in ids.items() if k in _CONTEXT]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def set_context(**ids: str | None) -> None:
    for k, v in ids.items():
        if k in _CONTEXT:
            _CONTEXT[k].set(v)
