"""The one job runner: candidates -> ranking -> restoration -> outputs, for every caller.

Local mode's job threads and cluster mode's GPU workers call ``JobRunner.run_job`` with a job record;
the command line (``python generate_twin.py``) calls ``JobRunner.produce`` with a request and a folder.
Both go through ``produce``, so best-of-N, restoration, scores and output names are one code path; only
where the files go differs (an ``OutputSink``: the session's storage + the job store, or a folder).
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from utils import errors
from utils.faces.likeness import batches, candidate_table, keep_best
from utils.storage import atomic_save_png, output_name, raw_output_name, thumbnail_name

log = logging.getLogger("twin.runner")
Progress = Callable[..., None]          # (step, total[, preview_jpeg])
ShouldCancel = Callable[[], bool]


class OutputSink(Protocol):
    """Where a run's images go. ``save`` writes one image under ``name`` and returns the path to record;
    ``add`` records a finished output (all its files exist); ``remove`` deletes files of an output that
    was never recorded; ``check`` raises when the run must stop writing (its session was deleted)."""

    thumbnails: bool

    def save(self, name: str, image, *, thumbnail: bool = False) -> str: ...
    def add(self, output: dict) -> None: ...
    def remove(self, written: list[str]) -> None: ...
    def check(self) -> None: ...


@dataclass
class Likeness:
    """What a run scores against: the session's face template and its selfies' own agreement.
    ``has_identity`` False: the job has no identity (identity='none'), so best-of-N keeps candidates in seed
    order, unranked, and no output gets a likeness score (restoration still runs)."""
    template: Any = None
    self_similarity: float | None = None
    has_identity: bool = True


class FolderSink:
    """The command line's sink: PNGs in a folder, outputs collected in a list (no thumbnails)."""

    thumbnails = False

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.outputs: list[dict] = []

    def save(self, name: str, image, *, thumbnail: bool = False) -> str:
        path = self.folder / name
        atomic_save_png(path, image)
        return str(path)

    def add(self, output: dict) -> None:
        self.outputs.append(output)

    def remove(self, written: list[str]) -> None:
        for p in written:
            Path(p).unlink(missing_ok=True)

    def check(self) -> None:
        return None


class JobRunner:
    """``produce``: make a request's images with an engine and write the kept ones through a sink."""

    def __init__(self, faces, restorer: Callable[[], Any]) -> None:
        self.faces = faces
        self._restorer = restorer     # the face restorer, built once the models are known (None until then)

    def produce(self, engine, req, likeness: Likeness, sink: OutputSink, on_progress: Progress,
                should_cancel: ShouldCancel) -> dict:
        """Generate ``req.candidates`` (default num_images) images, keep the num_images most alike (best
        first), restore faces if asked, write each kept output through ``sink``. Returns the metadata."""
        keep = int(req.num_images)
        total = int(req.candidates or keep)
        restore = req.restore_faces
        if total > keep and likeness.has_identity and likeness.template is None:   # before any GPU time is spent
            raise errors.TwinError(f"best-of-N (candidates={total}) needs a face template of the selfies, which "
                                   "is missing; upload them again", code="no_template", http_status=409)
        t_gen = time.perf_counter()
        images, seeds, result_meta = generate_candidates(engine, req, total, on_progress, should_cancel)
        t_write = time.perf_counter()
        if should_cancel():
            raise errors.JobCanceled("canceled by the user")
        candidates, scores, ranking = None, [None] * len(images), None
        order = list(range(len(images)))
        if total > keep and not likeness.has_identity:
            order = order[:keep]
            candidates, ranking = candidate_table(seeds, scores, order), not_ranked(keep, total)
        elif total > keep:
            order, candidates, scores = rank_candidates(self.faces, images, seeds, likeness.template, keep,
                                                        should_cancel)
            ranking = {"ranked": True, "note": f"kept the {keep} of {total} candidates most like the session's "
                                               "selfies, best first"}
        restore_s = 0.0
        for rank, ci in enumerate(order, start=1):
            sink.check()
            if should_cancel():
                raise errors.JobCanceled("canceled by the user")
            output = {"filename": output_name(rank), "seed": int(seeds[ci]), "width": images[ci].width,
                      "height": images[ci].height}
            if candidates is not None:
                output["candidate"] = ci + 1
            restore_s += self._write_output(req, images[ci], output, rank, likeness,
                                            scores[ci] if candidates is not None else None, sink)
        metadata = _json_safe(result_meta) or {}
        if candidates is not None:
            metadata["candidates"], metadata["ranking"] = candidates, ranking
        metadata["service_timings"] = {"generate_s": round(t_write - t_gen, 4),
                                       "write_outputs_s": round(time.perf_counter() - t_write, 4)}
        if restore:
            metadata["service_timings"]["restore_s"] = round(restore_s, 4)
        return metadata

    def _write_output(self, req, image, output: dict, rank: int, likeness: Likeness, score, sink) -> float:
        """Score or restore one kept image, write its files, record it. Returns the seconds restoring took."""
        written: list[str] = []
        t0 = time.perf_counter()
        restored_s = 0.0
        try:
            if req.restore_faces:
                image = self.restore(req, image, output, rank, likeness.template, sink, written)
                restored_s = time.perf_counter() - t0
            elif likeness.template is not None:
                output["identity_similarity"] = score if score is not None else score_image(
                    self.faces, image, likeness.template)
                if output["identity_similarity"] is None:
                    output["note"] = "no face was found in this image, so it has no likeness score"
            if not likeness.has_identity:
                output["identity_similarity"] = None   # no selfies: there is nothing to be alike to
            if "identity_similarity" in output and likeness.self_similarity is not None:
                output["self_similarity"] = likeness.self_similarity   # the reference the score is read against
            output["path"] = sink.save(output["filename"], image)
            written.append(output["path"])
            if sink.thumbnails:
                output["thumbnail_path"] = sink.save(thumbnail_name(output["filename"]), image, thumbnail=True)
                written.append(output["thumbnail_path"])
            sink.add(output)
        except BaseException:
            sink.remove(written)  # not recorded -> not served; do not keep it on a full volume
            raise
        return restored_s

    def restore(self, req, image, output: dict, rank: int, template, sink: OutputSink, written: list):
        """Restore every face of one output; keep the generated image as avatar_NNN_raw.png. Returns the
        image to save as the output (the original when no face was found)."""
        try:
            dets = self.faces.detect_faces(image)
        except Exception:  # noqa: BLE001 - restoration is best effort per image
            dets = []
        if not dets:
            output.update(restored=False, identity_similarity=None,
                          note="no face was found in this image: kept as generated, not restored")
            return image
        result = self._restorer().restore(image, dets, model=req.restore_model, fidelity=req.restore_fidelity)
        raw_name = raw_output_name(rank)
        raw_path = sink.save(raw_name, image)
        written.append(raw_path)
        output.update(restored=True, restore_model=req.restore_model, faces_restored=result.faces,
                      raw_filename=raw_name, raw_path=raw_path)
        if template is not None:
            output["identity_similarity"] = score_image(self.faces, result.image, template)
            output["identity_similarity_raw"] = score_image(self.faces, image, template)
        return result.image


