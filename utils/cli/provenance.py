"""``python generate_twin.py provenance FILE… [--trust-anchors PEM] [--json]``: for each image, the state of
its Content Credentials (valid, untrusted, tampered, absent), the digital source type, what made it, and
whether the invisible watermark is there (utils/safety/inspection.py). Exit 0 when every file carries a
signal that it is AI-made, 1 when some file has none, 2 when some file is not a PNG or JPEG or unreadable."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.safety.inspection import Inspection, exit_code, inspect_image


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="generate_twin.py provenance",
                                 description="Read the Content Credentials (C2PA) and the invisible watermark of images")
    ap.add_argument("files", nargs="+", type=Path, help="PNG or JPEG files")
    ap.add_argument("--trust-anchors", type=Path, default=None,
                    help="PEM file of CA certificates to trust (e.g. <data_dir>/c2pa/dev-ca.pem, or your CA): a file "
                         "signed under one reads 'valid'; without it an intact file reads 'untrusted'")
    ap.add_argument("--json", action="store_true", help="one JSON object per file instead of a line")
    return ap.parse_args(argv)


def provenance_main(argv: list[str]) -> int:
    args = parse_args(argv)
    anchors = None
    if args.trust_anchors is not None:
        try:
            anchors = args.trust_anchors.read_bytes()
        except OSError as e:
            print(f"error: --trust-anchors {args.trust_anchors}: {e.strerror or e}", file=sys.stderr)
            return 2
    results: list[Inspection] = []
    for path in args.files:
        try:
            result = inspect_image(path.read_bytes(), trust_anchors=anchors)
        except OSError as e:
            result = Inspection(None, None, f"cannot read the file ({e.strerror or e})")
        results.append(result)
        print(json.dumps({"file": str(path), **result.to_json()}) if args.json else result.line(str(path)),
              flush=True)
    return exit_code(results)
