"""``python generate_twin.py``: selfies -> identity -> portraits on the configured model, in one process.

It runs the service's own steps: the face service validates the selfies, the engine builds the identity,
and the service's JobRunner makes the candidates, ranks and restores them and writes the outputs (into
--out instead of the session's storage). ``evaluate`` (utils/cli/evaluate.py) scores portraits.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from utils.cli.compare import compare_main
from utils.cli.evaluate import default_face_service, evaluate_main, image_files
from utils.config import Settings
from utils.engine.request import REQUEST_FIELDS, GenerationRequest
from utils.errors import InvalidRequest, TwinError
from utils.service.output_safety import prompt_fields, selfie_age_gate
from utils.service.runner import FolderSink, JobRunner, Likeness
from utils.service.wiring import build_safety
from utils.service.twins import resolve_mode, twin_from_dir

# CLI names that predate the field table and differ from the field name; every other field is --kebab-case.
CLI_FLAG_ALIASES = {"quality_mode": "--quality", "identity_strength": "--strength", "strength": "--img2img-strength"}
_CLI_TYPES = {"string": str, "integer": int, "number": float}


def cli_flag(name: str) -> str:
    return CLI_FLAG_ALIASES.get(name, "--" + name.replace("_", "-"))


def _json_arg(flag: str) -> Callable[[str], Any]:
    """object/array flags: JSON text, or @file.json (persona sheets are easier kept in a file)."""
    def parse(text: str) -> Any:
        src = text
        if text.startswith("@"):
            try:
                src = Path(text[1:]).read_text()
            except OSError as e:
                raise argparse.ArgumentTypeError(f"{flag} {text!r}: cannot read the file ({e.strerror})")
        try:
            return json.loads(src)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not JSON ({e.msg})")
    return parse


def add_request_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per REQUEST_FIELDS row, so a new field reaches the CLI without anyone listing it here.
    Types and static enums come from the row; range/enum checks that need settings (limits, style names)
    are left to GenerationRequest.from_dict, exactly as the API applies them. Defaults stay None: an
    absent flag is an absent JSON key."""
    for f in REQUEST_FIELDS:
        flag = cli_flag(f.name)
        # argparse formats help with %: a literal one in a field doc must not break --help
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": (f.doc or "").replace("%", "%%") or None}
        if f.kind == "boolean":
            kw["action"] = argparse.BooleanOptionalAction
        elif f.kind in ("object", "array"):
            kw["type"], kw["metavar"] = _json_arg(flag), "JSON|@FILE"
        else:
            kw["type"] = _CLI_TYPES[f.kind]
            if f.enum is not None and not callable(f.enum):
                kw["choices"] = tuple(f.enum)
        if f.name == "init_image":
            kw["metavar"], kw["help"] = "PATH", "img2img: start from this picture (a file path here)"
        if f.required:
            kw["required"] = True
        ap.add_argument(flag, **kw)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Selfies -> identity -> portraits (or, with --identity none, an "
                                 "avatar from the prompt, --persona and --attributes alone), on the configured model "
                                 "profile.")
    ap.add_argument("--selfies", type=Path, help="folder of selfie photos (not with --identity none)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    add_request_flags(ap)  # --prompt and every other request field
    ap.add_argument("--combine", choices=("average", "stack"), help="how selfies become one identity")
    ap.add_argument("--twin-lora", type=Path, help="a trained twin LoRA's folder (twin_lora.safetensors + "
                    "record.json, e.g. a session's twin/ folder) for --identity-mode lora | both | auto")
    ap.add_argument("--profile", choices=("auto", "sdxl", "flux", "tiny", "tiny-flux"),
                    help="override TWIN_MODEL_PROFILE")
    return ap.parse_args(argv)


def request_payload(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags given: absent fields take the same defaults the API applies."""
    payload = {f.name: getattr(args, f.name) for f in REQUEST_FIELDS if getattr(args, f.name, None) is not None}
    if "init_image" in payload:  # a path here; the API's inline base64 form from it
        init = Path(payload["init_image"])
        if not init.is_file():
            raise InvalidRequest(f"--init-image {str(init)!r} is not a file")
        payload["init_image"] = base64.b64encode(init.read_bytes()).decode()
    return payload


def main(argv: list[str] | None = None, *, face_service_factory: Callable[[Settings], Any] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:
        if "--compare-modes" in argv:
            return compare_main(argv[1:], face_service_factory)
        return evaluate_main(argv[1:], face_service_factory)
    if argv[:1] == ["provenance"]:
        from utils.cli.provenance import provenance_main
        return provenance_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in (("model_profile", args.profile), ("identity_combine", args.combine)) if v}
    settings = Settings.from_env(**overrides)
    t0 = time.perf_counter()
    try:
        req = GenerationRequest.from_dict(request_payload(args), settings)
        files = _selfie_files(args.selfies, req)
        if files:   # a face identity is used: refuse explicit text before any model loads (as POST /generate)
            build_safety(settings).load_terms().check_prompt(prompt_fields(req, settings))
        faces, engine = _set_up(settings, req, len(files), face_service_factory)
        twin = twin_from_dir(args.twin_lora) if args.twin_lora else None
        req = req.with_twin(*resolve_mode(twin, req.identity_mode, engine.info(), f"--twin-lora {args.twin_lora}",
                                          "give --twin-lora DIR (a session's twin folder)"))
        req, likeness, gate = (_identity(engine, faces, files, req, args.out, settings) if files
                               else (req, Likeness(has_identity=False), None))
        if req.identity_mode == "lora":   # the twin LoRA alone: no identity adapter
            req = req.with_identity(None)
        sink, meta = _produce(settings, engine, faces, req, likeness, args.out, gate)
    except TwinError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    _write_metadata(args.out, req, meta, sink.outputs, likeness, t0)
    return 0


def _selfie_files(folder: Path | None, req) -> list[tuple[str, bytes]]:
    """The selfies to build the identity from; none with --identity none (as the API takes no session_id)."""
    if req.identity_source == "none":
        if folder is not None:
            raise InvalidRequest("--identity none makes an avatar without selfies: leave out --selfies")
        return []
    if folder is None:
        raise InvalidRequest("--selfies is required (or --identity none for an avatar without selfies)")
    files = [(p.name, p.read_bytes()) for p in image_files(folder)]
    if not files:
        raise InvalidRequest(f"no images found in --selfies {str(folder)!r}")
    return files


def _set_up(settings: Settings, req, n_files: int, face_service_factory):
    from utils.engine.generator import DigitalTwinGenerator
    from utils.service.face_setup import check_face_backend
    print(f"[1/4] loading face service and model ({n_files or 'no'} photos)", flush=True)
    faces = (face_service_factory or default_face_service)(settings)
    faces.setup()
    check_face_backend(settings, faces)
    engine = DigitalTwinGenerator(settings).setup()
    if req.model is not None:
        # --model: the same switch POST /models/load makes; an unknown name is InvalidRequest listing them.
        engine.load_model(req.model)
    info = engine.info()
    print(f"      model: {info['profile']} {info.get('family') or ''} ({info['model_name']}) on {info['device']}/"
          f"{info['dtype']}, identity method {info['variant'] or 'none'}"
          + ("  ** DEMO MODEL: outputs are not portraits **" if info["is_demo"] else ""), flush=True)
    return faces, engine


def _identity(engine, faces, files, req, out: Path, settings: Settings):
    """Validate the selfies, build the identity (saved as identity.safetensors in --out), what the outputs
    are scored against, and the selfies' apparent-age gate (held: judged in block mode whatever the mode)."""
    from utils.service.identity import build_identity
    print("[2/4] checking faces", flush=True)
    report = faces.validate_selfies(files)
    for r in report.rejected:
        print(f"      rejected {r.filename}: {r.message}")
    if not report.accepted:
        raise InvalidRequest("no selfie was accepted; nothing to build an identity from")
    print(f"      accepted {len(report.accepted)} of {len(files)}", flush=True)
    gate = selfie_age_gate(faces, report, settings.min_apparent_age)
    if gate.held:      # said without the estimate
        print(f"      safety: {gate.reason}", flush=True)
    print("[3/4] building identity", flush=True)
    identity = build_identity(engine, report)
    out.mkdir(parents=True, exist_ok=True)
    if identity is not None:
        identity.save(out / "identity.safetensors")
    else:   # FLUX has no identity method yet: the portraits are made without it (metadata.json says so)
        print(f"      no identity: {engine.info().get('identity_note') or 'the model has no identity method'}",
              flush=True)
    try:   # the reference the scores are read against (the API records it at upload)
        self_sim = faces.self_similarity([a.embedding for a in report.accepted])
    except Exception:  # noqa: BLE001 - a reference number, never a reason to fail
        self_sim = None
    return (req.with_identity(identity), Likeness(report.template, None if self_sim is None else round(float(self_sim), 4)),
            gate)


def _produce(settings: Settings, engine, faces, req, likeness: Likeness, out: Path, gate=None):
    """The service's JobRunner, writing into --out."""
    from utils.service.output_safety import setup_args
    from utils.service.wiring import build_restorer
    safety = build_safety(settings).setup(**setup_args(settings, engine.info(), faces, True))
    restorer = None
    if req.restore_faces:
        restorer = build_restorer(settings, engine.info().get("profile"))
        restorer.check(req.restore_model)    # a missing model: exit 2 naming the file and the download command
    keep, total = req.num_images, req.candidates or req.num_images
    print(f"[4/4] generating {total} image(s)" + (f", keeping the best {keep}" if total > keep else ""), flush=True)

    def progress(step: int, total_steps: int, *preview) -> None:
        print(f"      step {step}/{total_steps}", flush=True)
    sink = FolderSink(out)
    meta = JobRunner(faces, lambda: restorer, safety).produce(engine, req, likeness, sink, progress, lambda: False,
                                                             gate)
    return sink, meta


def _write_metadata(out: Path, req, meta: dict, outputs: list[dict], likeness: Likeness, t0: float) -> None:
    result = {k: v for k, v in meta.items() if k != "service_timings"}
    body = {"request": req.to_dict(), "result": result, "outputs": outputs,
            "self_similarity": likeness.self_similarity, "wall_s": round(time.perf_counter() - t0, 2)}
    (out / "metadata.json").write_text(json.dumps(body, indent=1, default=str))
    for o in outputs:
        print(f"wrote {o['path']} (seed {o['seed']})" + (f" + {o['raw_filename']}" if o.get("raw_filename") else ""))
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)
