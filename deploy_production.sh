#!/usr/bin/env bash
# Installs the service on a GPU box as a systemd unit: copies the code to $PREFIX, builds a venv with
# the CUDA build of torch, downloads the real weights, writes /etc/digital-twin/env and enables
# digital-twin.service. Run as root on the box (it needs internet access for pip and the model hub).
#   --role all      (default) today's single box: API + in-process GPU workers, SQLite job store
#   --role api      cluster API node: digital-twin.service with TWIN_QUEUE_URL (README "Scale-out")
#   --role worker   cluster GPU box: digital-twin-worker@N.service per GPU (template unit; N = GPU index)
#   TWIN_QUEUE_URL=redis://HOST:6379/0   required for api/worker; TWIN_DATA_DIR: the shared volume
#   WORKER_GPUS="0 1"   GPUs to start workers on (default: every GPU nvidia-smi lists, else "0")
#   PREFIX=/opt/digital-twin  SERVICE_USER=twin  TORCH_INDEX=https://download.pytorch.org/whl/cu128
#   TWIN_HOST/TWIN_PORT/TWIN_API_KEYS/...   written into the env file on first install
#   DRY_RUN=1   print the unit and env file and change nothing
set -euo pipefail
ROLE=all
while [ $# -gt 0 ]; do
  case $1 in
    --role) ROLE=${2:-}; shift 2 ;;
    --role=*) ROLE=${1#--role=}; shift ;;
    *) echo "unknown argument: $1 (usage: $0 [--role all|api|worker])" >&2; exit 2 ;;
  esac
done
case $ROLE in all|api|worker) ;; *) echo "--role $ROLE is not one of all, api, worker" >&2; exit 2 ;; esac
if [ "$ROLE" != all ] && [ -z "${TWIN_QUEUE_URL:-}" ]; then
  echo "--role $ROLE needs TWIN_QUEUE_URL=redis://HOST:PORT/DB (the Redis every node shares)" >&2; exit 2
fi
SRC=$(cd "$(dirname "$0")" && pwd)
PREFIX=${PREFIX:-/opt/digital-twin}
SERVICE_USER=${SERVICE_USER:-twin}
UNIT=digital-twin.service
WORKER_UNIT=digital-twin-worker@.service
TWIN_DATA_DIR=${TWIN_DATA_DIR:-$PREFIX/twin_data}
ENV_DIR=/etc/digital-twin
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
TORCH_PIN=$(grep -E '^torch==' "$SRC/requirements.txt")

unit() {
cat <<UNITEOF
[Unit]
Description=Digital Twin generator (Flask + gunicorn, SDXL + IP-Adapter)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=$SERVICE_USER
Group=$SERVICE_USER
WorkingDirectory=$PREFIX
EnvironmentFile=$ENV_DIR/env
Environment=PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ExecStart=$PREFIX/.venv/bin/gunicorn -c $PREFIX/gunicorn.conf.py app:create_app()
# Stop: SIGTERM to gunicorn's arbiter only (KillMode=mixed); it forwards it to the worker, which refuses
# new work (503 shutting_down), lets the running job finish for TWIN_DRAIN_SECONDS (25) or re-queues it,
# keeps queued jobs in SQLite, and exits 0. gunicorn's graceful_timeout is the drain + 10 s (35); systemd
# SIGKILLs what is left after TimeoutStopSec: keep it above both when you raise TWIN_DRAIN_SECONDS.
# After a crash or SIGKILL, a job that was running ends failed/interrupted (or re-queues, TWIN_REQUEUE_INTERRUPTED).
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=50
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=full
ReadWritePaths=$TWIN_DATA_DIR $PREFIX/models

[Install]
WantedBy=multi-user.target
UNITEOF
}

# Cluster GPU worker, one instance per GPU: digital-twin-worker@0, @1, ... (%i = the GPU index).
worker_unit() {
cat <<UNITEOF
[Unit]
Description=Digital Twin GPU worker %i (RQ on TWIN_QUEUE_URL)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=$SERVICE_USER
Group=$SERVICE_USER
WorkingDirectory=$PREFIX
EnvironmentFile=$ENV_DIR/env
Environment=PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=%i
ExecStart=$PREFIX/.venv/bin/python -m utils.jobs.cluster.worker --name %H.gpu%i
# Stop: SIGTERM; the running job finishes within TWIN_DRAIN_SECONDS (25) or goes back to the queue, then
# exit 0. A killed worker's job is re-run on another worker (TWIN_JOB_ATTEMPTS).
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=50
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=full
ReadWritePaths=$TWIN_DATA_DIR $PREFIX/models

[Install]
WantedBy=multi-user.target
UNITEOF
}

worker_gpus() {
  if [ -n "${WORKER_GPUS:-}" ]; then echo "$WORKER_GPUS"; return; fi
  local n
  n=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ' || true)
  echo "${n:-0}"
}

