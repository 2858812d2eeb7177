"""Jobs: the SQLite store and worker threads (``store``), the generator child process
(``generator_process``) and graceful stop (``lifecycle``).

The store's names are re-exported here because every layer above speaks them (``JobStatus`` is the one
status vocabulary); the process and lifecycle modules are imported by name where they are needed.
"""
from utils.jobs.store import JobManager, JobStatus, JobStore, job_json

__all__ = ["JobManager", "JobStatus", "JobStore", "job_json"]
