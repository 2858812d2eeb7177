"""The base-model registry: GET /models, GET /loras, POST /models/load, and the ``model`` check at submit.

Local mode: the engines of this process (each loads beside, swaps between jobs). Cluster mode: the live
GPU workers' registry in Redis, through the job queue (``ModelRouting`` in utils/contracts.py).
"""
from __future__ import annotations

import time
from typing import Any

from utils import errors
from utils.contracts import ModelRegistry, ModelRouting


class Models:
    def __init__(self, settings, store, queue, engines: list) -> None:
        self.settings, self.store, self.queue, self.engines = settings, store, queue, engines

    @property
    def available(self) -> bool:
        """Whether GET /models and POST /models/load work here (clients ask for the catalogue only then)."""
        return self.settings.cluster or bool(self.engines and isinstance(self.engines[0], ModelRegistry))

    def catalogue(self) -> dict:
        if self.settings.cluster:
            return _routing(self.queue).models_catalogue()
        return _registry(self.engines).models_catalogue()

    def load(self, name: Any, workers: Any = None) -> dict:
        """Every engine loads ``name`` beside its model and switches between jobs (the first failure stops;
        the engines not reached keep theirs). Cluster mode: the live GPU workers (or those named in
        ``workers``) do it, each answering for itself."""
        if not isinstance(name, str) or not name.strip():
            raise errors.InvalidRequest(f"model={name!r} must be a base model name (GET /models)")
        if workers is not None and (not isinstance(workers, list) or not workers or len(workers) > 1000
                                    or not all(isinstance(w, str) and 0 < len(w) <= 200 for w in workers)):
            raise errors.InvalidRequest(f"workers={workers!r} must be a non-empty list of GPU worker names "
                                        "(GET /models lists them)")
        if self.settings.cluster:
            return _routing(self.queue).load_model(name, workers)
        if workers is not None:
            raise errors.InvalidRequest("workers is for cluster mode (TWIN_QUEUE_URL); this server has no "
                                        "GPU workers to name")
        _registry(self.engines)
        t0 = time.perf_counter()
        results = [g.load_model(name) for g in self.engines]
        out = dict(results[0])
        out["swap_s"] = round(time.perf_counter() - t0, 3)
        out["workers"] = len(results)
        if out.get("switched"):
            out["queued"] = self._queued_after_switch(name)
        return out

    def _queued_after_switch(self, active: str) -> dict[str, list[str]]:
        """Which queued jobs the switch touches: jobs without ``model`` run on the new one; jobs pinned
        to another model will fail with model_not_loaded unless it is loaded back before they start."""
        on_new, will_fail = [], []
        for job_id in self.store.queued_ids():
            job = self.store.get(job_id)
            want = ((job or {}).get("request") or {}).get("model")
            if want is None:
                on_new.append(job_id)
            elif want != active:
                will_fail.append(job_id)
        return {"run_on_new_model": on_new, "pinned_elsewhere": will_fail}


def check_model(queue, engines: list, want: str, cluster: bool) -> None:
    """A job pinned to ``want``: unknown -> 400 unknown_model, not loaded -> 409 model_not_loaded."""
    if cluster:
        _routing(queue).check_model(want)    # the live workers' catalogues and models, in Redis
        return
    if not engines or not isinstance(engines[0], ModelRegistry):
        return
    cat = engines[0].models_catalogue()
    names = [m["name"] for m in cat["models"]]
    if want not in names:
        raise errors.InvalidRequest(f"model={want!r} is not a local base model; available: {', '.join(names)}",
                                    code="unknown_model")
    if want != cat["active"]:
        raise errors.InvalidRequest(f"model={want!r} is not loaded; the active base model is {cat['active']!r}",
                                    code="model_not_loaded", http_status=409)


def _registry(engines: list):
    if not engines or not isinstance(engines[0], ModelRegistry):
        raise errors.InvalidRequest("this generator has no model registry", code="not_supported", http_status=501)
    return engines[0]


def _routing(queue):
    if not isinstance(queue, ModelRouting):
        raise errors.InvalidRequest("this job queue does not route by base model", code="not_supported",
                                    http_status=501)
    return queue
