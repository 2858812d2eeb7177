"""The contracts between the rooms, as ``typing.Protocol``s: what the service needs of an engine, a face
service, a job store, a job queue, an event log and an Idempotency-Key store. The implementations are
picked in one place, ``utils/service/wiring.py``; tests pass doubles that satisfy the same protocols
(tests/test_contracts.py checks both). This module imports nothing of the project: every room reads it.

Local mode and cluster mode implement each job-backend contract:

    JobStore          utils.jobs.local.store.SqliteJobStore       utils.jobs.cluster.store.RedisJobStore
    JobQueue          utils.jobs.local.threads.JobThreads         utils.jobs.cluster.queue.RqJobQueue
    EventLog          utils.jobs.events.MemoryEventLog            utils.jobs.cluster.events.RedisEventLog
    IdempotencyStore  utils.jobs.local.idempotency.SqliteIdempotencyStore
                                                                  utils.jobs.cluster.idempotency.RedisIdempotencyStore

Storage (sessions, identities, job files): ``Storage`` — utils.storage.local.LocalStorage (the data
folder, the default) and utils.storage.s3.S3Storage (a bucket; it also has ``PresignedDownloads`` and
``CachedReads``). The job database is not storage: jobs.db stays in TWIN_DATA_DIR in local mode, Redis
holds the records in cluster mode.

The engine side: ``Engine`` (utils.engine.generator.DigitalTwinGenerator, or a
utils.jobs.local.generator_process.GeneratorProcess running one in a child), its request class
(``GenerationRequestType``), ``ModelRegistry`` (an engine that switches base models), ``FamilyModel``
(one loaded base model of a family: utils/engine/families/), ``FluxIdentityMethod`` (what FluxModel asks of an
identity method), and ``FaceService`` (utils.faces.FaceService).

Each protocol lists only what callers use. A capability only one backend has is its own small protocol
(``Reachable``, ``ClusterStatus``, ``ClusterSingleton``, ``ModelRouting``), so a caller asks
``isinstance(x, ClusterStatus)`` instead of probing attribute names. All are ``runtime_checkable``:
``isinstance`` checks that the members exist; tests/test_contracts.py also checks their signatures.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

# listener(job_id, kind, data): kind "status" (data: the job record), "progress" ({step, total, at, + extra}),
# "output" (the output entry) or "deleted" ({}); called after each committed change of a job.
JobListener = Callable[[str, str, dict], None]


@runtime_checkable
class JobStore(Protocol):
    """Sessions and job records: the truth about every job, whichever process runs it."""

    listeners: list[JobListener]

    def close(self) -> None: ...

    # --- sessions ---
    def add_session(self, session_id: str, owner: str, created_at: float, kind: str = "selfies",
                    age_gate: dict | None = None) -> None:
        """``kind``: "selfies" (an upload) or "persona" (the session of one identity='none' job);
        ``age_gate``: {age_gate, age_gate_reason, median_apparent_age} from the upload (biometric: kept in
        this record only, deleted with it, never logged nor answered)."""

    def get_session(self, session_id: str) -> dict | None:
        """{id, owner, created_at, seq, kind, age_gate, age_gate_reason, median_apparent_age}, or None."""

    def latest_session(self, owner: str) -> dict | None:
        """The owner's most recent upload ("selfies" session); persona sessions are never picked."""

    def sessions_older_than(self, cutoff: float) -> list[str]: ...
    def delete_session_records(self, session_id: str) -> None: ...

    # --- jobs ---
    def create_job(self, job_id: str, *, session_id: str | None, owner: str, payload: dict,
                   request: dict, queue_max: int, webhook: dict | None = None) -> dict:
        """Insert a queued job unless the queue is full (``errors.QueueFull``)."""

    def get(self, job_id: str) -> dict | None: ...

    def position(self, job: dict) -> int | None:
        """1-based place among queued jobs; None once it is not waiting (claimed, finished)."""

    def queued_ids(self) -> list[str]: ...
    def active_ids_for_session(self, session_id: str) -> list[str]: ...
    def counts(self) -> dict[str, int]: ...

    def claim(self, job_id: str) -> bool:
        """queued -> running (attempt + 1); False when it was canceled or taken meanwhile."""

    def set_progress(self, job_id: str, step: int, total: int, extra: dict | None = None) -> None:
        """``extra``: what a job kind adds to its progress events (a training's loss and steps)."""
    def add_output(self, job_id: str, output: dict) -> None: ...
    def add_webhook_delivery(self, job_id: str, record: dict, keep: int = 50) -> None: ...

    def finish(self, job_id: str, status: Any, *, code: str | None = None, message: str | None = None,
               metadata: dict | None = None) -> bool:
        """Move a non-terminal job to a terminal state (never overwrites a terminal one)."""

    def cancel_queued(self, job_id: str) -> bool: ...

    def requeue(self, job_id: str) -> bool:
        """running -> queued for a graceful stop; the attempt is given back."""

    def recover(self, requeue: bool) -> dict[str, list[str]]:
        """Settle jobs that were running when the process died: {"requeued": [...], "failed": [...]}."""


