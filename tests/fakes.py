"""Test doubles that obey the contracts in docs/ARCHITECTURE.md exactly, so the service can be tested
without the generation and face engines.

- ``FakeGenerator``: setup()/state/info(), build_identity(), generate(req, on_progress, should_cancel)
  with one on_progress call per step and errors.JobCanceled within one step; returns PIL images of the
  requested size. It can be told to sleep per step, to fail set-up, or to raise from generate().
- ``FakeFaceService``: validate_selfies() -> a report with accepted/rejected in the documented shape.
  A file is rejected when it does not decode (``invalid_image``) or is one flat colour (``no_face``).
- ``CliFaceService``: the face double of the CLI tests: any decodable image is accepted, with seeded
  512-d embeddings (tests/test_generate_cli.py; a child process imports it from here).
- ``ScriptedSafetyClassifier``: utils.safety.classifier.SafetyClassifier that answers the scores it was
  given, one per image in turn (the last repeats), and records how many images it saw.
- ``fake_safety(settings, scores)``: the real SafetyGuard (term list, policy, watermark, C2PA signing) on a
  ScriptedSafetyClassifier, with one development signer per test process (``shared_signer``) so each app
  does not make its own CA.
"""
from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image, ImageStat

from utils import errors

ALLOWED_KEYS = {"prompt", "negative_prompt", "num_images", "seed", "width", "height", "aspect_ratio",
                "quality_mode", "identity_strength", "style", "lora", "lora_scale",
                "candidates", "restore_faces", "restore_model", "restore_fidelity", "identity", "persona",
                "attributes"}
ASPECTS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "16:9": (16, 9), "9:16": (9, 16)}
QUALITY_STEPS = {"fast": 4, "balanced": 6, "high_fidelity": 8}


