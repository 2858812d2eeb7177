"""``flask --app app check-storage``: the storage preflight, as ``python model_loader.py verify`` is the
weights' one. It builds the configured storage (a bucket's credentials and existence are checked then),
writes, reads and deletes a probe object, and prints one line per step; exit 1 naming what failed.
start_app.sh and start_worker.sh run it when TWIN_STORAGE_URL names a bucket."""
from __future__ import annotations

import click

from utils.config import Settings
from utils.errors import TwinError
from utils.service import wiring

PREFIX = "[check-storage]"


def check_storage(settings: Settings, echo=click.echo) -> bool:
    where = settings.storage_url or f"{settings.data_dir.resolve()} (TWIN_DATA_DIR)"
    try:
        storage = wiring.build_storage(settings)
    except TwinError as e:
        echo(f"{PREFIX} FAILED: {e.message}")
        return False
    steps = storage.probe()
    for step, error in steps:
        echo(f"{PREFIX} {step}: {'ok' if error is None else 'FAILED: ' + error}")
    ok = bool(steps) and all(error is None for _, error in steps)
    echo(f"{PREFIX} {storage.backend} storage at {where}: {'ok' if ok else 'FAILED'}")
    return ok


@click.command("check-storage", help="Write, read and delete a probe object in the configured storage "
                                     "(TWIN_STORAGE_URL, else TWIN_DATA_DIR); exit 1 naming what failed.")
def check_storage_command() -> None:
    from flask import current_app
    settings = current_app.extensions.get("twin_settings") or Settings.from_env()
    if not check_storage(settings):
        raise SystemExit(1)
