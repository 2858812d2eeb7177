#!/usr/bin/env bash
# Cluster mode: one GPU worker (README "Scale-out"). Loads the models once, then runs jobs from the RQ
# queue in the Redis at TWIN_QUEUE_URL (required); run one per GPU, on any number of machines that share
# a mounted TWIN_DATA_DIR or an S3 bucket (TWIN_STORAGE_URL). Pick the GPU with CUDA_VISIBLE_DEVICES=N (or TWIN_DEVICE=cuda:N).
# SIGTERM: the running job finishes (or is re-queued after TWIN_DRAIN_SECONDS), then exit 0.
#   VENV=/path/to/venv      use another virtualenv (default .venv)
#   SKIP_VENV_SETUP=1       do not install/refresh requirements (the venv is already complete)
#   SKIP_VERIFY=1           do not run the weights preflight (python model_loader.py verify) before loading
#   SKIP_STORAGE_CHECK=1    do not run the storage preflight (flask --app app check-storage) with an S3 bucket
#   extra arguments go to `python -m utils.service.gpu_worker` (--name NAME, --burst)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ "${SKIP_VENV_SETUP:-0}" != 1 ]; then
  scripts/setup_venv.sh "$VENV" runtime
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
if [ -z "${TWIN_QUEUE_URL:-}" ]; then
  echo "[start_worker] set TWIN_QUEUE_URL=redis://HOST:PORT/DB (the Redis every API node uses)" >&2
  exit 2
fi
"$VENV/bin/python" - <<'PYEOF' || exit 2
import sys
from utils.config import Settings
from utils.errors import ConfigError
try:
    s = Settings.from_env()
except ConfigError as e:
    sys.exit(f"[start_worker] invalid setting: {e.message}")
print(f"[start_worker] queue {s.queue_url.split('@')[-1]}, data in {s.data_dir.resolve()}, "
      f"model profile {s.model_profile}, device {s.device}")
PYEOF
# Storage preflight with a bucket (TWIN_STORAGE_URL=s3://...): write, read and delete a probe object; one
# line per step; wrong credentials, a missing bucket or an unreachable endpoint stop here, naming the setting.
case "${TWIN_STORAGE_URL:-}" in
  s3://*)
    if [ "${SKIP_STORAGE_CHECK:-0}" != 1 ]; then
      "$VENV/bin/python" -m flask --app app check-storage || { echo "[start_worker] storage preflight failed (see the lines above): check TWIN_STORAGE_URL, TWIN_S3_ENDPOINT_URL and the AWS credentials" >&2; exit 2; }
    fi ;;
esac
# The same preflight as start_app.sh: a worker with a broken weight file would otherwise take jobs off the
# queue only to fail them.
if [ "${SKIP_VERIFY:-0}" != 1 ]; then
  "$VENV/bin/python" model_loader.py verify || { echo "[start_worker] weights preflight failed (see the lines above); fix the files or run: python model_loader.py download" >&2; exit 2; }
fi
exec "$VENV/bin/python" -m utils.service.gpu_worker "$@"
