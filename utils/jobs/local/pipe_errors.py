"""Errors across the generator process's pipe: an exception in the child becomes a plain dict (pickled by
value), and the parent rebuilds the same TwinError class, code, message and HTTP status from it; anything
else is a bug whose text goes to the log, never to the client."""
from __future__ import annotations

import traceback
from typing import Any

from utils import errors


class GeneratorCrashed(errors.TwinError):
    """The generation child process died (killed, segfault, OOM-kill) during a call; it is restarted."""
    code = "worker_crashed"
    http_status = 503


def error_payload(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, errors.TwinError):
        return {"kind": "twin", "cls": type(exc).__name__, "message": exc.message, "code": exc.code,
                "http_status": exc.http_status, "details": exc.details, "headers": exc.headers}
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError outside generate()'s own handler
        return {"kind": "twin", "cls": "OutOfMemory", "message": "out of GPU memory in the generator process",
                "code": "out_of_memory", "http_status": 503, "details": {}, "headers": {}}
    return {"kind": "bug", "cls": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}


def rebuild_error(p: dict[str, Any]) -> BaseException:
    """Same class (when it is one of utils.errors' or this module's), code, message and HTTP status."""
    if p["kind"] == "twin":
        cls = getattr(errors, p["cls"], None) or (GeneratorCrashed if p["cls"] == "GeneratorCrashed" else None)
        if not (isinstance(cls, type) and issubclass(cls, errors.TwinError)):
            cls = errors.TwinError
        exc = cls.__new__(cls)
        # Subclass __init__s differ (QueueFull(retry_after=...)); the base one sets every field.
        errors.TwinError.__init__(exc, p["message"], code=p["code"], http_status=p["http_status"],
                                  details=p.get("details") or None, headers=p.get("headers") or None)
        return exc
    # Not a TwinError: a bug. Its text goes to the log via the job thread's traceback, never to the client.
    return RuntimeError(f"{p['cls']} in the generator process: {p['message']}\n{p.get('traceback', '')}")