@runtime_checkable
class Reachable(Protocol):
    """A store behind a network connection (cluster mode's Redis): /health asks whether it answers."""

    def ping(self) -> bool:
        """True, or ``errors.ServiceNotReady`` (503 queue_unavailable) when it does not answer."""


@runtime_checkable
class JobQueue(Protocol):
    """Gets queued jobs run: local mode's job threads, or the RQ queue that GPU workers work."""

    def start(self, requeue_interrupted: bool = False) -> dict[str, list[str]]: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def submit(self, job_id: str) -> None: ...

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or ask a running one to stop at its next step."""

    def depth(self) -> int: ...

    # --- graceful stop ---
    def begin_drain(self) -> None:
        """Start no new job (cheap and lock-free: it runs inside the SIGTERM handler)."""

    @property
    def draining(self) -> bool: ...

    def running_ids(self) -> list[str]:
        """Jobs this process is running now."""

    def drain(self, deadline: float, stop_wait: float = 5.0) -> dict[str, list[str]]:
        """Let running jobs finish until ``deadline``, then re-queue them: {"finished", "requeued"}."""


@runtime_checkable
class ClusterStatus(Protocol):
    """A queue worked by other machines: /system-status shows its backend, length and workers."""

    def cluster_status(self) -> dict[str, Any]: ...


@runtime_checkable
class ClusterSingleton(Protocol):
    """Work that several processes schedule but one should do per interval (the retention sweep)."""

    def acquire_singleton(self, name: str, ttl_s: float) -> bool:
        """True for exactly one caller in the cluster per ``ttl_s``."""


@runtime_checkable
class ModelRouting(Protocol):
    """A queue that routes jobs to workers by base model (GET /models, POST /models/load, pinned jobs)."""

    def models_catalogue(self) -> dict: ...

    def check_model(self, model: str) -> None:
        """4xx unless some live GPU worker holds (or is loading) ``model``."""

    def load_model(self, model: str, workers: list[str] | None = None) -> dict: ...

    def pinned_target(self, model: str) -> dict | None:
        """{family, variant, method_fields} of a live GPU worker holding ``model`` (None: none holds it yet)."""


@runtime_checkable
class EventLog(Protocol):
    """Live events of jobs (GET /events) and the latest preview of a running one (GET /preview)."""

    def publish(self, job_id: str, type_: str, data: dict[str, Any]) -> int | None:
        """Append an event; its id (dense per job, from 1), None when a progress event was dropped."""

    def read(self, job_id: str, after: int = 0, timeout: float = 0.0) -> list:
        """Events with id > after; waits up to ``timeout`` seconds for the first one."""

    def known(self, job_id: str) -> bool: ...

    def forget(self, job_id: str) -> None:
        """Drop a job's events and preview (its session was deleted)."""

    def set_preview(self, job_id: str, step: int, jpeg: bytes) -> None: ...
    def get_preview(self, job_id: str) -> tuple[int, bytes] | None: ...
    def drop_preview(self, job_id: str) -> None: ...

    def wake_all(self) -> None:
        """Wake blocked readers (the server is stopping)."""


