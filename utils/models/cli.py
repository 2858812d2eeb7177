"""``python model_loader.py download | make-tiny | check | verify``: the argument parser and what each command
prints (the commands' reference is model_loader's docstring, the parser's description)."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from utils.config import Settings
from utils.errors import ModelWeightsMissing
from utils.models.download import download, download_classifier, download_flux, download_infiniteyou, download_restore
from utils.models.filecheck import FileCheck
from utils.models.layout import ANTELOPE_DIR, choose_profile, resolve_sdxl
from utils.models.startup import ready_layout, verify_any
from utils.models.tiny import make_tiny


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser(description).parse_args(argv)
    settings = Settings.from_env()
    if args.cmd == "download":
        return _download(args, settings)
    if args.cmd == "verify":
        return _verify(settings)
    if args.cmd == "make-tiny":
        t0 = time.perf_counter()
        root = make_tiny(args.dir)
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print(f"tiny model written to {root} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.2f} s)")
        return 0
    try:
        resolve_sdxl(settings)
        print("sdxl weights present")
    except ModelWeightsMissing as e:
        print(e.message)
        print(f"profile {settings.model_profile!r} would load: {choose_profile(settings)}")
    return 0


def _parser(description: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch the sdxl profile's weights (needs network)")
    d.add_argument("--dir", type=Path, default=None, help="target folder (default TWIN_MODEL_DIR)")
    d.add_argument("--faceid", action="store_true", help="also fetch IP-Adapter FaceID SDXL (non-commercial)")
    d.add_argument("--no-lightning", action="store_true", help="skip the SDXL-Lightning few-step LoRA")
    d.add_argument("--vae-fp16-fix", action="store_true",
                   help="also fetch the fp16-fix SDXL VAE (TWIN_VAE_FP16_FIX; fetched anyway when that is on)")
    d.add_argument("--restore", action="append", choices=("gfpgan", "codeformer", "gpen"),
                   help="fetch only this face restoration ONNX model (repeatable) into TWIN_RESTORE_MODEL_DIR")
    d.add_argument("--instantid", action="store_true",
                   help="only InstantID's files (IdentityNet + ip-adapter.bin; weights research-only) + the base model")
    d.add_argument("--faceid-plusv2", action="store_true",
                   help="only FaceID Plus v2 SDXL (non-commercial) + the ViT-H encoder + the base model")
    d.add_argument("--flux-dev", action="store_true",
                   help="only FLUX.1-dev's diffusers folders (gated, non-commercial licence: log in first) + the "
                        "Hyper-FLUX 8-step LoRA (unless --no-lightning)")
    d.add_argument("--flux-schnell", action="store_true", help="only FLUX.1-schnell's diffusers folders (Apache-2.0)")
    d.add_argument("--safety", action="store_true",
                   help="only the NSFW image classifier of the output safety check (fetched with every download "
                        "unless TWIN_SAFETY_MODE=off) into TWIN_SAFETY_MODEL_DIR")
    d.add_argument("--infiniteyou", action="store_true",
                   help="only InfiniteYou for FLUX (InfuseNet + projection, weights CC BY-NC 4.0) + antelopev2 "
                        "(non-commercial) + IR-SE50 ArcFace; the FLUX.1-dev folders come with --flux-dev")
    d.add_argument("--stage", choices=("sim_stage1", "aes_stage2"), default=None,
                   help="InfiniteYou weight set to fetch (default TWIN_INFINITEYOU_MODEL)")
    t = sub.add_parser("make-tiny", help="write the tiny offline model folder")
    t.add_argument("dir", type=Path)
    sub.add_parser("check", help="say which profile would load and why")
    sub.add_parser("verify", help="open every weight file the configured variant needs (headers only), compare "
                                  "names / shapes / dtypes with what the code builds; exit 1 on any problem")
    return ap


def _download(args: argparse.Namespace, settings: Settings) -> int:
    if args.dir:
        settings = settings.replace(model_dir=args.dir)
    if args.restore:
        for p in download_restore(settings, args.restore):
            print(p)
        return 0
    if args.safety or settings.safety_mode != "off":
        print(download_classifier(settings))
        if args.safety:
            return 0
    # The configured FLUX identity method comes with the FLUX download (as an SDXL variant's files come with SDXL's).
    if args.infiniteyou or (settings.ip_adapter_variant == "infiniteyou" and (args.flux_dev or args.flux_schnell)):
        for p in download_infiniteyou(settings, args.stage):
            print(p)
        if not (args.flux_dev or args.flux_schnell):
            return 0
    if args.flux_dev or args.flux_schnell:
        for p in download_flux(settings, dev=args.flux_dev, schnell=args.flux_schnell, fast_lora=not args.no_lightning):
            print(p)
        return 0
    for p in download(settings, faceid=args.faceid, lightning=not args.no_lightning, instantid=args.instantid,
                      faceid_plusv2=args.faceid_plusv2, vae_fix=args.vae_fp16_fix or None):
        print(p)
    if args.instantid or settings.ip_adapter_variant in ("instantid", "faceid-plusv2") or args.faceid_plusv2:
        print(f"InsightFace antelopev2 pack (non-commercial) is not on the hub: unzip antelopev2.zip from "
              f"https://github.com/deepinsight/insightface/releases into {Path(settings.model_dir) / ANTELOPE_DIR}")
    return 0


def _verify(settings: Settings) -> int:
    layout = ready_layout(settings)
    checks = verify_any(layout) + classifier_checks(settings, layout.profile)
    for c in checks:
        print(c.line())
    bad = [c for c in checks if not c.ok and c.blocking]
    warned = [c for c in checks if not c.ok and not c.blocking]
    absent = sum(c.status == "absent" for c in checks)
    skipped = sum(c.status == "skipped" for c in checks)
    print(f"verify: {len(checks) - len(bad) - len(warned) - absent - skipped} ok, {skipped} of the other family, "
          f"{absent} optional absent, "
          f"{len(warned)} warning(s), {len(bad)} problem(s) "
          f"(profile {layout.profile}, family {layout.family}, variant {layout.variant or 'none'})")
    return 1 if bad else 0


def classifier_checks(settings: Settings, profile: str) -> list[FileCheck]:
    """The safety classifier's files (header-only, utils/safety/classifier.py): where the service looks for
    them for this profile, then the Hugging Face cache. Not there: a problem, or one ``absent`` line when
    TWIN_SAFETY_MODE=off (the apparent-age gate then loads it only where InsightFace estimates ages)."""
    import dataclasses

    from utils.safety import classifier
    from utils.safety.guard import SafetyGuard
    where = SafetyGuard(settings).classifier_dir(profile)
    folder = classifier.find_classifier(where, settings.safety_model_repo)
    if folder is None:
        status = "absent" if settings.safety_mode == "off" else "missing"
        return [FileCheck(str(where), status, f"NSFW classifier {settings.safety_model_repo}: fetch it with "
                                              "`python model_loader.py download --safety`")]
    return [FileCheck(**dataclasses.asdict(c)) for c in classifier.verify_classifier(folder)]
