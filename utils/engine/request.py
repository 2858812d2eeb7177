"""The generation request, declared once: ``REQUEST_FIELDS`` (one row per field) is what
``GenerationRequest.from_dict`` validates against, what /openapi.json and the /system-status options are
rendered from, and what the CLI makes its flags from. A new request field is a row here plus its dataclass
field. ``APPLICABILITY`` beside it says which fields apply to which model family (and identity method): a
field given for a model it does not apply to is a 400 naming field and family, never silently ignored.
Importing this module loads no model (the API node parses requests without one)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from utils.choices import RESTORE_MODEL_NAMES
from utils.config import Settings
from utils.engine.identity.pose import POSE_CHOICES, POSE_PRESETS, POSE_STRENGTH_RANGE, check_selfie_pose, parse_pose
from utils.engine.tuning import (ASPECT_RATIOS, DEFAULT_POSE_STRENGTH, DEFAULT_STYLE, MAX_CANDIDATES, MAX_IMAGES,
                                 MAX_SEED, POSE_VARIANTS, QUALITY_MODES, SIDE_MULTIPLE, default_identity_strength,
                                 default_pose_strength, preset_size, quality_tables, style_library)
from utils.engine.training.spec import TRAIN_FIELDS
from utils.errors import InvalidRequest
from utils.init_image import check_init_image, max_chars as max_init_chars, parse_init_image
from utils.prompts import ENUM_ATTRIBUTES, attributes_schema, check_attributes, check_persona, persona_schema
from utils.request_fields import Field, published_fields, validate_payload

IDENTITY_SOURCES = ("session", "none")
# How the likeness is applied: the zero-shot identity adapter, the session's trained twin LoRA, or both;
# auto = both when the session has a twin LoRA for the active model's family, else adapter.
IDENTITY_MODES = ("auto", "adapter", "lora", "both")
# JSON names that differ from the request's attribute: ``identity`` there is the identity object the service
# attaches at run time (``with_identity``), so the request field's value lives in ``identity_source``.
FIELD_ATTRIBUTES = {"identity": "identity_source"}

REQUEST_FIELDS: tuple[Field, ...] = (
    Field("prompt", "string", "What to portray; the identity comes from the session's selfies (with "
          "identity='none': from this text, persona and attributes alone).", required=True,
          strip=True, min_length=1, max_length=lambda s: s.max_prompt_chars),
    Field("negative_prompt", "string", "What to avoid; added to the style's negative. FLUX: only with true_cfg > 1.",
          max_length=lambda s: s.max_prompt_chars),
    Field("true_cfg", "number", "FLUX only: true classifier-free guidance scale with negative_prompt (diffusers' "
          "true_cfg_scale; > 1 runs a second transformer pass per step, twice the cost). Absent or 1: off.",
          minimum=1.0, maximum=10.0),
    Field("num_images", "integer", "Portraits to make.", default=1, minimum=1, maximum=MAX_IMAGES,
          message="{name}={value!r} is not between {minimum} and {maximum}"),
    Field("seed", "integer", "Random seed of the first image (image i uses seed + i); random when absent.",
          minimum=0, maximum=MAX_SEED),
    Field("width", "integer", "Output width; with height, instead of aspect_ratio.", multiple_of=8,
          minimum=lambda s: s.min_image_side, maximum=lambda s: s.max_image_side,
          message="{name}={value!r} must be a multiple of 8 between {minimum} and {maximum}"),
    Field("height", "integer", "Output height; with width.", multiple_of=8,
          minimum=lambda s: s.min_image_side, maximum=lambda s: s.max_image_side,
          message="{name}={value!r} must be a multiple of 8 between {minimum} and {maximum}"),
    Field("aspect_ratio", "string", "A preset size (SDXL training buckets scaled to the model).",
          enum=tuple(ASPECT_RATIOS)),
    Field("quality_mode", "string", "Steps / guidance / scheduler preset.", default="balanced",
          enum=tuple(QUALITY_MODES)),
    Field("identity_strength", "number", "Identity adapter scale (default per adapter variant: instantid and "
          "faceid-plusv2 0.8, else TWIN_DEFAULT_IDENTITY_STRENGTH).",
          default=default_identity_strength, minimum=0.0, maximum=2.0),
    Field("style", "string", "A preset of the style library (GET /styles): prompt template, negative, defaults.",
          default=DEFAULT_STYLE, enum=lambda s: tuple(style_library(s))),
    Field("style_strength", "number", "How much of the style's text is applied (prompt weighting; 1 = as written).",
          default=1.0, minimum=0.0, maximum=1.0),
    Field("persona", "object", "Who is portrayed: {name, age (18-100), traits[]}; built into the prompt, identity first.",
          check=check_persona, schema_extra=persona_schema()),
    Field("attributes", "object", "Visual attributes: gender, age_group, ethnicity, hair, eyes, skin_tone, outfit, "
          "expression, background; built into the prompt, identity first.",
          check=check_attributes, schema_extra=attributes_schema()),
    Field("init_image", "string", "img2img start picture: \"selfie:N\" (accepted selfie N of the session), "
          "\"<job_id>/<filename>\" (one of your outputs) or base64 image data (data:image/...;base64,...).",
          min_length=1, max_length=max_init_chars, check=check_init_image),
    Field("strength", "number", "img2img: how far from init_image the picture may move (1 = ignore it).",
          default=0.6, minimum=0.05, maximum=1.0),
    Field("lora", "string", "Name of a style LoRA in the model folder.", min_length=1, max_length=100,
          message="{name}={value!r} must be a LoRA name"),
    Field("lora_scale", "number", "Strength of the LoRA.", default=0.8, minimum=0.0, maximum=2.0),
    Field("preview", "boolean", "Send a small preview of the forming image every few steps "
          "(GET /preview/<job_id>, preview events).", default=False),
    # Likeness (done by the service after generation, with the face backend; see utils/services.py).
    Field("candidates", "integer", "Best-of-N: generate this many (num_images to 8), score each against the "
          "session's faces and keep the num_images most alike, best first; default num_images.",
          minimum=1, maximum=MAX_CANDIDATES),
    Field("restore_faces", "boolean", "Restore every face (GFPGAN / CodeFormer / GPEN); the unrestored image "
          "is kept as avatar_NNN_raw.png.", default=lambda s: s.restore_default),
    Field("restore_model", "string", "Face restoration model.", default=lambda s: s.restore_model,
          enum=RESTORE_MODEL_NAMES),
    Field("restore_fidelity", "number", "CodeFormer's fidelity weight: 0 restores most, 1 stays closest to the "
          "generated face (other models ignore it).", default=0.5, minimum=0.0, maximum=1.0),
    Field("pose", "string", "Head pose of the portrait (instantid and infiniteyou variants): auto (frontal, "
          "with the person's own proportions from the selfies), a preset (" + ", ".join(POSE_PRESETS) + "), or selfie:N (the "
          "pose of accepted selfie N, N = its index in the upload report).", default="auto",
          check=lambda v, s: parse_pose(v),
          schema_extra={"pattern": "^(" + "|".join(c for c in POSE_CHOICES if c != "selfie:N")
                        + r"|selfie:[0-9]{1,6})$"}),
    Field("pose_strength", "number", "How strongly the pose keypoints steer the image (instantid: the "
          "IdentityNet ControlNet scale; infiniteyou: the keypoint image's share, all black without pose; "
          "0 = no pose control).", default=default_pose_strength,
          minimum=POSE_STRENGTH_RANGE[0], maximum=POSE_STRENGTH_RANGE[1]),
    Field("model", "string", "The base model (GET /models) this job is meant for: when another one is active "
          "when the job runs, it fails with model_not_loaded (409) naming both. Absent: the active model.",
          min_length=1, max_length=200, message="{name}={value!r} must be a base model name"),
    Field("identity", "string", "Whose face: session (the selfies of session_id, or of the caller's latest "
          "upload) or none (no selfies: an avatar from prompt, persona and attributes alone; not with "
          "session_id; best-of-N is then not ranked).", default="session", enum=IDENTITY_SOURCES),
    Field("identity_mode", "string", "How the likeness is applied: adapter (the identity adapter from the "
          "selfies), lora (the session's trained twin LoRA: POST /sessions/<id>/train), both, or auto (both when "
          "the session has a twin LoRA for the active model's family, else adapter). The metadata says which ran.",
          default="auto", enum=IDENTITY_MODES),
    Field("twin_lora_scale", "number", "Strength of the twin LoRA (identity_mode lora or both).", default=1.0,
          minimum=0.0, maximum=1.5),
)
REQUEST_KEYS = tuple(f.name for f in REQUEST_FIELDS)


@dataclass(frozen=True)
class Applies:
    """Where a request field applies: ``families`` maps each family it applies to onto the condition in words
    (published in /openapi.json, /system-status and on the /test page); ``ok(req, family, method_fields)``
    says whether it applies to this request on this model (``method_fields``: the fields the model's identity
    method takes). A field absent from the table applies to every family."""
    families: Mapping[str, str]
    ok: Callable[[Any, str, frozenset], bool]


def _side_ok(name: str) -> Callable[[Any, str, frozenset], bool]:
    return lambda r, fam, m: getattr(r, name) % SIDE_MULTIPLE[fam] == 0


APPLICABILITY: dict[str, Applies] = {
    "negative_prompt": Applies({"sdxl": "always (classifier-free guidance)",
                                "flux": "only with true_cfg > 1: FLUX.1-dev is guidance-distilled and has no "
                                        "negative branch otherwise (true CFG: a second pass per step, twice the cost)"},
                               lambda r, fam, m: fam != "flux" or (r.true_cfg or 1.0) > 1.0),
    "true_cfg": Applies({"flux": "always (SDXL guides with guidance_scale through its quality modes)"},
                        lambda r, fam, m: fam == "flux"),
    "style_strength": Applies({"sdxl": "always (compel prompt weighting)",
                               "flux": "at 1 only: compel, the prompt weighting, has no T5 support"},
                              lambda r, fam, m: fam != "flux" or r.style_strength >= 1.0),
    "identity_strength": Applies({"sdxl": "always (the identity adapter's scale)",
                                  "flux": "only with an identity method (infiniteyou: InfuseNet's conditioning scale)"},
                                 lambda r, fam, m: "identity_strength" in m),
    "pose": Applies({"sdxl": "only with the instantid identity method (pose control)",
                     "flux": "only with the infiniteyou identity method (keypoint image; absent: all black)"},
                    lambda r, fam, m: "pose" in m),
    "pose_strength": Applies({"sdxl": "only with the instantid identity method (pose control)",
                              "flux": "only with the infiniteyou identity method (share of the keypoint image)"},
                             lambda r, fam, m: "pose_strength" in m),
    "width": Applies({"sdxl": "in multiples of 8", "flux": "in multiples of 16 (2x2 latents are packed into one token)"},
                     _side_ok("width")),
    "height": Applies({"sdxl": "in multiples of 8", "flux": "in multiples of 16 (2x2 latents are packed into one token)"},
                      _side_ok("height")),
}


def check_applicable(req: Any, family: str, method_fields: frozenset, variant: str = "") -> None:
    """InvalidRequest naming the first field the request gives that does not apply to a ``family`` model whose
    identity method (``variant``, "" for none) takes ``method_fields``."""
    for name in sorted(req.given):
        rule = APPLICABILITY.get(name)
        if rule is None or rule.ok(req, family, method_fields):
            continue
        when = rule.families.get(family)
        where = f"on {family} it applies {when}" if when else \
            f"it applies to the {' and '.join(sorted(rule.families))} family only"
        method = f" (identity method: {variant or 'none'})" if name in ("identity_strength", "pose", "pose_strength") \
            else ""
        raise InvalidRequest(f"{name}={getattr(req, name)!r} does not apply to the active {family} model{method}: "
                             f"{where}", code="field_not_applicable")


def inapplicable_fields(family: str, method_fields: frozenset) -> list[str]:
    """Fields that never apply to such a model (a client hides them); conditional ones are in the table."""
    out = []
    for name, rule in APPLICABILITY.items():
        if family not in rule.families or (name in ("identity_strength", "pose", "pose_strength")
                                           and name not in method_fields):
            out.append(name)
    return out


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    true_cfg: float | None = None
    num_images: int = 1
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    aspect_ratio: str | None = None
    quality_mode: str = "balanced"
    identity_strength: float = 0.7
    style: str = DEFAULT_STYLE
    style_strength: float = 1.0
    persona: dict | None = None
    attributes: dict | None = None
    init_image: str | None = None
    strength: float = 0.6
    lora: str | None = None
    lora_scale: float = 0.8
    preview: bool = False
    candidates: int | None = None
    restore_faces: bool = False
    restore_model: str = "gfpgan"
    restore_fidelity: float = 0.5
    pose: str = "auto"
    pose_strength: float = DEFAULT_POSE_STRENGTH
    model: str | None = None
    identity_source: str = "session"     # the JSON field "identity"
    identity_mode: str = "auto"          # resolved by the service (with_twin) before the engine runs it
    twin_lora_scale: float = 1.0
    identity: Any = field(default=None, compare=False, repr=False)
    twin: Any = field(default=None, compare=False, repr=False)          # utils.engine.training.loras.TwinLora
    init_pixels: Any = field(default=None, compare=False, repr=False)   # the resolved init_image (PIL)
    given: frozenset = field(default=frozenset(), compare=False, repr=False)  # the fields the payload set

    @classmethod
    def from_dict(cls, payload: Any, settings: Settings) -> "GenerationRequest":
        v = validate_payload(REQUEST_FIELDS, payload, settings)
        if v["identity"] == "none":
            _check_without_identity(v, payload)
        # Rules between fields; each value alone is already valid.
        if (v["width"] is None) != (v["height"] is None):
            raise InvalidRequest(f"width={v['width']!r} and height={v['height']!r} must be given together")
        if v["width"] is not None and v["aspect_ratio"] is not None:
            raise InvalidRequest(f"give either aspect_ratio={v['aspect_ratio']!r} or width/height, not both")
        if v["candidates"] is not None and v["candidates"] < v["num_images"]:
            raise InvalidRequest(f"candidates={v['candidates']!r} is fewer than num_images={v['num_images']!r}; "
                                 f"give between {v['num_images']} and {MAX_CANDIDATES}")
        if v["init_image"] is None and payload.get("strength") is not None:
            raise InvalidRequest(f"strength={payload['strength']!r} applies to img2img only: give init_image too")
        return cls(**{FIELD_ATTRIBUTES.get(k, k): value for k, value in v.items()},
                   given=frozenset(k for k, x in payload.items() if x is not None))

    @property
    def total_candidates(self) -> int:
        return self.candidates or self.num_images

    def with_identity(self, identity: Any) -> "GenerationRequest":
        if identity is not None:
            ex = getattr(identity, "extras", None) or {}
            idx = ex.get("keypoint_index") if ex.get("keypoints") is not None else None
            check_selfie_pose(self.pose, [] if idx is None else [int(i) for i in idx.tolist()])
        return dataclasses.replace(self, identity=identity)

    def with_twin(self, twin: Any, mode: str) -> "GenerationRequest":
        """The session's twin LoRA (None: adapter only) and the identity mode that runs (never auto)."""
        return dataclasses.replace(self, twin=twin, identity_mode=mode)

    def check_session(self, faces) -> None:
        """What the request names of the session must exist in it: ``pose="selfie:N"`` an accepted selfie
        with key points (checked when the request meets the session, so it is a 400, not a failed job).
        ``faces``: the session's stored face features (utils.storage.SessionFaces)."""
        kps = faces.keypoints or [None] * len(faces.indices)
        check_selfie_pose(self.pose, [i for i, k in zip(faces.indices, kps) if k is not None])

    def check_family(self, family: str, method_fields: frozenset = frozenset(), variant: str = "") -> None:
        """Every field given applies to a ``family`` model whose identity method takes ``method_fields``
        (400 field_not_applicable naming field and family). For a check before the model is at hand (a pinned
        job in cluster mode); the engine makes it again when the job runs."""
        check_applicable(self, family, frozenset(method_fields), variant)

    def with_init_image(self, image: Any) -> "GenerationRequest":
        return dataclasses.replace(self, init_pixels=image)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, FIELD_ATTRIBUTES.get(k, k)) for k in REQUEST_KEYS}
        if self.init_image is not None:  # inline image data is not echoed into every job JSON
            d["init_image"] = parse_init_image(self.init_image, len(self.init_image)).describe()
        else:
            d["strength"] = None
        d["has_identity"] = self.identity is not None
        return d