@dataclass(frozen=True)
class FakeGenerationRequest:
    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    seed: int | None = None
    width: int = 64
    height: int = 64
    quality_mode: str = "balanced"
    identity_strength: float = 0.7
    style: str | None = None
    candidates: int | None = None
    restore_faces: bool = False
    restore_model: str = "gfpgan"
    restore_fidelity: float = 0.5
    identity: Any = None
    init_image: str | None = None       # img2img is the real engine's (the double has no init_image field)
    model: str | None = None            # FakeModelRequest accepts it
    identity_source: str = "session"    # the JSON field "identity": session | none
    persona: dict | None = None         # taken as given (the real request builds them into the prompt)
    attributes: dict | None = None
    identity_mode: str = "adapter"      # the double has no twin LoRA field: always the identity adapter
    twin: Any = None

    @classmethod
    def from_dict(cls, payload: dict, settings) -> "FakeGenerationRequest":
        unknown = sorted(set(payload) - ALLOWED_KEYS)
        if unknown:
            raise errors.InvalidRequest(f"unknown field(s): {', '.join(unknown)}")
        prompt = payload.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise errors.InvalidRequest(f"prompt={prompt!r} must be a non-empty string")
        if len(prompt) > settings.max_prompt_chars:
            raise errors.InvalidRequest(f"prompt has {len(prompt)} characters; the limit is {settings.max_prompt_chars}")
        neg = payload.get("negative_prompt", "")
        if not isinstance(neg, str) or len(neg) > settings.max_prompt_chars:
            raise errors.InvalidRequest(f"negative_prompt must be a string of at most {settings.max_prompt_chars} characters")
        n = payload.get("num_images", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4:
            raise errors.InvalidRequest(f"num_images={n!r} is not between 1 and 4")
        q = payload.get("quality_mode", "balanced")
        if not isinstance(q, str) or q not in QUALITY_STEPS:
            raise errors.InvalidRequest(f"quality_mode={q!r} is not one of {', '.join(QUALITY_STEPS)}")
        seed = payload.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise errors.InvalidRequest(f"seed={seed!r} is not a non-negative integer")
        w, h = payload.get("width", 64), payload.get("height", 64)
        if "aspect_ratio" in payload:
            ar = payload["aspect_ratio"]
            if not isinstance(ar, str) or ar not in ASPECTS:
                raise errors.InvalidRequest(f"aspect_ratio={ar!r} is not one of {', '.join(ASPECTS)}")
            a, b = ASPECTS[ar]
            w, h = (64 * a // max(a, b)) // 8 * 8, (64 * b // max(a, b)) // 8 * 8
        for name, v in (("width", w), ("height", h)):
            if not isinstance(v, int) or isinstance(v, bool) or v % 8 or not settings.min_image_side <= v <= settings.max_image_side:
                raise errors.InvalidRequest(f"{name}={v!r} must be a multiple of 8 between "
                                            f"{settings.min_image_side} and {settings.max_image_side}")
        s = payload.get("identity_strength", settings.default_identity_strength)
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 <= s <= 2:
            raise errors.InvalidRequest(f"identity_strength={s!r} is not between 0 and 2")
        c = payload.get("candidates")
        if c is not None and (not isinstance(c, int) or isinstance(c, bool) or not n <= c <= 8):
            raise errors.InvalidRequest(f"candidates={c!r} is not between num_images={n} and 8")
        restore = payload.get("restore_faces", settings.restore_default)
        if not isinstance(restore, bool):
            raise errors.InvalidRequest(f"restore_faces={restore!r} is not true or false")
        model = payload.get("restore_model", settings.restore_model)
        if model not in ("gfpgan", "codeformer", "gpen"):
            raise errors.InvalidRequest(f"restore_model={model!r} is not one of gfpgan, codeformer, gpen")
        fidelity = payload.get("restore_fidelity", 0.5)
        if not isinstance(fidelity, (int, float)) or isinstance(fidelity, bool) or not 0 <= fidelity <= 1:
            raise errors.InvalidRequest(f"restore_fidelity={fidelity!r} is not between 0 and 1")
        source = payload.get("identity", "session")
        if source not in ("session", "none"):
            raise errors.InvalidRequest(f"identity={source!r} is not one of session, none")
        for name in ("persona", "attributes"):
            if payload.get(name) is not None and not isinstance(payload[name], dict):
                raise errors.InvalidRequest(f"{name}={payload[name]!r} is not a JSON object")
        return cls(prompt=prompt, negative_prompt=payload.get("negative_prompt", ""), num_images=n, seed=seed,
                   width=w, height=h, quality_mode=q, identity_strength=float(s), style=payload.get("style"),
                   candidates=c, restore_faces=restore, restore_model=model, restore_fidelity=float(fidelity),
                   identity_source=source, persona=payload.get("persona"), attributes=payload.get("attributes"))

    def with_identity(self, identity) -> "FakeGenerationRequest":
        return replace(self, identity=identity)

    def with_init_image(self, image) -> "FakeGenerationRequest":
        return self

    def with_twin(self, twin, mode: str) -> "FakeGenerationRequest":
        return replace(self, twin=twin, identity_mode=mode)

    def check_session(self, faces) -> None:
        """Nothing of the session is named by a fake request."""

    def check_family(self, family: str, method_fields=frozenset(), variant: str = "") -> None:
        """The fake engine has one family and every fake field applies to it."""

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "num_images": self.num_images,
                "seed": self.seed, "width": self.width, "height": self.height, "quality_mode": self.quality_mode,
                "identity_strength": self.identity_strength, "style": self.style, "candidates": self.candidates,
                "restore_faces": self.restore_faces, "restore_model": self.restore_model,
                "restore_fidelity": self.restore_fidelity, "identity": self.identity_source,
                "persona": self.persona, "attributes": self.attributes,
                "has_identity": self.identity is not None}


class FakeSessionIdentity:
    cache_key = "fake"

    def __init__(self, vector: np.ndarray, face_model: str, n: int) -> None:
        self.vector, self.face_model, self.n = vector, face_model, n

    def describe(self) -> dict:
        return {"variant": "fake", "face_model": self.face_model, "num_images": self.n}

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file
        save_file({"vector": self.vector}, str(path), metadata={"face_model": self.face_model, "n": str(self.n)})

    @classmethod
    def load(cls, path: Path) -> "FakeSessionIdentity":
        from safetensors import safe_open
        if not Path(path).exists():
            raise errors.NotFound("the session has no identity")
        with safe_open(str(path), "np") as f:
            meta = f.metadata()
            return cls(f.get_tensor("vector"), meta["face_model"], int(meta["n"]))


@dataclass
class FakeResult:
    images: list
    seeds: list
    metadata: dict = field(default_factory=dict)


class FakeGenerator:
    """An Engine (utils/contracts.py)."""
    request_type = FakeGenerationRequest
    identity_type = FakeSessionIdentity
    max_images_per_call = 4
    error = None
    model_error = None

    def __init__(self, *, step_seconds: float = 0.0, setup_seconds: float = 0.0, setup_error: Exception | None = None,
                 raise_on_generate: BaseException | None = None) -> None:
        self.step_seconds = step_seconds
        self.setup_seconds = setup_seconds
        self.setup_error = setup_error
        self.raise_on_generate = raise_on_generate
        self.state = "starting"
        self.calls = 0
        self.started = threading.Event()   # set when a generate() call begins (tests wait on it)
        self.release = threading.Event()   # when ``hold`` is set, generate() waits for this before step 1
        self.hold = False

    def setup(self) -> None:
        time.sleep(self.setup_seconds)
        if self.setup_error is not None:
            self.state = "setup_failed"
            raise self.setup_error
        self.state = "ready"

    def info(self) -> dict:
        return {"profile": "fake", "is_demo": True, "variant": "fake", "model_name": "fake-generator",
                "device": "cpu", "dtype": "float32"}

    def close(self) -> None:
        pass

    def published_options(self) -> None:
        return None   # the double publishes no request choices (the /test page then shows its defaults)

    def check_identity(self, identity) -> None:
        if not isinstance(identity, FakeSessionIdentity):
            raise errors.Conflict("not an identity of the fake generator", code="identity_mismatch")

    def validate(self, req) -> dict:
        return {}

    def build_identity(self, crops, face_embeddings=None, *, face_model: str | None = None,
                       **face_inputs) -> FakeSessionIdentity:
        assert len(crops) == len(face_embeddings) >= 1
        vec = np.mean([np.asarray(e, dtype=np.float32) for e in face_embeddings], axis=0)
        return FakeSessionIdentity(vec, face_model, len(crops))

    def generate(self, req: FakeGenerationRequest, on_progress=None, should_cancel=None) -> FakeResult:
        self.calls += 1
        self.started.set()
        if self.hold:
            self.release.wait(30)
        if self.raise_on_generate is not None:
            raise self.raise_on_generate
        total = QUALITY_STEPS[req.quality_mode]
        for step in range(1, total + 1):
            if should_cancel is not None and should_cancel():
                raise errors.JobCanceled("canceled")
            if self.step_seconds:
                time.sleep(self.step_seconds)
            if on_progress is not None:
                on_progress(step, total)
        base = req.seed if req.seed is not None else 1234
        seeds = [base + i for i in range(req.num_images)]
        images = [Image.new("RGB", (req.width, req.height), ((s * 37) % 256, (s * 91) % 256, 128)) for s in seeds]
        # "identity" as the real engine's metadata says it: None when the job ran with no identity.
        return FakeResult(images=images, seeds=seeds, metadata={
            "steps": total, "profile": "fake", "identity": None if req.identity is None else req.identity.describe()})


class PhotoGenerator(FakeGenerator):
    """Generates the astronaut photo (a real face, from scikit-image's wheel) at 320², or the flat fake
    images when ``faces`` is False: restoration and likeness run on real faces without the engine."""

    def __init__(self, faces: bool = True, **kw) -> None:
        super().__init__(**kw)
        self.faces = faces

    def generate(self, req, on_progress=None, should_cancel=None):
        from tests.photos import astronaut_variant
        result = super().generate(req, on_progress, should_cancel)
        if self.faces:
            result = FakeResult(images=[astronaut_variant(s % 4, 320) for s in result.seeds], seeds=result.seeds,
                                metadata=result.metadata)
        return result


@dataclass
class FakeAccepted:
    index: int
    filename: str
    image: Image.Image
    crop: Image.Image
    embedding: np.ndarray
    warnings: list = field(default_factory=list)


@dataclass
class FakeRejected:
    index: int
    filename: str
    code: str
    message: str


@dataclass
class FakeReport:
    accepted: list
    rejected: list
    warnings: list
    template: np.ndarray | None
    model_name: str = "fake-faces-8"

    def identity_inputs(self) -> dict:
        return {}   # no raw ArcFace lengths, no key points

    def to_json(self) -> dict:
        files = [{"index": a.index, "filename": a.filename, "accepted": True, "warnings": a.warnings}
                 for a in self.accepted]
        files += [{"index": r.index, "filename": r.filename, "accepted": False, "code": r.code, "message": r.message}
                  for r in self.rejected]
        files.sort(key=lambda f: f["index"])
        return {"files": files, "accepted": len(self.accepted), "rejected": len(self.rejected),
                "warnings": self.warnings, "model_name": self.model_name}


class FakeFaceService:
    backend_name = "fake"
    model_name = "fake-faces-8"

    def __init__(self, *, setup_error: Exception | None = None) -> None:
        self.setup_error = setup_error
        self.ready = False

    def setup(self) -> None:
        if self.setup_error is not None:
            raise self.setup_error
        self.ready = True

    def validate_selfies(self, files: list[tuple[str, bytes]]) -> FakeReport:
        assert self.ready, "setup() was not called"
        accepted, rejected = [], []
        for i, (name, data) in enumerate(files):
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im = im.convert("RGB")
            except Exception:  # noqa: BLE001
                rejected.append(FakeRejected(i, name, "invalid_image", f"{name!r} is not an image"))
                continue
            if max(ImageStat.Stat(im).stddev) < 1.0:
                rejected.append(FakeRejected(i, name, "no_face", f"no face found in {name!r}"))
                continue
            small = np.asarray(im.resize((2, 2)), dtype=np.float32).reshape(-1)[:8] / 255.0
            emb = small / (np.linalg.norm(small) or 1.0)
            accepted.append(FakeAccepted(i, name, im, im.resize((64, 64)), emb.astype(np.float32)))
        warnings = []
        if 0 < len(accepted) < 3:
            warnings.append({"code": "few_selfies", "message": f"only {len(accepted)} usable selfies"})
        template = None
        if accepted:
            t = np.mean([a.embedding for a in accepted], axis=0)
            template = (t / (np.linalg.norm(t) or 1.0)).astype(np.float32)
        return FakeReport(accepted, rejected, warnings, template, self.model_name)

    def identity_similarity(self, image, template) -> float | None:
        return 0.5 if template is not None else None

    def self_similarity(self, embeddings) -> float | None:
        return None

    def detect_faces(self, image) -> list:
        return []   # the double finds no face to restore (tests restore with the real face service)


class CliFaceService:
    """The CLI's face double (FaceService contract): every decodable image is a face; the "crop" is its centre
    and embedding i is seeded noise (512-d); no template, no scores."""
    backend_name = "fake"
    model_name = "fake-arcface-512"

    def __init__(self, settings=None):
        self.ready = False

    def setup(self):
        self.ready = True

    def validate_selfies(self, files):
        assert self.ready, "setup() must run before validate_selfies()"
        accepted, rejected = [], []
        for i, (name, data) in enumerate(files):
            try:
                img = Image.open(io.BytesIO(data)).convert("RGB")
            except Exception:
                rejected.append(SimpleNamespace(index=i, filename=name, code="invalid_image", message="not an image"))
                continue
            w, h = img.size
            crop = img.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))
            emb = np.random.default_rng(i).standard_normal(512).astype(np.float32)
            accepted.append(SimpleNamespace(index=i, filename=name, image=img, crop=crop, embedding=emb, warnings=[]))
        return SimpleNamespace(accepted=accepted, rejected=rejected, warnings=[], model_name=self.model_name,
                               template=None, identity_inputs=lambda: {})

    def identity_similarity(self, image, template):
        return None

    def self_similarity(self, embeddings):
        return None

    def detect_faces(self, image):
        return []


