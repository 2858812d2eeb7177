"""``python model_loader.py download | make-tiny | check | verify``: the argument parser and what each command
prints (the commands' reference is model_loader's docstring, the parser's description)."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from utils.config import Settings
from utils.errors import ModelWeightsMissing
from utils.models.download import download, download_flux, download_restore
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
    checks = verify_any(layout)
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