def _check_without_identity(v: dict[str, Any], payload: dict) -> None:
    """identity='none' has no selfies: a field that only means something with them is a 400, never ignored."""
    if v["identity_mode"] in ("lora", "both"):
        raise InvalidRequest(f"identity_mode={v['identity_mode']!r} needs a session's twin LoRA; identity='none' "
                             "has no session: leave it out")
    if payload.get("identity_strength") is not None:
        raise InvalidRequest(f"identity_strength={payload['identity_strength']!r} applies to a face identity; "
                             "identity='none' has none: leave it out")
    for name in ("pose", "init_image"):
        if isinstance(v[name], str) and v[name].startswith("selfie:"):
            raise InvalidRequest(f"{name}={v[name]!r} names a selfie; identity='none' has no selfies")


@dataclass
class GenerationResult:
    images: list
    seeds: list[int]
    metadata: dict[str, Any]


def published_options(native_resolution: int, settings: Settings, family: str = "sdxl",
                      method_fields: frozenset | None = None, variant: str | None = None) -> dict[str, Any]:
    """The request choices of the loaded model, for clients (the /test page reads them from /system-status):
    ``family`` / ``variant`` / ``method_fields`` of the active model (known from the profile before it loads)."""
    variant = settings.ip_adapter_variant if variant is None else variant
    if method_fields is None:
        method_fields = frozenset({"identity_strength"} | ({"pose", "pose_strength"} if variant in POSE_VARIANTS
                                                           else set())) if family == "sdxl" else frozenset()
    multiple = SIDE_MULTIPLE[family]
    return {
        "family": family,
        "quality_modes": list(QUALITY_MODES),
        "default_quality_mode": "balanced",
        "aspect_ratios": {ar: list(preset_size(ar, native_resolution, settings, multiple)) for ar in ASPECT_RATIOS},
        "styles": list(style_library(settings)),
        "default_style": DEFAULT_STYLE,
        "default_identity_strength": default_identity_strength(settings),
        "attribute_choices": {k: list(v) for k, v in ENUM_ATTRIBUTES.items()},
        "max_images": MAX_IMAGES,
        "variant": variant,
        # Pose control needs the IdentityNet (instantid); clients show the pose choice only then.
        "pose_control": "pose" in method_fields,
        "poses": list(POSE_CHOICES),
        "request_fields": published_fields(REQUEST_FIELDS, settings),
        # Which fields apply to which family (and when); the ones that never apply to the active model.
        "field_applicability": {name: dict(rule.families) for name, rule in APPLICABILITY.items()},
        "inapplicable_fields": inapplicable_fields(family, method_fields),
        "quality_table": quality_tables(),
        "side_multiple": multiple,
        # Twin studio: the training body (POST /sessions/<id>/train), whether this family trains, the modes.
        "train_fields": published_fields(TRAIN_FIELDS, settings),
        "trainable": family == "sdxl",
        "identity_modes": list(IDENTITY_MODES),
    }
