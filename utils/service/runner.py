"""The one job runner: candidates -> ranking -> restoration -> outputs, for every caller.

Local mode's job threads and cluster mode's GPU workers call ``JobRunner.run_job`` with a job record;
the command line (``python generate_twin.py``) calls ``JobRunner.produce`` with a request and a folder.
Both go through ``produce``, so best-of-N, restoration, scores, output names, the safety check and the
provenance of every file are one code path; only where the files go differs (an ``OutputSink``: the
session's storage + the job store, or a folder). The safety guard (utils/contracts.py ``OutputSafety``,
built in utils/service/wiring.py) judges every candidate before anything is written (a blocked image is
never encoded, stored or served) and turns each kept image into the bytes written: watermarked and
C2PA-signed, the same for outputs, raw outputs and thumbnails.
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
from utils.service import output_safety as osafe
from utils.storage import atomic_write_bytes, output_name, raw_output_name, thumbnail_name

log = logging.getLogger("twin.runner")
Progress = Callable[..., None]          # (step, total[, preview_jpeg])
ShouldCancel = Callable[[], bool]


class OutputSink(Protocol):
    """Where a run's images go. ``save`` writes one file's bytes (already signed) under ``name`` and returns
    the path to record; ``add`` records a finished output (all its files exist); ``remove`` deletes files of
    an output that was never recorded; ``check`` raises when the run must stop writing (its session was
    deleted). ``thumbnail_side``: the JPEG thumbnail's side, None for no thumbnails."""

    thumbnail_side: int | None

    def save(self, name: str, data: bytes) -> str: ...
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

    thumbnail_side = None

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.outputs: list[dict] = []

    def save(self, name: str, data: bytes) -> str:
        path = self.folder / name
        atomic_write_bytes(path, data)
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

    def __init__(self, faces, restorer: Callable[[], Any], safety) -> None:
        self.faces = faces
        self._restorer = restorer     # the face restorer, built once the models are known (None until then)
        self.safety = safety          # an OutputSafety, set up by the process that runs jobs

    def produce(self, engine, req, likeness: Likeness, sink: OutputSink, on_progress: Progress,
                should_cancel: ShouldCancel, gate=None) -> dict:
        """Generate ``req.candidates`` (default num_images) images, judge each with the safety check (in the
        mode the session's age ``gate`` leaves), keep the num_images most alike of those not blocked (best
        first), restore faces if asked, write each kept output through ``sink``, signed. A blocked image is
        a rejected candidate (best-of-N) or an output entry with no file. Returns the metadata."""
        keep = int(req.num_images)
        total = int(req.candidates or keep)
        restore = req.restore_faces
        if total > keep and likeness.has_identity and likeness.template is None:   # before any GPU time is spent
            raise errors.TwinError(f"best-of-N (candidates={total}) needs a face template of the selfies, which "
                                   "is missing; upload them again", code="no_template", http_status=409)
        t_gen = time.perf_counter()
        images, seeds, result_meta = generate_candidates(engine, req, total, on_progress, should_cancel)
        t_check = time.perf_counter()
        if should_cancel():
            raise errors.JobCanceled("canceled by the user")
        screened = osafe.screen(self.safety, images, gate)
        t_write = time.perf_counter()
        order, candidates, scores, ranking = self._choose(images, seeds, screened, likeness, keep, should_cancel)
        encoder = osafe.SignedEncoder(self.safety, osafe.generator_for(engine, req))
        restore_s = 0.0
        for rank, ci in enumerate(order, start=1):
            sink.check()
            if should_cancel():
                raise errors.JobCanceled("canceled by the user")
            verdict = screened.verdicts[ci]
            if verdict.blocked:   # never encoded nor written: the entry says so, with nothing to download
                sink.add(osafe.blocked_entry(rank, seeds[ci], images[ci], verdict))
                log.info("output blocked", extra={"output": rank, "safety": verdict.to_json()})
                continue
            output = {"filename": output_name(rank), "seed": int(seeds[ci]), "width": images[ci].width,
                      "height": images[ci].height}
            if candidates is not None:
                output["candidate"] = ci + 1
            osafe.mark(output, verdict)
            restore_s += self._write_output(req, images[ci], output, rank, likeness,
                                            scores[ci] if candidates is not None else None, sink, encoder)
            log.info("output stored", extra={"output": rank, "safety": output["safety"]})
        metadata = _json_safe(result_meta) or {}
        if candidates is not None:
            metadata["candidates"], metadata["ranking"] = candidates, ranking
        metadata["service_timings"] = {"generate_s": round(t_check - t_gen, 4),
                                       "safety_s": round(t_write - t_check, 4),
                                       "write_outputs_s": round(time.perf_counter() - t_write, 4),
                                       "provenance_s": round(encoder.seconds, 4)}
        if restore:
            metadata["service_timings"]["restore_s"] = round(restore_s, 4)
        return metadata

    def _choose(self, images, seeds, screened: "osafe.Screened", likeness: Likeness, keep: int,
                should_cancel: ShouldCancel):
        """Which candidates become outputs, in order: every image without best-of-N (a blocked one becomes
        an entry with no file); with best-of-N, the ``keep`` best of those not blocked (blocked candidates
        count as rejected). Returns (order, candidate table or None, scores, ranking or None)."""
        total = len(images)
        scores: list = [None] * total
        if total <= keep:
            return list(range(total)), None, scores, None
        allowed = screened.allowed
        kept_n = min(keep, len(allowed))
        if not likeness.has_identity:
            order, ranking = allowed[:kept_n], not_ranked(keep, total)
        else:
            local, _, local_scores = rank_candidates(self.faces, [images[i] for i in allowed],
                                                     [seeds[i] for i in allowed], likeness.template, kept_n,
                                                     should_cancel)
            order = [allowed[i] for i in local]
            for i, score in zip(allowed, local_scores):
                scores[i] = score
            ranking = {"ranked": True, "note": f"kept the {kept_n} of {total} candidates most like the session's "
                                               "selfies, best first"}
        candidates = candidate_table(seeds, scores, order)
        for row, verdict in zip(candidates, screened.verdicts):
            row["safety"] = verdict.to_json()
        if screened.blocked:
            ranking["note"] += (f"; {screened.blocked} candidate{'s were' if screened.blocked != 1 else ' was'} "
                                "blocked by the safety check (rejected, not stored)")
        return order, candidates, scores, ranking

    def _write_output(self, req, image, output: dict, rank: int, likeness: Likeness, score, sink, encoder) -> float:
        """Score or restore one kept image, write its files, record it. Returns the seconds restoring took."""
        written: list[str] = []
        t0 = time.perf_counter()
        restored_s = 0.0
        try:
            if req.restore_faces:
                image = self.restore(req, image, output, rank, likeness.template, sink, written, encoder)
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
            output["path"] = sink.save(output["filename"], encoder.png(image))
            written.append(output["path"])
            if sink.thumbnail_side:
                output["thumbnail_path"] = sink.save(thumbnail_name(output["filename"]),
                                                     encoder.thumbnail(image, sink.thumbnail_side))
                written.append(output["thumbnail_path"])
            sink.add(output)
        except BaseException:
            sink.remove(written)  # not recorded -> not served; do not keep it on a full volume
            raise
        return restored_s

    def restore(self, req, image, output: dict, rank: int, template, sink: OutputSink, written: list, encoder):
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
        raw_path = sink.save(raw_name, encoder.png(image))
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
