"""``python generate_twin.py evaluate --compare-modes``: the same prompt and seeds generated under each
identity mode (adapter / lora / both) with a trained twin LoRA, each portrait scored against the selfies;
printed as a likeness table beside the selfies' own agreement (the best a portrait can expect)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from utils.cli.evaluate import default_face_service, image_files
from utils.config import Settings
from utils.errors import InvalidRequest, TwinError

MODES = ("adapter", "lora", "both")


def compare_modes(settings: Settings, faces, engine, selfies: Path, twin_dir: Path, prompt: str,
                  seeds: list[int], modes: tuple[str, ...] = MODES, out: Path | None = None) -> dict[str, Any]:
    from utils.engine.request import GenerationRequest
    from utils.service.identity import build_identity
    from utils.service.twins import resolve_mode, twin_from_dir
    files = [(p.name, p.read_bytes()) for p in image_files(selfies)]
    if not files:
        raise InvalidRequest(f"no images found in --selfies {str(selfies)!r}")
    report = faces.validate_selfies(files)
    if not report.accepted:
        raise InvalidRequest(f"none of the {len(files)} selfies in {str(selfies)!r} was accepted")
    identity = build_identity(engine, report)
    twin = twin_from_dir(twin_dir)
    rows = []
    for mode in modes:
        use, ran = resolve_mode(twin, mode, engine.info(), f"--twin-lora {str(twin_dir)!r}",
                                "train one (POST /sessions/<id>/train) and give its twin/ folder")
        scores = []
        for seed in seeds:
            req = GenerationRequest.from_dict({"prompt": prompt, "seed": seed, "identity_mode": mode}, settings)
            req = req.with_twin(use, ran)
            if ran != "lora":
                req = req.with_identity(identity)
            image = engine.generate(req).images[0]
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                image.save(out / f"{ran}_{seed}.png")
            # A face service without a template (a test double) leaves the cell empty.
            score = None if report.template is None else faces.identity_similarity(image, report.template)
            scores.append(None if score is None else round(float(score), 4))
        found = [s for s in scores if s is not None]
        rows.append({"mode": ran, "seeds": seeds, "likeness": scores,
                     "mean": round(statistics.fmean(found), 4) if found else None})
    self_sim = faces.self_similarity([a.embedding for a in report.accepted])
    return {"prompt": prompt, "face_backend": faces.backend_name, "selfies_accepted": len(report.accepted),
            "self_similarity": None if self_sim is None else round(float(self_sim), 4), "modes": rows,
            "twin": None if twin is None else {"token": twin.token, "base_model": twin.base_model}}


def compare_main(argv: list[str], face_service_factory: Callable[[Settings], Any] | None = None) -> int:
    from utils.engine.generator import DigitalTwinGenerator
    ap = argparse.ArgumentParser(prog="generate_twin.py evaluate --compare-modes",
                                 description="Likeness per identity mode: adapter / lora / both, same prompt and seeds.")
    ap.add_argument("--compare-modes", action="store_true", required=True)
    ap.add_argument("--selfies", type=Path, required=True, help="folder of the person's selfies")
    ap.add_argument("--twin-lora", type=Path, required=True,
                    help="the trained twin's folder (twin_lora.safetensors + record.json)")
    ap.add_argument("--prompt", default="professional headshot, studio lighting")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--out", type=Path, help="also save the portraits here (<mode>_<seed>.png)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON to this file")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    try:
        faces = (face_service_factory or default_face_service)(settings)
        faces.setup()
        engine = DigitalTwinGenerator(settings).setup()
        rep = compare_modes(settings, faces, engine, args.selfies, args.twin_lora, args.prompt, args.seeds,
                            tuple(args.modes), args.out)
    except TwinError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    agree = rep["self_similarity"]
    print(f"face backend {rep['face_backend']}; {rep['selfies_accepted']} selfies agree at "
          + ("n/a" if agree is None else f"{agree:.3f}") + f"; prompt {rep['prompt']!r}")
    print(f"{'mode':8} " + " ".join(f"{'seed ' + str(s):>9}" for s in args.seeds) + f" {'mean':>7}")
    for r in rep["modes"]:
        cells = " ".join(f"{('-' if v is None else f'{v:.3f}'):>9}" for v in r["likeness"])
        print(f"{r['mode']:8} {cells} {('-' if r['mean'] is None else format(r['mean'], '.3f')):>7}")
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    return 0