@runtime_checkable
class IdempotencyStore(Protocol):
    """The Idempotency-Key records of POST /generate and POST /upload (per caller, endpoint and key)."""

    def begin(self, owner: str, endpoint: str, key: str, fp: str) -> tuple[int, dict, dict] | None:
        """None: go ahead (the key is now in flight); else (status, body, headers) to answer again.
        Raises ``KeyReused`` (another request) or ``InFlight`` (still being answered)."""

    def complete(self, owner: str, endpoint: str, key: str, status: int, body: dict, headers: dict,
                 session_id: str | None) -> None: ...

    def abandon(self, owner: str, endpoint: str, key: str) -> None:
        """The request failed: forget the key, so a retry runs again."""

    def forget_session(self, session_id: str) -> None: ...
    def close(self) -> None: ...

    def count(self) -> int:
        """Records kept (in flight or done)."""


# --- storage ------------------------------------------------------------------------------------------

@runtime_checkable
class Storage(Protocol):
    """Sessions, identities and job files, named by session, job and file name (never by a path the caller
    builds). A reference returned by ``save_output`` / ``put_init_image`` is what a job record keeps; it is
    valid in every process of the service (a folder path relative to the data folder, or a key relative to
    the bucket prefix). Reads that need a file (identities) return local paths: the file itself, or a
    cached copy of the object. Every failure of a bucket is ``errors.StorageUnavailable`` (503)."""

    backend: str            # "local" | "s3"

    def describe(self) -> dict:
        """What /system-status shows (backend; for a bucket its name, prefix, endpoint, cache usage)."""

    def ping(self) -> bool:
        """True, or ``errors.StorageUnavailable`` when the backend does not answer."""

    def require_space(self, need_bytes: int, what: str) -> None:
        """507 InsufficientStorage when a write of about ``need_bytes`` would fill the volume (a bucket: no-op)."""

    def write_session(self, session_id: str, *, owner_hash: str, files: list[tuple[str, bytes]], report: Any,
                      identity: Any = None, created_at: float | None = None,
                      self_similarity: float | None = None) -> Any:
        """Store an accepted upload whole, or nothing of it."""

    def write_persona_session(self, session_id: str, *, owner_hash: str, created_at: float) -> Any:
        """A persona session (one identity='none' job): meta.json only; no selfie, face feature or identity."""

    def session_faces(self, session_id: str) -> Any:
        """utils.storage.SessionFaces; NotFound when the session or its face features are gone."""

    def load_template(self, session_id: str) -> Any: ...
    def session_self_similarity(self, session_id: str) -> float | None: ...

    def identity_paths(self, session_id: str) -> list:
        """Local files of every identity of the session (the upload's first)."""

    def save_identity(self, session_id: str, identity: Any) -> None: ...

    def save_output(self, session_id: str, job_id: str, name: str, data: bytes) -> str:
        """Write one job file whole (finished, encoded bytes); returns the reference to record."""

    def remove(self, recorded: Any) -> None:
        """Delete job files that were written but never recorded."""

    def open_output(self, ref: str) -> Any:
        """A recorded job file for a download (utils.storage.StoredFile); NotFound when it is gone."""

    def put_init_image(self, session_id: str, job_id: str, data: bytes) -> str: ...
    def init_image(self, session_id: str, job_id: str) -> bytes | None: ...

    def twin_dir(self, session_id: str, run_id: str | None = None) -> Any:
        """Local folder of the session's twin LoRA files, or of one training run (checkpoints); a backend that
        cannot hold them raises a 501 TwinError."""

    def accepted_original(self, session_id: str, index: int) -> tuple[str, bytes] | None:
        """(file name, bytes) of accepted selfie ``index`` as uploaded, or None."""

    def delete_session(self, session_id: str) -> bool:
        """Delete every file of the session; returns once the backend confirms. False: there was none."""

    def clean_partial_files(self) -> int:
        """At start-up: remove what a killed process left half-written."""

    def session_ids(self) -> Any:
        """Every stored session (the retention sweep's view, records or not)."""

    def session_created_at(self, session_id: str) -> float: ...

    def probe(self) -> list[tuple[str, str | None]]:
        """Write, read and delete a probe: (step, None or what failed) (``flask --app app check-storage``)."""


@runtime_checkable
class PresignedDownloads(Protocol):
    """Storage that can hand a client a URL to fetch a file itself (TWIN_DOWNLOAD_REDIRECT=1)."""

    def download_url(self, ref: str, *, disposition: str, content_type: str, expires: int) -> str:
        """A URL valid ``expires`` seconds answering with these headers; NotFound when the file is gone."""


