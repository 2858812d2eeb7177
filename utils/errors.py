"""One error hierarchy for the whole service.

Every error a user can cause is a ``TwinError`` with a machine-readable ``code``, a human ``message``
that names the offending value, and the HTTP status the API answers with. The app's single error
handler turns it into ``{"error": {"code": ..., "message": ...}}``; the job thread (or GPU worker)
stores the same pair on a failed job. Anything that is not a ``TwinError`` is a bug and becomes a 500
``internal_error`` without leaking its text.
"""
from __future__ import annotations

from typing import Any


class TwinError(Exception):
    code = "error"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None,
                 details: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status
        self.details = details or {}
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class ConfigError(TwinError):
    """A setting is invalid; raised at start-up."""
    code = "invalid_setting"
    http_status = 500


class InvalidRequest(TwinError):
    code = "invalid_request"
    http_status = 400


class Forbidden(TwinError):
    code = "forbidden"
    http_status = 403


class Unauthorized(TwinError):
    code = "unauthorized"
    http_status = 401


class NotFound(TwinError):
    code = "not_found"
    http_status = 404


class Conflict(TwinError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(TwinError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMedia(TwinError):
    code = "unsupported_media_type"
    http_status = 415


class ImageRejected(TwinError):
    """A single uploaded file could not be used (not an image, corrupt, too many pixels...)."""
    code = "invalid_image"
    http_status = 400


class PromptRefused(TwinError):
    """A prompt, persona trait or style names explicit sexual content while a face identity is used
    (utils/safety/terms.py); the message names the matched term."""
    code = "prompt_refused"
    http_status = 400


class QueueFull(TwinError):
    code = "queue_full"
    http_status = 429

    def __init__(self, message: str, retry_after: int = 10, **kw: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kw)


class ServiceNotReady(TwinError):
    code = "not_ready"
    http_status = 503

    def __init__(self, message: str, retry_after: int = 5, **kw: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kw)


class ServerBusy(TwinError):
    """Too many uploads are being decoded at once (TWIN_MAX_CONCURRENT_UPLOADS): retry, not a failure."""
    code = "busy"
    http_status = 503

    def __init__(self, message: str, retry_after: int = 5, **kw: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kw)


class InsufficientStorage(TwinError):
    code = "insufficient_storage"
    http_status = 507


class StorageUnavailable(TwinError):
    """The storage backend (an S3 bucket) did not answer, throttled past its retries, or refused: retry
    later. Nothing half-written is left visible."""
    code = "storage_unavailable"
    http_status = 503

    def __init__(self, message: str, retry_after: int = 10, **kw: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kw)


class ModelWeightsMissing(TwinError):
    """Real weights were asked for but are not on disk; the message says what, where, and how to fetch."""
    code = "model_weights_missing"
    http_status = 503


class JobCanceled(TwinError):
    """Raised inside generate() when should_cancel() turns true; the job ends `canceled`."""
    code = "canceled"
    http_status = 409


class OutOfMemory(TwinError):
    code = "out_of_memory"
    http_status = 503


class IdempotencyKeyReused(TwinError):
    """An Idempotency-Key sent again with a different request (raised by both idempotency stores)."""
    code = "idempotency_key_reused"
    http_status = 422

    @classmethod
    def of(cls, key: str, endpoint: str) -> "IdempotencyKeyReused":
        return cls(f"Idempotency-Key={key[:60]!r} was used with a different request to /{endpoint}; "
                   "use a new key for a new request")


class IdempotencyInFlight(TwinError):
    """The first request with an Idempotency-Key is still being answered."""
    code = "idempotency_in_flight"
    http_status = 409

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})

    @classmethod
    def of(cls, key: str) -> "IdempotencyInFlight":
        return cls(f"the first request with Idempotency-Key={key[:60]!r} is still being answered; retry shortly")


def is_oom(exc: BaseException) -> bool:
    """``OutOfMemory`` or torch's ``OutOfMemoryError`` (checked without importing torch: an exception
    cannot be torch's before torch was imported, and importing it costs seconds)."""
    if isinstance(exc, OutOfMemory):
        return True
    import sys
    torch = sys.modules.get("torch")
    try:
        return torch is not None and isinstance(exc, torch.OutOfMemoryError)
    except Exception:  # noqa: BLE001 - a torch without OutOfMemoryError
        return False


def empty_cuda_cache() -> None:
    """After an out-of-memory error: give the cached GPU blocks back, so the next job starts clean (a no-op
    without torch or CUDA; torch is not imported here if nothing imported it yet)."""
    import sys
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
