"""The one job status vocabulary both backends speak, and the one mapping of a failure to what a failed
job records (used by the local job threads and the cluster's GPU worker alike)."""
from __future__ import annotations

import enum
from types import MappingProxyType

from utils import errors


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


TERMINAL = tuple(s.value for s in JobStatus if s.terminal)

# What a job canceled by its user records, in every place that cancels one: finish(..., **CANCELED_BY_USER).
CANCELED_BY_USER = MappingProxyType({"code": "canceled", "message": "canceled by the user"})


def failure_outcome(exc: BaseException, oom: bool) -> tuple[str, str]:
    """(error code, message) a failed job records: the TwinError's own, OOM's, or a generic one."""
    if isinstance(exc, errors.TwinError):
        return exc.code, exc.message
    if oom:
        return "out_of_memory", "the GPU ran out of memory; try fewer images or a smaller size"
    return "internal_error", "generation failed because of an internal error"