@runtime_checkable
class CachedReads(Protocol):
    """Storage that keeps local copies of what it read: a deleted session's copies must go from every node."""

    def cached_sessions(self) -> list[str]: ...
    def forget_cached(self, session_id: str) -> bool: ...


# --- the engine, its requests and identities ------------------------------------------------------------

@runtime_checkable
class GenerationRequestType(Protocol):
    """What the service needs of an engine's request class (utils.engine.request.GenerationRequest)."""

    num_images: int
    seed: int | None
    width: int | None
    height: int | None
    candidates: int | None
    restore_faces: bool
    restore_model: str
    restore_fidelity: float
    init_image: str | None
    model: str | None
    identity_source: str          # the JSON field "identity": "session" | "none" (no selfies)
    identity_mode: str            # auto | adapter | lora | both (a twin LoRA: utils/service/twins.py resolves it)

    @classmethod
    def from_dict(cls, payload: Any, settings: Any) -> "GenerationRequestType":
        """Validate a request body; errors.InvalidRequest names the offending field and value."""

    def check_session(self, faces: Any) -> None:
        """What the request names of its session must exist there (``faces``: storage.SessionFaces)."""

    def check_family(self, family: str, method_fields: Any = frozenset(), variant: str = "") -> None:
        """The fields given must apply to a model of ``family`` (and identity method): 400 naming them."""

    def with_identity(self, identity: Any) -> "GenerationRequestType": ...
    def with_twin(self, twin: Any, mode: str) -> "GenerationRequestType": ...
    def with_init_image(self, image: Any) -> "GenerationRequestType": ...
    def to_dict(self) -> dict: ...


@runtime_checkable
class Identity(Protocol):
    """A session's identity for one identity method and base model (utils.engine.identity.session)."""

    @property
    def cache_key(self) -> str:
        """What tells two identities of one session apart (the method and model they were built for)."""

    def save(self, path: Any) -> Any: ...

    @classmethod
    def load(cls, path: Any) -> "Identity": ...


