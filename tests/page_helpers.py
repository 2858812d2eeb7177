"""Helpers for the browser test of the /test page: finding Debian's chromium, launching it through
Playwright (never `playwright install`), reading PNG headers, and a development server on the fakes.

Development server (no engines needed; slow steps so progress is visible)::

    .venv/bin/python -m tests.page_helpers --port 5055 --step-seconds 0.3
"""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Flags for a headless Debian chromium on a machine with no network: no GPU, no background
# traffic (component updates, sync, QUIC probing) that would stall or make network calls.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def selfie_paths(folder: Path, n: int) -> list[str]:
    """``n`` real selfies of one person (tests/photos.selfie_set) written to ``folder``, for the file input."""
    from tests.photos import selfie_set
    paths = []
    for name, data in selfie_set(n):
        (folder / name).write_bytes(data)
        paths.append(str(folder / name))
    return paths


def find_chromium() -> str | None:
    """Debian's chromium: $CHROMIUM, then PATH, then the Debian location."""
    for cand in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; AssertionError when the bytes are not a PNG."""
    assert data[:8] == PNG_SIGNATURE, f"not a PNG: starts with {data[:8]!r}"
    assert data[12:16] == b"IHDR", "PNG without IHDR as first chunk"
    return struct.unpack(">II", data[16:24])


def main() -> None:  # development server on the fakes
    import argparse

    from app import create_app
    from tests.fakes import FakeFaceService, FakeGenerator
    from utils.config import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=5055)
    ap.add_argument("--step-seconds", type=float, default=0.3)
    ap.add_argument("--setup-seconds", type=float, default=0.0, help="stay 'starting' this long")
    ap.add_argument("--setup-error", default="", help="fail set-up with this message (setup_failed)")
    ap.add_argument("--data-dir", default="/tmp/twin-page-dev")
    args = ap.parse_args()
    settings = Settings(data_dir=Path(args.data_dir), port=args.port, retention_hours=0, warmup=False)
    gen = FakeGenerator(step_seconds=args.step_seconds, setup_seconds=args.setup_seconds,
                        setup_error=RuntimeError(args.setup_error) if args.setup_error else None)
    from tests.fakes import fake_safety
    app = create_app(settings, generator=gen, faces=FakeFaceService(), safety=fake_safety(settings))
    app.run(host="127.0.0.1", port=args.port, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