def image_bytes(color=(200, 120, 80), size=(96, 96), fmt="PNG", noisy: bool = True) -> bytes:
    """A small image; ``noisy`` ones count as faces for FakeFaceService, flat ones do not."""
    if noisy:
        rng = np.random.default_rng(sum(color) + size[0])
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr)
    else:
        im = Image.new("RGB", size, color)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@dataclass(frozen=True)
class FakeModelRequest(FakeGenerationRequest):
    """FakeGenerationRequest that accepts the ``model`` field (the base model a job is pinned to)."""

    @classmethod
    def from_dict(cls, payload: dict, settings) -> "FakeModelRequest":
        payload = dict(payload)
        model = payload.pop("model", None)
        if model is not None and (not isinstance(model, str) or not 1 <= len(model) <= 200):
            raise errors.InvalidRequest(f"model={model!r} must be a base model name")
        return replace(FakeGenerationRequest.from_dict.__func__(cls, payload, settings), model=model)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "model": self.model}


class FakeModelGenerator(FakeGenerator):
    """A generator double with the base-model registry contract (models_catalogue / load_model, as in
    docs/ARCHITECTURE.md): ``load_seconds`` per load beside the active model, the swap between jobs (a
    model lock held by each generate()), a name starting with ``broken`` fails to load naming its file,
    a pinned request for another model fails with model_not_loaded, metadata.model says which ran."""
    request_type = FakeModelRequest

    def __init__(self, *, models=("base", "alt", "broken"), active: str = "base", load_seconds: float = 0.0,
                 **kw) -> None:
        super().__init__(**kw)
        self.model_names, self.active, self.load_seconds = list(models), active, load_seconds
        self._model_lock = threading.RLock()
        self._load_lock = threading.Lock()

    def info(self) -> dict:
        return {**super().info(), "model_name": self.active, "active_model": self.active, "family": "fake"}

    def models_catalogue(self) -> dict:
        return {"active": self.active,
                "models": [{"name": n, "family": "fake", "kind": "single-file", "file": f"{n}.safetensors",
                            "active": n == self.active} for n in self.model_names],
                "loras": [{"name": "fake_style", "family": "fake", "loaded": True}]}

    def load_model(self, name: str) -> dict:
        if name not in self.model_names:
            raise errors.InvalidRequest(f"model={name!r} is not a local base model; available: "
                                        f"{', '.join(self.model_names)}", code="unknown_model", http_status=404)
        with self._load_lock:
            old = self.active
            if name == old:
                return {"model": name, "previous": old, "switched": False, "load_s": 0.0, "swap_wait_s": 0.0}
            t0 = time.perf_counter()
            time.sleep(self.load_seconds)
            if name.startswith("broken"):
                raise errors.InvalidRequest(f"model={name!r} failed to load from /models/checkpoints/{name}.safetensors: "
                                            f"SafetensorError: header too large; {old!r} stays active",
                                            code="model_load_failed", http_status=422)
            t1 = time.perf_counter()
            with self._model_lock:     # between jobs
                t2 = time.perf_counter()
                self.active = name
            return {"model": name, "previous": old, "switched": True, "load_s": round(t1 - t0, 3),
                    "swap_wait_s": round(t2 - t1, 3)}

    def generate(self, req, on_progress=None, should_cancel=None) -> FakeResult:
        with self._model_lock:
            want = getattr(req, "model", None)
            if want is not None and want != self.active:
                raise errors.InvalidRequest(f"model={want!r} was requested but the active base model is "
                                            f"{self.active!r}", code="model_not_loaded", http_status=409)
            result = super().generate(req, on_progress, should_cancel)
            result.metadata["model"] = self.active
            return result