@runtime_checkable
class Engine(Protocol):
    """Generates portraits: DigitalTwinGenerator in-process, or a GeneratorProcess running one in a child.

    ``setup`` loads the models once (an API node of a cluster never calls it); ``state`` is starting |
    warming (models loaded, warm-up / torch.compile running) | ready | setup_failed (| restarting for a
    generator process)."""

    state: str
    error: Any
    model_error: str | None
    request_type: type
    identity_type: type
    max_images_per_call: int

    def setup(self) -> Any: ...
    def close(self) -> None: ...
    def info(self) -> dict: ...

    def published_options(self) -> dict | None:
        """The request choices for clients (/system-status); None for an engine without published choices."""

    def build_identity(self, crops: Any, face_embeddings: Any = None, *, face_model: str | None = None,
                       combine: str | None = None, embedding_norms: Any = None, keypoints: Any = None,
                       keypoint_index: Any = None, crop_keypoints: Any = None) -> Any:
        """The identity of the accepted selfies for the active model (face inputs: see FaceService); None
        when the active model has no identity method (FLUX without infiniteyou)."""

    def check_identity(self, identity: Any) -> None:
        """errors.Conflict(code="identity_mismatch") when it was built for another method or model."""

    def validate(self, req: Any) -> dict:
        """The request against the active model (fields of its family and identity method, LoRA, pose): the
        service calls it at submit; generate() checks again. Returns the plan."""

    def generate(self, req: Any, on_progress: Callable[..., Any] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> Any:
        """on_progress(step, total[, preview_jpeg]) once per step; errors.JobCanceled within a step."""


@runtime_checkable
class Trainer(Protocol):
    """An engine that trains a session's twin LoRA on the modules it already holds (utils/engine/training/)."""

    def train(self, spec: Any, on_progress: Callable[..., Any] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> dict:
        """on_progress(step, total, None, {"loss"}) per optimiser step; errors.JobCanceled within one step.
        Returns the training record; the LoRA is in ``spec.work_dir``."""


@runtime_checkable
class ModelRegistry(Protocol):
    """An engine that can list and switch base models (GET /models, POST /models/load in local mode)."""

    def models_catalogue(self) -> dict: ...
    def load_model(self, name: str) -> dict: ...


@runtime_checkable
class Optimizable(Protocol):
    """A family model that applied the speed plan (utils/engine/speed) when it loaded: the engine warms its
    compiled shapes up in set-up (state "warming") and tells it when that is done. ``speed`` is a
    SpeedState (its to_json() is /system-status "optimizations"); FLUX is not Optimizable yet."""

    speed: Any

    def warmup_shapes(self) -> list:
        """(width, height, batch) to run in set-up with and without CFG: [] = one plain warm-up call."""
        ...

    def warmup_identity(self) -> Any:
        """An identity whose embeddings change nothing, to warm the identity path with a non-zero scale (a
        compiled graph specialises on the first scale it meets), or None."""
        ...


@runtime_checkable
class FamilyModel(Protocol):
    """One loaded base model of a family with its identity method (utils/engine/families/): what a
    generation call looks like for that family. The engine does seeds, progress, cancel and metadata."""

    family: str
    latent_rgb: Any
    models: Any
    adapter: Any

    @property
    def model_name(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def method_fields(self) -> frozenset: ...
    def info(self) -> dict: ...
    def build_identity(self, crops: Any, face_embeddings: Any, **inputs: Any) -> Any: ...
    def check_identity(self, identity: Any) -> None: ...
    def plan(self, req: Any) -> dict: ...
    def check_request(self, req: Any, plan: dict) -> None: ...
    def call_kwargs(self, req: Any, plan: dict, seeds: list[int]) -> dict: ...
    def run(self, req: Any, plan: dict, kwargs: dict, on_step_end: Callable, marks: dict) -> tuple[list, Any]: ...
    def preview_latents(self, latents: Any, plan: dict) -> Any: ...
    def call_metadata(self, req: Any, plan: dict) -> dict: ...


@runtime_checkable
class FluxIdentityMethod(Protocol):
    """An identity method for the FLUX family, as ``FluxModel(identity_method=...)`` holds it (the way SdxlModel
    holds its AdapterManager): InfiniteYou (utils/engine/identity/infiniteyou.py); without one FLUX runs without
    identity conditioning and says so.

    ``fields``: the request fields it reads (identity_strength, pose, pose_strength): they apply to the model
    only with a method that takes them. ``prepare`` runs under the family model's lock right before a call of
    a request that has an identity: it returns the pipeline to call (e.g. a ControlNet pipeline over the same
    components) and may add to ``kwargs`` (control image, scales); ``finish`` clears per-call state after it."""

    variant: str
    fields: frozenset

    def build_identity(self, crops: Any, face_embeddings: Any, **inputs: Any) -> Any: ...
    def check_identity(self, identity: Any) -> None: ...
    def prepare(self, pipe: Any, req: Any, plan: dict, kwargs: dict) -> Any: ...
    def finish(self, pipe: Any) -> None: ...


# --- faces ------------------------------------------------------------------------------------------

@runtime_checkable
class FaceService(Protocol):
    """Validates selfies and scores portraits (utils.faces.FaceService; backends dlib or InsightFace)."""

    backend_name: str

    def setup(self) -> None: ...

    def validate_selfies(self, files: list[tuple[str, bytes]]) -> Any:
        """A report: accepted / rejected / warnings / template / model_name, to_json(), identity_inputs()."""

    def identity_similarity(self, image: Any, template: Any) -> float | None: ...
    def self_similarity(self, embeddings: list) -> float | None: ...
    def detect_faces(self, image: Any) -> list: ...


@runtime_checkable
class OutputSafety(Protocol):
    """The safety check and provenance of every image the service writes (utils.safety.guard.SafetyGuard):
    one verdict per generated image, and the bytes to store (watermarked, C2PA-signed). Tests pass a guard
    built on a classifier double with injected scores."""

    def setup(self, *, profile: str, classifier: bool = True, signer: bool = True, age_gate: bool = False,
              device: str = "cpu", dtype: Any = None) -> Any: ...
    def load_terms(self) -> Any: ...
    def check_prompt(self, fields: Any) -> None: ...
    def judge(self, images: Any, gate: Any = None) -> list: ...
    def sign_png(self, image: Any, generator: Any, *, watermark: bool = True) -> bytes: ...
    def sign_jpeg(self, data: bytes, generator: Any) -> bytes: ...
    def status(self, *, age_gate: Any = None) -> dict: ...
