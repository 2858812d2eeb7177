"""Jobs: what both backends share here (``status``: the status vocabulary and failure mapping;
``events``: live events; ``webhooks``; ``lifecycle``: graceful stop), the local backend in
``utils.jobs.local`` (SQLite store, job threads, generator process) and the cluster backend in
``utils.jobs.cluster`` (Redis store, RQ queue, GPU worker). Their contracts are declared in
``utils.contracts``; ``utils.services`` picks the backend from the settings.

Three kinds of worker, one word each: a *job thread* (a thread of the API process that runs local-mode
jobs, ``local.threads``), the *generator process* (the spawned child that runs the engine,
``local.generator_process``) and a *GPU worker* (cluster mode's RQ worker process, ``cluster.worker``).

Only the shared vocabulary is re-exported; every other name is imported from its module.
"""
from utils.jobs.status import JobStatus

__all__ = ["JobStatus"]
