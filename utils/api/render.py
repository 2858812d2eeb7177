"""The one JSON shape of a job and of its outputs, as every endpoint (and every live event) shows them:
the API's concern, since it names download URLs; the stores keep records and paths only."""
from __future__ import annotations

import time
from typing import Callable

from utils.contracts import JobStore
from utils.storage import thumbnail_name


def job_json(job: dict, store: JobStore, *, url_for_output: Callable[[str, str], str],
             status_url: str | None = None) -> dict:
    """The one JSON shape of a job, used by every endpoint that returns a job."""
    step, total = job["step"], job["total"]
    fraction = (step / total) if total else (1.0 if job["status"] == "succeeded" else 0.0)
    eta = None
    if job["status"] == "running" and job["started_at"] and step > 0 and total:
        elapsed = time.time() - job["started_at"]
        eta = round(elapsed / step * (total - step), 2)
    elif job["status"] == "succeeded":
        eta = 0.0
    error = {"code": job["error_code"], "message": job["error_message"]} if job["error_code"] else None
    return {
        "id": job["id"],
        "job_id": job["id"],
        "status": job["status"],
        # generate | train (a twin LoRA training, POST /sessions/<id>/train): one shape for both kinds.
        "kind": (job["request"] or {}).get("kind", "generate"),
        # Runs of this job so far (1 once it started; 2+ when a GPU worker died and it ran again).
        "attempt": job.get("attempts", 0),
        "session_id": job["session_id"],
        "position": store.position(job),
        "progress": {"step": step, "total": total, "fraction": round(fraction, 4), "eta_seconds": eta},
        "created_at": _iso(job["created_at"]),
        "started_at": _iso(job["started_at"]),
        "finished_at": _iso(job["finished_at"]),
        "request": job["request"],
        "outputs": [public_output(job["id"], o, url_for_output) for o in job["outputs"]],
        "metadata": job["metadata"],
        "error": error,
        "status_url": status_url,
        # The webhook the job reports to and every delivery attempt so far (None: no webhook).
        "webhook": job.get("webhook"),
    }


def public_output(job_id: str, output: dict, url_for_output: Callable[[str, str], str]) -> dict:
    """An output entry as clients see it: download URLs (its file, its thumbnail, a restored output's raw
    original), never a stored server path. An image the safety check blocked has no file and no URL."""
    out = {k: v for k, v in output.items() if k not in ("path", "raw_path", "thumbnail_path")}
    if not output.get("filename"):
        return out
    out["url"] = url_for_output(job_id, output["filename"])
    if output.get("raw_filename"):
        out["raw_url"] = url_for_output(job_id, output["raw_filename"])
    if output.get("thumbnail_path"):
        out["thumbnail_url"] = url_for_output(job_id, thumbnail_name(output["filename"]))
    return out


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"

