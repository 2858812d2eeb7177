"""``SafetyGuard``: the one object the service holds for safety and provenance (docs/SAFETY.md).

Built from the settings in the wiring module, ``setup()`` once per process that uses it (the API process
needs the term list and the status; the generation process also the classifier and the signer):

- ``check_prompt(fields)``: before a job is queued, when a face identity is used; PromptRefused (400).
- ``judge(images, gate)``: one ``SafetyVerdict`` per generated image, in the mode the session's age
  gate leaves (``effective_mode``); a blocked image is never written.
- ``sign_png(image, generator)`` / ``sign_jpeg(data, generator)``: the bytes to write and serve: the
  output watermarked, encoded and signed; a thumbnail's JPEG signed.
- ``status()``: the /system-status block; ``warnings``: the loud start-up lines (development signer).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from utils.config import Settings
from utils.errors import TwinError
from utils.safety import classifier as cls
from utils.safety.policy import AgeGate, SafetyVerdict, effective_mode, judge
from utils.safety.provenance import ContentSigner, Generator, load_signer, signer_warning
from utils.safety.terms import TermList, load_terms

log = logging.getLogger(__name__)


def is_tiny(profile: str) -> bool:
    """The tiny profiles (tiny, tiny-flux) share one folder, and the classifier's stand-in in it."""
    return profile in ("tiny", "tiny-flux")


class SafetyGuard:
    def __init__(self, settings: Settings, *, classifier: cls.SafetyClassifier | None = None,
                 signer: ContentSigner | None = None) -> None:
        self.settings = settings
        self.classifier = classifier          # injected (tests) or loaded by setup(classifier=True)
        self.signer = signer
        self.terms: TermList | None = None
        self.warnings: list[str] = []
        self.classifier_note = "not loaded"

    # ------------------------------------------------------------------ set-up
    def classifier_dir(self, profile: str) -> Path:
        """Where the classifier is looked for: TWIN_SAFETY_MODEL_DIR, else the tiny folder's stand-in
        (tiny profile), else <model_dir>/nsfw_image_detection (then the Hugging Face cache)."""
        s = self.settings
        if s.safety_model_dir is not None:
            return Path(s.safety_model_dir)
        if is_tiny(profile):
            return s.resolved_tiny_model_dir / cls.LOCAL_NAME
        return s.resolved_safety_model_dir

    def setup(self, *, profile: str, classifier: bool = True, signer: bool = True, age_gate: bool = False,
              device: str = "cpu", dtype: Any = None) -> "SafetyGuard":
        """Read the term list (a broken file stops start-up); with ``signer``, load or make the C2PA signer;
        with ``classifier``, load the classifier unless TWIN_SAFETY_MODE=off and no age gate can hold a
        session (``age_gate``: the face backend estimates ages)."""
        s = self.settings
        self.load_terms()
        if signer and self.signer is None:
            self.signer = load_signer(s.c2pa_cert, s.c2pa_key, s.c2pa_dev_dir)
            warning = signer_warning(self.signer)
            if warning:
                log.warning(warning)
                self.warnings.append(warning)
        needed = s.safety_mode != "off" or age_gate
        if classifier and needed and self.classifier is None:
            folder = self.classifier_dir(profile)
            if is_tiny(profile) and s.safety_model_dir is None and not (folder / cls.FILES[1]).is_file():
                cls.write_standin(folder)          # the tiny profile's own build output, like the tiny model
            name = cls.STANDIN_NAME if is_tiny(profile) and s.safety_model_dir is None else s.safety_model_repo
            self.classifier = cls.load_classifier(folder, s.safety_model_repo, name=name, device=device, dtype=dtype)
        if self.classifier is not None:
            self.classifier_note = f"{self.classifier.name} (threshold {s.safety_threshold:g})"
        elif not needed:
            self.classifier_note = "off (TWIN_SAFETY_MODE=off and no apparent-age gate)"
        return self

    def load_terms(self) -> "SafetyGuard":
        """The explicit-term list, read once (a broken file raises ConfigError naming the line): the API reads
        it when the app is built, so a bad file stops start-up."""
        if self.terms is None:
            self.terms = load_terms(self.settings.resolved_safety_terms_file)
        return self

    # ------------------------------------------------------------------ per request
    def check_prompt(self, fields: Mapping[str, Any]) -> None:
        """Raise PromptRefused when a text names an explicit term. Call it only when a face identity is
        used; ``negative_prompt`` is never checked, whatever is passed."""
        if self.terms is None:
            raise RuntimeError("SafetyGuard.setup() was not called")
        found = self.terms.check(fields)
        if found is not None:
            raise found.error()

    def judge(self, images: Sequence[Image.Image], gate: AgeGate | None = None) -> list[SafetyVerdict]:
        """One verdict per image, in the mode the session's gate leaves. A held session is judged in block
        mode even with TWIN_SAFETY_MODE=off; without a classifier then, the job fails rather than pass."""
        mode = effective_mode(self.settings.safety_mode, gate)
        if mode == "off":
            return [judge(None, mode="off", threshold=self.settings.safety_threshold, model=None) for _ in images]
        if self.classifier is None:
            raise TwinError("this session needs the safety classifier, which is not loaded on this worker",
                            code="safety_model_missing", http_status=503)
        scores = self.classifier.score(list(images))
        if len(scores) != len(images):
            raise RuntimeError(f"the safety classifier gave {len(scores)} scores for {len(images)} images")
        return [judge(score, mode=mode, threshold=self.settings.safety_threshold, model=self.classifier.name)
                for score in scores]

    def sign_png(self, image: Image.Image, generator: Generator, *, watermark: bool = True) -> bytes:
        """The output as written and served: invisible mark, PNG (compress_level 1, as utils.storage
        writes outputs), C2PA manifest."""
        if watermark:
            from utils.safety.watermark import embed

            image = embed(image)
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return self._sign(buf.getvalue(), generator)

    def sign_jpeg(self, data: bytes, generator: Generator) -> bytes:
        """A thumbnail's JPEG bytes with the manifest (too small for the watermark)."""
        return self._sign(data, generator)

    def _sign(self, data: bytes, generator: Generator) -> bytes:
        if self.signer is None:
            raise RuntimeError("SafetyGuard.setup(signer=True) was not called")
        return self.signer.sign(data, generator)

    # ------------------------------------------------------------------ status
    def status(self, *, age_gate: tuple[bool, str] | None = None) -> dict[str, Any]:
        """The /system-status ``safety`` block. ``age_gate``: the face backend's
        ``policy.backend_age_gate(backend.name, backend.has_age_model)``."""
        s = self.settings
        out: dict[str, Any] = {
            "mode": s.safety_mode,
            "threshold": s.safety_threshold,
            "classifier": self.classifier_note,
            "prompt_terms": {"file": str(s.resolved_safety_terms_file), "terms": len(self.terms) if self.terms else 0},
            "signer": self.signer.status() if self.signer else None,
            "watermark": "DWT-DCT-SVD (invisible-watermark's dwtDctSvd format), 48 bits, on images of at least 256x256 pixels",
        }
        if age_gate is not None:
            out["age_gate"] = {"on": age_gate[0], "min_apparent_age": s.min_apparent_age, "reason": age_gate[1]}
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out
