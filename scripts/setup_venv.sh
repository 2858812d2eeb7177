#!/usr/bin/env bash
# Creates (or refreshes) a virtualenv with the project's requirements.
#   scripts/setup_venv.sh VENV_DIR [runtime|dev]
# Re-installs only when a requirements file changed (hash stamp in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
kind=${2:-runtime}
req=requirements.txt
[ "$kind" = dev ] && req=requirements-dev.txt
stamp="$venv/.requirements-$kind.sha256"
want=$(cat requirements.txt requirements-dev.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing $req into $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# torch first, pinned: a later requirement must not pull a multi-GB CUDA build onto a CPU machine.
"$venv/bin/pip" install -q --disable-pip-version-check "$(grep -E '^torch==' requirements.txt)"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
echo "$want" > "$stamp"
