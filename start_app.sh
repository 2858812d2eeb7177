#!/usr/bin/env bash
# Runs the service: sets up the virtualenv (first run takes a few minutes), checks the settings, and
# serves app:create_app() with gunicorn on TWIN_HOST:TWIN_PORT (default 127.0.0.1:5000).
# Without real weights the generator runs the tiny demo profile (TWIN_MODEL_PROFILE=auto) and this
# script says so loudly once the service is up. All TWIN_* settings: see README "Settings".
#   VENV=/path/to/venv      use another virtualenv (default .venv)
#   SKIP_VENV_SETUP=1       do not install/refresh requirements (the venv is already complete)
#   SKIP_VERIFY=1           do not run the weights preflight (python model_loader.py verify) before loading
#   SKIP_STORAGE_CHECK=1    do not run the storage preflight (flask --app app check-storage) with an S3 bucket
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ "${SKIP_VENV_SETUP:-0}" != 1 ]; then
  scripts/setup_venv.sh "$VENV" runtime
fi
PY="$VENV/bin/python"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
HOST=${TWIN_HOST:-127.0.0.1}
PORT=${TWIN_PORT:-5000}

# Stop here with a clear message if a setting is invalid (gunicorn would only print a traceback).
"$PY" - <<'PYEOF' || exit 2
import sys
from utils.config import Settings
from utils.errors import ConfigError
try:
    s = Settings.from_env()
except ConfigError as e:
    sys.exit(f"[start_app] invalid setting: {e.message}")
if not s.is_loopback_bind and not s.api_key_list and not s.allow_anonymous:
    sys.exit(f"[start_app] TWIN_HOST={s.host} is reachable from the network: set TWIN_API_KEYS "
             "(or TWIN_ALLOW_ANONYMOUS=1 to serve without keys)")
print(f"[start_app] data in {s.data_dir.resolve()}, model profile {s.model_profile}, face backend {s.face_backend}")
PYEOF

# Storage preflight with a bucket (TWIN_STORAGE_URL=s3://...): write, read and delete a probe object; one
# line per step; wrong credentials, a missing bucket or an unreachable endpoint stop here, naming the setting.
case "${TWIN_STORAGE_URL:-}" in
  s3://*)
    if [ "${SKIP_STORAGE_CHECK:-0}" != 1 ]; then
      "$PY" -m flask --app app check-storage || { echo "[start_app] storage preflight failed (see the lines above): check TWIN_STORAGE_URL, TWIN_S3_ENDPOINT_URL and the AWS credentials" >&2; exit 2; }
    fi ;;
esac
# Preflight: every weight file the configured profile / variant loads is opened (headers only) and checked
# against what the code builds; one line per file; a missing, truncated or mismatched file stops here.
# A cluster's API node (TWIN_QUEUE_URL set) holds no model: its GPU workers run the preflight (start_worker.sh).
if [ -n "${TWIN_QUEUE_URL:-}" ]; then
  echo "[start_app] cluster mode: this API node loads no model (the GPU workers run the weights preflight)" >&2
elif [ "${SKIP_VERIFY:-0}" != 1 ]; then
  "$PY" model_loader.py verify || { echo "[start_app] weights preflight failed (see the lines above); fix the files or run: python model_loader.py download" >&2; exit 2; }
fi

# Once the service is ready, say loudly whether it runs real weights or the tiny demo model.
(
  for _ in $(seq 1 600); do
    body=$(curl -fsS "http://$HOST:$PORT/health" 2>/dev/null || true)
    case $body in
      *'"state":"ready"'*|*'"state": "ready"'*)
        if echo "$body" | grep -q '"is_demo": *true'; then
          {
            echo
            echo "############################################################################"
            echo "# DEMO MODE: no real SDXL weights found - the tiny offline model is serving. #"
            echo "# Images are NOT real portraits. GPU box: see README 'Model download'.     #"
            echo "############################################################################"
            echo
          } >&2
        fi
        echo "[start_app] ready: http://$HOST:$PORT/health  test page: http://$HOST:$PORT/test" >&2
        exit 0 ;;
      *'"state":"setup_failed"'*|*'"state": "setup_failed"'*)
        echo "[start_app] SET-UP FAILED: $body" >&2; exit 0 ;;
    esac
    sleep 1
  done
) &

exec "$VENV/bin/gunicorn" -c gunicorn.conf.py 'app:create_app()'
