"""Idempotency-Key stores: latency of claim + complete + replay per key (SQLite vs Redis on a local
redis-server), and a two-connection race on 200 keys (each key must be claimed exactly once).
Run: python bench/bench_idempotency.py (needs redis-server on PATH)."""
import shutil, statistics, sys, tempfile, threading, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.redis_server import RedisServer
from utils.jobs.cluster.idempotency import RedisIdempotencyStore
from utils.jobs.local.idempotency import SqliteIdempotencyStore
tmp = Path(tempfile.mkdtemp())
srv = RedisServer(shutil.which("redis-server"), tmp / "redis").start()
stores = {"sqlite": SqliteIdempotencyStore(tmp / "jobs.db", 24), "redis": RedisIdempotencyStore(srv.client(), 24)}
N = 500
for name, st in stores.items():
    lat = []
    for i in range(N):
        t = time.perf_counter()
        st.begin("o", "generate", f"k{i}", "fp"); st.complete("o", "generate", f"k{i}", 202, {"id": f"j{i}"}, {}, f"s{i%10}")
        st.begin("o", "generate", f"k{i}", "fp")
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    print(f"{name}: claim+complete+replay per key: median {statistics.median(lat):.3f} ms, p95 {lat[int(.95*N)]:.3f} ms (N={N})")
# race: 2 "nodes" (two connections) x 200 keys, both threads claim the same keys at once
a, b = RedisIdempotencyStore(srv.client(), 24), RedisIdempotencyStore(srv.client(), 24)
claims = {"a": 0, "b": 0}
def run(n, st):
    for i in range(200):
        try:
            if st.begin("o", "generate", f"race{i}", "fp") is None: claims[n] += 1
        except Exception: pass
ts = [threading.Thread(target=run, args=x) for x in (("a", a), ("b", b))]
[t.start() for t in ts]; [t.join() for t in ts]
print("race 200 keys x 2 nodes: claims", claims, "total", sum(claims.values()))
srv.stop()
