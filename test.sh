#!/usr/bin/env bash
# Sets up everything the tests need (venv, chromium) and runs the whole suite offline.
# Extra arguments go to pytest, e.g. ./test.sh -k upload -x
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
export VENV  # test_api.sh (run by the tests) uses the same venv
scripts/setup_venv.sh "$VENV" dev
scripts/setup_system.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
