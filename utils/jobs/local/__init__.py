"""Local mode's job backend (no TWIN_QUEUE_URL): one API process runs its own jobs.

``store`` (SqliteJobStore: records in jobs.db), ``threads`` (JobThreads: the job threads),
``generator_process`` (GeneratorProcess: the engine in a spawned child) and ``idempotency``
(SqliteIdempotencyStore). Nothing here imports Redis or RQ.
"""