def generate_candidates(engine, req, total: int, on_progress: Progress, should_cancel: ShouldCancel):
    """``total`` images in calls of at most engine.max_images_per_call; progress spans all of them."""
    plan = batches(total, int(engine.max_images_per_call))
    if len(plan) == 1 and total == req.num_images:
        calls = [(req, on_progress)]
    else:
        base = req.seed if req.seed is not None else secrets.randbelow(2**32 - 1 - total)
        calls = [(dataclasses.replace(req, num_images=count, seed=(base + offset) % 2**32),
                  _batch_progress(on_progress, b, len(plan))) for b, (offset, count) in enumerate(plan)]
    images: list = []
    seeds: list[int] = []
    meta = None
    for sub, progress in calls:
        if should_cancel():
            raise errors.JobCanceled("canceled by the user")
        try:
            result = engine.generate(sub, on_progress=progress, should_cancel=should_cancel)
        except BaseException as e:
            if not isinstance(e, errors.TwinError) and errors.is_oom(e):
                # Raised outside the engine's own handler: free the cached blocks so the next job starts clean.
                errors.empty_cuda_cache()
                raise errors.OutOfMemory("the GPU ran out of memory; try fewer images or a smaller size") from None
            raise
        images += list(result.images)
        seeds += [int(x) for x in result.seeds]
        meta = meta if meta is not None else result.metadata
    if meta is not None and len(calls) > 1:
        meta = dict(meta, seeds=seeds, num_images=len(images), generate_calls=len(calls))
    return images, seeds, meta


def score_image(faces, image, template) -> float | None:
    try:
        score = faces.identity_similarity(image, template)
    except Exception:  # noqa: BLE001 - a score is optional
        return None
    return None if score is None else round(float(score), 4)


def rank_candidates(faces, images, seeds, template, keep: int, should_cancel: ShouldCancel = lambda: False):
    """Best-of-N: score every candidate against the session template, keep the ``keep`` best. Returns
    (order of kept candidate indices, the candidate table, every score)."""
    scores: list[float | None] = []
    for image in images:
        if should_cancel():
            raise errors.JobCanceled("canceled by the user")
        scores.append(score_image(faces, image, template))
    order = keep_best(scores, keep)
    return order, candidate_table(seeds, scores, order), scores


def not_ranked(keep: int, total: int) -> dict:
    """Best-of-N of a job without an identity: nothing to rank by, so the first candidates are kept."""
    return {"ranked": False, "note": f"not ranked: identity='none' has no face to compare with; the first {keep} "
                                     f"of {total} candidates in seed order were kept"}


def _batch_progress(on_progress: Progress, batch: int, batches_: int) -> Progress:
    """Progress of one generate() call of several, reported as steps of the whole job (so the ETA
    covers every candidate)."""
    def report(step: int, total: int, *preview) -> None:
        on_progress(batch * total + step, batches_ * total, *preview)
    return report


def _json_safe(obj: Any) -> Any:
    import json
    if obj is None:
        return None
    try:
        return json.loads(json.dumps(obj, default=str))
    except Exception:  # noqa: BLE001
        return None
