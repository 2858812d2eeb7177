#!/usr/bin/env bash
# Container entrypoint (Dockerfile; README "Containers"). The first argument is the role:
#   all        one box: API + in-process GPU workers, SQLite job store (no Redis)          [default]
#   api        cluster API node: gunicorn; needs TWIN_QUEUE_URL
#   worker     cluster GPU worker: one process per GPU it sees (WORKER_GPUS="0 1" to choose); needs TWIN_QUEUE_URL
#   download   fetch the real weights into TWIN_MODEL_DIR (arguments go to `model_loader.py download`)
#   verify     the weights preflight (`model_loader.py verify`)
# Anything else runs as a command (`docker run -it IMAGE bash`).
# api/all/worker start through the project's own scripts (start_app.sh, start_worker.sh) with the image's
# venv (SKIP_VENV_SETUP=1): the same settings checks and weights preflight as on a systemd box.
#   DOWNLOAD_WEIGHTS=1   api/all/worker: when the preflight fails (first start on an empty models volume),
#                        run the download first (DOWNLOAD_ARGS, e.g. "--instantid", go to it)
# Started as root (--user 0, or the root-start build target): creates and chowns the data, models and HF
# cache folders to the service user, then drops to it; nothing runs as root after that.
set -euo pipefail
APP=$(cd "$(dirname "$0")/.." && pwd)
cd "$APP"
PY=${VENV:-/opt/venv}/bin/python
RUN_AS=twin
ROLE_FILE=${CONTAINER_ROLE_FILE:-/tmp/twin-role}   # read by scripts/container_healthcheck.py

say() { echo "[entrypoint] $*" >&2; }
die() { say "$*"; exit 2; }

if [ "$(id -u)" = 0 ] && id "$RUN_AS" >/dev/null 2>&1; then
  for d in "${TWIN_DATA_DIR:-/data}" "${TWIN_MODEL_DIR:-/models}" "${HF_HOME:-/cache/huggingface}"; do
    mkdir -p "$d"
    # Recursive only when the top is not ours yet: a models volume holds tens of GB.
    [ "$(stat -c %u "$d")" = "$(id -u "$RUN_AS")" ] || chown -R "$RUN_AS:$RUN_AS" "$d"
  done
  export HOME=/home/$RUN_AS USER=$RUN_AS
  exec setpriv --reuid="$RUN_AS" --regid="$RUN_AS" --init-groups --inh-caps=-all --bounding-set=-all \
    "$0" "$@"
fi

role=${1:-all}
[ $# -gt 0 ] && shift

no_args() { [ $# -eq 0 ] || die "role $role takes no arguments (got: $*); settings are TWIN_* environment variables"; }
need_queue() {
  [ -n "${TWIN_QUEUE_URL:-}" ] || die "role $role needs TWIN_QUEUE_URL=redis://HOST:PORT/DB (the Redis every node shares)"
}
download_if_needed() {
  [ "${DOWNLOAD_WEIGHTS:-0}" = 1 ] || return 0
  if "$PY" model_loader.py verify >/dev/null 2>&1; then
    say "weights present (preflight passed): no download"
    return 0
  fi
  say "DOWNLOAD_WEIGHTS=1 and the preflight failed: downloading into ${TWIN_MODEL_DIR:-/models}"
  # shellcheck disable=SC2086  # DOWNLOAD_ARGS is a list of flags
  HF_HUB_OFFLINE=0 "$PY" model_loader.py download ${DOWNLOAD_ARGS:-}
}
mark_role() { echo "$1" > "$ROLE_FILE" 2>/dev/null || true; }

# Several GPUs in one container: one start_worker.sh per GPU, SIGTERM forwarded to each (each drains its
# job); if one exits on its own the others are stopped too, so the container ends and its restart policy
# brings all of them back.
run_workers() {
  local gpus=$1; shift
  local pids=() g stopping=0 rc=0 s
  for g in $gpus; do
    CUDA_VISIBLE_DEVICES=$g "$APP/start_worker.sh" --name "$(worker_name).gpu$g" "$@" &
    pids+=($!)
  done
  say "workers on GPUs $gpus: pids ${pids[*]}"
  trap 'stopping=1; kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
  wait -n "${pids[@]}" || rc=$?
  if [ "$stopping" = 0 ]; then
    say "a worker exited (status $rc): stopping the others"
    stopping=1
    kill -TERM "${pids[@]}" 2>/dev/null || true
    [ "$rc" != 0 ] || rc=1
  else
    rc=0
  fi
  for g in "${pids[@]}"; do
    # wait returns early (>128) when a trapped signal arrives; wait again until the child is gone.
    while kill -0 "$g" 2>/dev/null; do wait "$g" || true; done
    wait "$g" 2>/dev/null && s=0 || s=$?
    if [ "$s" != 0 ] && [ "$s" != 127 ] && [ "$rc" = 0 ]; then rc=$s; fi
  done
  exit "$rc"
}
# RQ worker names must be unique across the cluster; with --network host containers share a hostname and
# their processes the same pid, so the default HOST.PID is not enough.
worker_name() {
  echo "${WORKER_NAME:-${HOSTNAME:-worker}.$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
}

case $role in
  all)
    no_args "$@"
    [ -z "${TWIN_QUEUE_URL:-}" ] \
      || die "role all is one box without Redis: unset TWIN_QUEUE_URL, or run the api and worker roles"
    download_if_needed
    mark_role all
    exec "$APP/start_app.sh" ;;
  api)
    no_args "$@"
    need_queue
    download_if_needed
    mark_role api
    exec "$APP/start_app.sh" ;;
  worker)
    need_queue
    download_if_needed
    mark_role worker
    gpus=${WORKER_GPUS:-}
    if [ -z "$gpus" ] && command -v nvidia-smi >/dev/null 2>&1; then
      gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ' || true)
    fi
    if [ "$(wc -w <<<"$gpus")" -le 1 ]; then
      case " $* " in *" --name "*|*" --name="*) ;; *) set -- --name "$(worker_name)" "$@" ;; esac
      gpus=${gpus// /}
      [ -z "$gpus" ] || export CUDA_VISIBLE_DEVICES=$gpus
      exec "$APP/start_worker.sh" "$@"
    fi
    run_workers "$gpus" "$@" ;;
  download)
    export HF_HUB_OFFLINE=0
    exec "$PY" model_loader.py download "$@" ;;
  verify)
    exec "$PY" model_loader.py verify "$@" ;;
  *)
    exec "$role" "$@" ;;
esac
