"""Cluster mode's job backend (TWIN_QUEUE_URL): API nodes and GPU workers share Redis.

``connection`` (the Redis client and its outage -> 503 translation), ``store`` (RedisJobStore),
``routing`` (RQ queues and ``enqueue``), ``queue`` (RqJobQueue: the API node's side), ``maintenance``
(the lock-guarded housekeeping thread), ``registry`` (which GPU worker holds which base model;
ModelControl), ``worker`` (the GPU worker process: TwinWorker, ``perform``), ``events``
(RedisEventLog) and ``idempotency`` (RedisIdempotencyStore). Imported only in cluster mode: every
module here needs ``redis`` and most need ``rq``.
"""
