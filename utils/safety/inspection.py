"""What ``python generate_twin.py provenance FILE…`` prints per file: the Content Credentials' state and
source type, and whether the invisible mark is there (``inspect_image``); ``exit_code`` for the batch."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from utils.safety.provenance import ProvenanceError, ProvenanceReport, read_provenance
from utils.safety.watermark import MarkReading, detect


@dataclass(frozen=True)
class Inspection:
    manifest: ProvenanceReport | None       # None: not a PNG / JPEG
    mark: MarkReading | None
    error: str | None = None

    @property
    def ai_made(self) -> bool:
        """Either signal says the service made it (a tampered manifest still carries the mark's word)."""
        signed = self.manifest is not None and self.manifest.state in ("valid", "untrusted")
        return signed or bool(self.mark and self.mark.present)

    def line(self, name: str) -> str:
        if self.error:
            return f"{name}: {self.error}"
        m, w = self.manifest, self.mark
        why = f" ({', '.join(m.codes)})" if m.codes and m.state != "valid" else ""
        manifest = f"manifest {m.state}{why}"
        if m.source_type:
            manifest += f", source {m.source_type}"
        agent = m.software_agent or {}
        if agent:
            manifest += f", by {agent.get('name')} {agent.get('version')} ({agent.get('model_family')}: " \
                        f"{agent.get('model')}, identity {agent.get('identity_method')})"
        if w is None or w.agreement is None:
            mark = "watermark: image too small to carry one"
        else:
            mark = f"watermark {'present' if w.present else 'absent'} ({round(w.agreement * 48)}/48 bits)"
        return f"{name}: {manifest}; {mark}"

    def to_json(self) -> dict[str, Any]:
        return {"manifest": self.manifest.to_json() if self.manifest else None,
                "watermark": self.mark.to_json() if self.mark else None, "error": self.error}


def inspect_image(data: bytes, *, trust_anchors: bytes | None = None) -> Inspection:
    from PIL import Image, UnidentifiedImageError

    try:
        manifest = read_provenance(data, trust_anchors=trust_anchors)
    except ProvenanceError as exc:
        return Inspection(None, None, str(exc))
    try:
        with Image.open(io.BytesIO(data)) as image:
            mark = detect(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:   # a manifest around pixels that do not decode
        return Inspection(manifest, None, f"manifest {manifest.state}; the pixels do not decode ({exc})")
    return Inspection(manifest, mark)


def exit_code(results: list[Inspection]) -> int:
    """0: every file carries a valid or untrusted manifest or the mark; 1: some file has neither, or a
    tampered manifest and no mark; 2: some file is not a PNG / JPEG."""
    if any(r.error for r in results):
        return 2
    return 0 if all(r.ai_made for r in results) else 1