envfile() {
cat <<ENVEOF
# Settings for digital-twin.service (all TWIN_* variables: README "Settings").
TWIN_HOST=${TWIN_HOST:-0.0.0.0}
TWIN_PORT=${TWIN_PORT:-5000}
TWIN_API_KEYS=${TWIN_API_KEYS:-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')}
TWIN_MODEL_PROFILE=${TWIN_MODEL_PROFILE:-sdxl}
TWIN_DEVICE=${TWIN_DEVICE:-cuda}
TWIN_DATA_DIR=$TWIN_DATA_DIR
TWIN_MODEL_DIR=$PREFIX/models
${TWIN_QUEUE_URL:+TWIN_QUEUE_URL=$TWIN_QUEUE_URL}
ENVEOF
}

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "# $ENV_DIR/env"; envfile | sed 's/^TWIN_API_KEYS=.*/TWIN_API_KEYS=<generated>/'
  if [ "$ROLE" != worker ]; then echo "# /etc/systemd/system/$UNIT"; unit; fi
  if [ "$ROLE" = worker ]; then
    echo "# /etc/systemd/system/$WORKER_UNIT"; worker_unit
    echo "# enabled: $(for g in $(worker_gpus); do printf 'digital-twin-worker@%s ' "$g"; done)"
  fi
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "run as root (it installs a systemd unit)" >&2; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader \
  || echo "[deploy] WARNING: nvidia-smi not found; the service will run on CPU" >&2

id "$SERVICE_USER" >/dev/null 2>&1 || useradd --system --home "$PREFIX" --shell /usr/sbin/nologin "$SERVICE_USER"
mkdir -p "$PREFIX" "$ENV_DIR"
# Code only: runtime data and weights in $PREFIX are kept across re-deploys.
tar -C "$SRC" --exclude=.git --exclude=.venv --exclude=twin_data --exclude=models -cf - . | tar -C "$PREFIX" -xf -
mkdir -p "$TWIN_DATA_DIR" "$PREFIX/models"

echo "[deploy] venv with CUDA torch ($TORCH_PIN from $TORCH_INDEX)" >&2
[ -x "$PREFIX/.venv/bin/python" ] || python3 -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/pip" install -q --upgrade pip
"$PREFIX/.venv/bin/pip" install -q "$TORCH_PIN" --index-url "$TORCH_INDEX"
"$PREFIX/.venv/bin/pip" install -q -r "$PREFIX/requirements.txt"
"$PREFIX/.venv/bin/pip" install -q --no-deps -r "$PREFIX/requirements-nodeps.txt"
# FLUX's weight-only quantization (TWIN_FLUX_MEMORY=quantized / auto on a smaller GPU): torchao, GPU boxes only.
"$PREFIX/.venv/bin/pip" install -q -r "$PREFIX/requirements-gpu.txt"
# InsightFace (ArcFace variants) on the GPU: onnxruntime-gpu of the pinned series replaces the CPU build
# (both provide the `onnxruntime` module; keeping both makes the import pick one at random).
ORT_GPU_PIN=$(grep -E '^onnxruntime==' "$SRC/requirements.txt" | sed 's/^onnxruntime==/onnxruntime-gpu==/')
"$PREFIX/.venv/bin/pip" uninstall -q -y onnxruntime
"$PREFIX/.venv/bin/pip" install -q "$ORT_GPU_PIN"

if [ ! -f "$ENV_DIR/env" ]; then
  envfile > "$ENV_DIR/env"
  chmod 640 "$ENV_DIR/env"
  chgrp "$SERVICE_USER" "$ENV_DIR/env"
  echo "[deploy] wrote $ENV_DIR/env (API key inside; clients send 'Authorization: Bearer <key>')" >&2
fi

echo "[deploy] downloading model weights into $PREFIX/models (several GB)" >&2
( cd "$PREFIX" && set -a && . "$ENV_DIR/env" && set +a && HF_HUB_OFFLINE=0 .venv/bin/python model_loader.py download )
chown -R "$SERVICE_USER:$SERVICE_USER" "$TWIN_DATA_DIR" "$PREFIX/models"

if [ "$ROLE" = worker ]; then
  worker_unit > "/etc/systemd/system/$WORKER_UNIT"
  systemctl daemon-reload
  for g in $(worker_gpus); do
    systemctl enable --now "digital-twin-worker@$g"
    systemctl restart "digital-twin-worker@$g"
  done
  sleep 5
  for g in $(worker_gpus); do
    systemctl is-active --quiet "digital-twin-worker@$g" \
      || { echo "[deploy] digital-twin-worker@$g is not running: journalctl -u digital-twin-worker@$g" >&2; exit 1; }
  done
  echo "[deploy] workers running on GPUs: $(worker_gpus); logs: journalctl -u 'digital-twin-worker@*' -f" >&2
  exit 0
fi

unit > "/etc/systemd/system/$UNIT"
systemctl daemon-reload
systemctl enable --now "$UNIT"
systemctl restart "$UNIT"
set -a; . "$ENV_DIR/env"; set +a
for _ in $(seq 1 300); do
  state=$(curl -fsS "http://127.0.0.1:${TWIN_PORT}/health" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null || true)
  [ "$state" = ready ] && { echo "[deploy] ready on port $TWIN_PORT; logs: journalctl -u $UNIT -f" >&2; exit 0; }
  [ "$state" = setup_failed ] && { echo "[deploy] set-up failed: curl localhost:$TWIN_PORT/health; journalctl -u $UNIT" >&2; exit 1; }
  sleep 2
done
echo "[deploy] not ready after 10 minutes; journalctl -u $UNIT" >&2
exit 1