class ScriptedSafetyClassifier:
    """Scores from a script: ``ScriptedSafetyClassifier([0.1, 0.9])`` gives 0.1 to the first image scored,
    0.9 to the second and every later one."""

    def __init__(self, scores, name: str = "scripted-nsfw-classifier") -> None:
        if not scores:
            raise ValueError("give at least one score")
        self.name = name
        self._scores = list(scores)
        self._lock = threading.Lock()
        self.seen = 0

    def score(self, images) -> list[float]:
        with self._lock:
            out = []
            for _ in images:
                out.append(float(self._scores[min(self.seen, len(self._scores) - 1)]))
                self.seen += 1
            return out


_SIGNER: dict[str, Any] = {}
_SIGNER_LOCK = threading.Lock()


def shared_signer():
    """One development C2PA signer per test process, made in a temporary folder on first use."""
    import tempfile

    from utils.safety.provenance import load_signer
    with _SIGNER_LOCK:
        if "signer" not in _SIGNER:
            folder = Path(tempfile.mkdtemp(prefix="twin-test-c2pa-"))
            _SIGNER["signer"] = load_signer(None, None, folder)
        return _SIGNER["signer"]


def fake_safety(settings, scores=(0.0,), name: str = "scripted-nsfw-classifier"):
    """A SafetyGuard whose classifier answers ``scores`` (utils/contracts.py OutputSafety)."""
    from utils.safety.guard import SafetyGuard
    return SafetyGuard(settings, classifier=ScriptedSafetyClassifier(list(scores), name), signer=shared_signer())


class FakeFluxIdentityMethod:
    """A FluxIdentityMethod (utils/contracts.py) double: records what FluxModel asks of a method and when, and
    makes the call observable (it raises the guidance by identity_strength); no likeness."""
    variant = "recording"
    fields = frozenset({"identity_strength"})

    def __init__(self):
        self.calls = []

    def build_identity(self, crops, face_embeddings, **inputs):
        self.calls.append("build")
        return {"variant": self.variant, "n": len(crops)}

    def check_identity(self, identity):
        if not isinstance(identity, dict) or identity.get("variant") != self.variant:
            raise errors.Conflict("not this method's identity", code="identity_mismatch")

    def prepare(self, pipe, req, plan, kwargs):
        self.calls.append(("prepare", req.identity_strength))
        kwargs["guidance_scale"] = 3.5 + req.identity_strength     # observable in the call
        return pipe

    def finish(self, pipe):
        self.calls.append("finish")
