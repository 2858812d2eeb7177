#!/usr/bin/env bash
# Container test (issue 28; README "Containers"): builds the image with podman from a local Debian base and
# checks it end to end, offline from image registries. CI runs it as its own stage (.ci/run).
#   1. base image: localhost/debian-bookworm:base, from a debootstrap rootfs cached in $CONTAINER_CACHE_DIR
#   2. build (CPU torch; the host's pip CA bundle and find-links mounted for the build only), image size
#   3. image config (non-root USER, HEALTHCHECK, no secret in ENV) and a scan of every layer for keys,
#      tokens, the host's CA bundle and weights (scripts/container_scan.py)
#   4. role `all` on the tiny profile: start -> ready, HEALTHCHECK turns healthy (and not before ready),
#      ./test_api.sh passes, every process runs as uid 10001
#   5. `podman stop` drains: the running job finishes (or is re-queued), exit 0, queued jobs survive and
#      all succeed after `podman start`
#   6. started as root (--user 0): volume folder chowned, then everything runs as uid 10001
#   7. compose (docker-compose.yml + docker-compose.cpu.yml, podman-compose): redis + api + one CPU worker,
#      the cluster flow (upload -> generate -> status -> download) through ./test_api.sh, run by the worker
# Needs root (rootful podman, debootstrap); installs podman, runc, debootstrap, netavark, aardvark-dns and
# iptables (netavark sets up the container network with it: without it "netavark: No such file") with
# apt when missing. Without them: a loud SKIP and exit 0 (CONTAINER_TEST_REQUIRED=1: exit 1 instead).
#   VENV=.venv                     python with requests/Pillow/scikit-image and podman-compose (as ./test.sh)
#   CONTAINER_CACHE_DIR=/var/cache/twin-containers   the cached base rootfs tarball
#   KEEP_IMAGE=1 (default)         keep the built image (the next run's build is then a cache hit)
# Every container, volume and network it starts is removed on exit, also on failure, Ctrl-C or SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${VENV:-.venv}
PY=$VENV/bin/python
CACHE=${CONTAINER_CACHE_DIR:-/var/cache/twin-containers}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/debian-bookworm:base
IMAGE=localhost/digital-twin:test
REDIS_IMAGE=localhost/twin-redis:test
export CONTAINERS_CONF=${CONTAINERS_CONF:-$REPO/scripts/containers.conf}
RUN_ID=twinct$$
T0=$(date +%s)
SKIPPED=0
WORK=
CHILD=
COMPOSE=()
FIGURES=()

say() { echo "[container-test $(( $(date +%s) - T0 ))s] $*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
figure() { FIGURES+=("$1: $2"); say "$1: $2"; }
skip() {
  {
    echo
    echo "###########################################################################"
    echo "# CONTAINER TEST SKIPPED: $*"
    echo "# The image was NOT built or tested on this machine."
    echo "###########################################################################"
    echo
  } >&2
  SKIPPED=1
  [ "${CONTAINER_TEST_REQUIRED:-0}" = 1 ] && exit 1
  exit 0
}
# Long steps run in the background so a SIGTERM (the CI stage's time limit) reaches the trap at once.
bg() {
  "$@" &
  CHILD=$!
  local rc=0
  wait "$CHILD" || rc=$?
  CHILD=
  return "$rc"
}
elapsed() { echo $(( $(date +%s) - $1 )); }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$CHILD" ]; then  # a long step still running: its children (a pipeline's) first, then it
    pkill -TERM -P "$CHILD" 2>/dev/null
    kill -TERM "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
  fi
  if [ -n "$WORK" ]; then  # set once the tools are there: from here on containers may exist
    [ ${#COMPOSE[@]} -gt 0 ] && "${COMPOSE[@]}" down -v -t 5 >/dev/null 2>&1
    for label in "twin-ct=$RUN_ID" "io.podman.compose.project=$RUN_ID"; do
      podman ps -aq --filter "label=$label" | xargs -r podman rm -f -v -t 0 >/dev/null 2>&1
      podman volume ls -q --filter "label=$label" | xargs -r podman volume rm -f >/dev/null 2>&1
    done
    podman network rm -f "${RUN_ID}_default" >/dev/null 2>&1
    [ "${KEEP_IMAGE:-1}" = 1 ] || podman rmi -f "$IMAGE" >/dev/null 2>&1
    left=$(podman ps -aq --filter "label=twin-ct=$RUN_ID"; podman ps -aq --filter "label=io.podman.compose.project=$RUN_ID")
    [ -z "$left" ] || { say "containers left after cleanup: $left"; rc=1; }
    rm -rf "$WORK"
  fi
  if [ "$SKIPPED" = 1 ]; then
    say "SKIPPED (exit $rc)"
  elif [ "$rc" = 0 ]; then
    say "PASSED in $(elapsed "$T0") s"
  else
    say "FAILED (exit $rc) after $(elapsed "$T0") s"
  fi
  for f in "${FIGURES[@]}"; do echo "  $f" >&2; done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# --- 0. tools ---
[ "$(id -u)" = 0 ] || skip "needs root (rootful podman and debootstrap); run as root or in a root CI job"
need=()
for tool in podman:podman runc:runc debootstrap:debootstrap netavark:/usr/lib/podman/netavark \
            aardvark-dns:/usr/lib/podman/aardvark-dns iptables:iptables curl:curl; do
  pkg=${tool%%:*} path=${tool#*:}
  command -v "$path" >/dev/null 2>&1 || [ -x "$path" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || skip "missing ${need[*]} and no apt-get to install them"
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/dev/null 2>&1 \
    || skip "could not install ${need[*]} with apt-get"
fi
[ -x "$PY" ] || fail "no python at $PY: run ./test.sh first (it sets up $VENV) or set VENV"
PODMAN_COMPOSE=$VENV/bin/podman-compose
[ -x "$PODMAN_COMPOSE" ] || fail "$PODMAN_COMPOSE missing: it is in requirements-dev.txt (scripts/setup_venv.sh $VENV dev)"
WORK=$(mktemp -d /tmp/twin-container-test.XXXXXX)
chmod 755 "$WORK"
say "podman $(podman version --format '{{.Client.Version}}'), runc, $("$PODMAN_COMPOSE" --version 2>/dev/null | head -1)"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
state_of() { curl -fsS "$1/health" 2>/dev/null | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null || echo down; }
wait_ready() {  # wait_ready URL SECONDS [CONTAINER] -> seconds to ready on stdout
  local t=$(date +%s) s
  while :; do
    s=$(state_of "$1")
    [ "$s" = ready ] && { elapsed "$t"; return 0; }
    [ "$s" = setup_failed ] && { [ -n "${3:-}" ] && podman logs --tail 40 "$3" >&2; fail "$1: setup_failed"; }
    [ "$(elapsed "$t")" -lt "$2" ] || { [ -n "${3:-}" ] && podman logs --tail 40 "$3" >&2; fail "$1 not ready after $2 s (state $s)"; }
    sleep 0.5
  done
}

# --- 1. base image ---
t=$(date +%s)
if podman image exists "$BASE"; then
  figure "base image" "$BASE present (cached)"
else
  tarball=$CACHE/debian-bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    mkdir -p "$CACHE"
    say "debootstrap --variant=minbase bookworm (once; cached in $tarball)"
    bg debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
    tar -C "$WORK/rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$WORK/rootfs"
  fi
  podman import -q "$tarball" "$BASE" >/dev/null
  figure "base image" "imported from $tarball in $(elapsed "$t") s"
fi

# --- 2. build ---
# pip inside the build reaches the index as pip does on this host: its CA bundle (a TLS-inspecting proxy)
# and its find-links folders (the CPU torch wheel), mounted for the build only.
pip_setting() { "$PY" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | head -1; }
build=(podman build --format docker --network host --build-arg "BASE_IMAGE=$BASE" --build-arg TORCH=cpu -t "$IMAGE")
cert=${PIP_CERT:-$(pip_setting cert)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  build+=(-v "$cert:/run/build/pip-cert.pem:ro" --build-arg PIP_CERT=/run/build/pip-cert.pem)
fi
links=() i=0
for d in ${PIP_FIND_LINKS:-$(pip_setting find-links)}; do
  [ -d "$d" ] || continue
  build+=(-v "$d:/run/build/find-links-$i:ro"); links+=("/run/build/find-links-$i"); i=$((i + 1))
done
[ ${#links[@]} -eq 0 ] || build+=(--build-arg "PIP_FIND_LINKS=${links[*]}")
index=${PIP_INDEX_URL:-$(pip_setting index-url)}
case $index in http*) build+=(--build-arg "PIP_INDEX_URL=$index") ;; *) index=https://pypi.org/simple ;; esac
# A CPU torch wheel in find-links is taken from there (its +cpu local version sorts above PyPI's build).
wheels=$(ls ${PIP_FIND_LINKS:-$(pip_setting find-links)} 2>/dev/null || true)
if [[ $wheels == *torch-*+cpu-* ]]; then
  build+=(--build-arg "TORCH_INDEX_URL=$index")
fi
t=$(date +%s)
previous=$(podman image inspect "$IMAGE" --format '{{.Id}}' 2>/dev/null || true)
say "building $IMAGE (nice -n 10; first build several minutes)"
bg nice -n 10 "${build[@]}" . > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "podman build failed"; }
# The image this build replaced would stay behind untagged, one per code change: remove it. Untagged
# builder stages (one per requirements change, ~2.3 GB) go after a week; the current one is the build
# cache, so a week-old one costs one pip install on the next run.
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect "$IMAGE" --format '{{.Id}}')" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
podman image prune -f --filter label=org.opencontainers.image.title=digital-twin --filter until=168h >/dev/null 2>&1 || true
figure "build" "$(elapsed "$t") s ($(grep -c -- '--> Using cache' "$WORK/build.log" || true) steps from cache)"
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
figure "image size" "$(( size / 1000000 )) MB"

# --- 3. image config and scan ---
user=$(podman image inspect "$IMAGE" --format '{{.Config.User}}')
case $user in ""|root|0|0:*|root:*) fail "image USER is '$user': it must be the unprivileged user" ;; esac
[[ $(podman image inspect "$IMAGE" --format '{{json .HealthCheck}}') == *container_healthcheck* ]] \
  || fail "image has no HEALTHCHECK (built without --format docker?)"
if [[ $(podman image inspect "$IMAGE" --format '{{json .Config.Env}}') =~ TWIN_(API_KEYS|ADMIN_KEYS|WEBHOOK_SECRET)=|TOKEN=|PIP_ ]]; then
  fail "the image's ENV holds a key, a token or the build's pip settings"
fi
t=$(date +%s)
ca=${cert:-/etc/ssl/certs/ca-certificates.crt}
say "scanning every layer (keys, tokens, the host's CA bundle $ca, weights)"
bg bash -c 'set -o pipefail; nice -n 10 podman save --format docker-archive "$1" 2>/dev/null | nice -n 10 "$2" scripts/container_scan.py --ca-bundle "$3" -' \
  _ "$IMAGE" "$PY" "$ca" || fail "the image scan found something (lines above)"
figure "layer scan" "$(elapsed "$t") s, clean"

# --- 4. role all, tiny profile ---
KEY=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
DATA=$WORK/data
mkdir -p "$DATA"
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
C=$RUN_ID-all
t=$(date +%s)
podman run -d --name "$C" --label "twin-ct=$RUN_ID" --stop-timeout 50 -p "127.0.0.1:$PORT:5000" \
  -v "$DATA:/data:U" -e "TWIN_API_KEYS=$KEY" -e TWIN_MODEL_PROFILE=tiny -e TWIN_DEVICE=cpu \
  "$IMAGE" all > /dev/null 2> >(grep -v 'systemd connection' >&2)
# The HEALTHCHECK, run as the (absent) systemd timer would: never healthy before /health says ready.
unhealthy_before=0
while :; do
  before=$(state_of "$URL")
  if podman healthcheck run "$C" >/dev/null 2>&1; then
    [ "$(state_of "$URL")" = ready ] || fail "HEALTHCHECK healthy while /health says $(state_of "$URL")"
    break
  fi
  [ "$before" != ready ] || fail "HEALTHCHECK unhealthy although /health said ready"
  unhealthy_before=$((unhealthy_before + 1))
  [ "$(elapsed "$t")" -lt 300 ] || { podman logs --tail 40 "$C" >&2; fail "not healthy after 300 s (state $before)"; }
  sleep 0.5
done
figure "start -> ready (role all, tiny, first start builds the tiny model)" "$(elapsed "$t") s"
status=$(podman inspect "$C" --format '{{.State.Health.Status}}')
[ "$status" = healthy ] || fail "health status '$status' after a passing check"
figure "HEALTHCHECK" "healthy once ready ($unhealthy_before unhealthy checks while starting)"
t=$(date +%s)
VENV=$VENV API_KEY=$KEY bg ./test_api.sh "$URL" > "$WORK/test_api.log" 2>&1 || { cat "$WORK/test_api.log" >&2; fail "test_api.sh against role all"; }
figure "test_api.sh (role all)" "OK in $(elapsed "$t") s"
users=$(podman top "$C" user | tail -n +2 | sort -u | tr '\n' ' ')
[ "$users" = "twin " ] || fail "processes run as: $users (want only twin)"
[ "$(podman exec "$C" id -u)" = 10001 ] || fail "podman exec runs as $(podman exec "$C" id -u)"
figure "non-root" "every process runs as twin (uid 10001)"

# --- 5. podman stop drains ---
"$PY" - "$URL" "$KEY" "$WORK/jobs" <<'PYEOF' || fail "could not start the jobs for the drain check"
import sys, time, requests
sys.path.insert(0, ".")
from tests.photos import selfie_set
url, key, out = sys.argv[1:]
s = requests.Session(); s.headers["Authorization"] = f"Bearer {key}"
r = s.post(url + "/upload", files=[("files", (n, d, "image/jpeg")) for n, d in selfie_set(3)], timeout=120)
assert r.status_code == 200, r.text
# The first job runs well past podman's default 10 s stop timeout (4 images of 384²: ~15 s here) but
# normally inside the 25 s drain window; the second waits in the queue.
big = {"prompt": "portrait", "num_images": 4, "width": 384, "height": 384, "quality_mode": "high_fidelity"}
small = {"prompt": "portrait", "num_images": 1, "width": 128, "height": 128}
ids = []
for body in (big, small):
    r = s.post(url + "/generate", json=body, timeout=30); assert r.status_code == 202, r.text
    ids.append(r.json()["id"])
deadline = time.time() + 120
while True:
    st = s.get(f"{url}/status/{ids[0]}", timeout=10).json()
    if st["status"] == "running" and st["progress"]["step"] >= 1:
        break
    assert time.time() < deadline and st["status"] in ("queued", "running"), st
    time.sleep(0.05)
open(out, "w").write(" ".join(ids))
PYEOF
t=$(date +%s.%N)
podman stop "$C" >/dev/null 2> >(grep -v 'systemd connection' >&2)
stop_s=$("$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t" "$(date +%s.%N)")
code=$(podman inspect "$C" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || { podman logs --tail 40 "$C" >&2; fail "container exit code $code after podman stop"; }
podman logs "$C" > "$WORK/all.log" 2>&1
grep -q '"drained"' "$WORK/all.log" || fail "no \"drained\" line in the log"
first=$("$PY" - "$DATA/jobs.db" $(cat "$WORK/jobs") <<'PYEOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = dict(db.execute(f"SELECT id, status FROM jobs WHERE id IN (?, ?)", sys.argv[2:4]).fetchall())
first, second = (rows.get(i) for i in sys.argv[2:4])
assert first in ("succeeded", "queued"), f"running job ended {first} (want finished or re-queued)"
assert second == "queued", f"queued job is {second} after the stop"
print({"succeeded": "finished", "queued": "re-queued"}[first])
PYEOF
) || fail "jobs after the stop (above)"
figure "podman stop (drain)" "$stop_s s, exit 0, running job $first, queued job kept"
podman start "$C" >/dev/null 2> >(grep -v 'systemd connection' >&2)
wait_ready "$URL" 300 "$C" >/dev/null
"$PY" - "$URL" "$KEY" $(cat "$WORK/jobs") <<'PYEOF' || fail "jobs after the restart"
import sys, time, requests
url, key, *ids = sys.argv[1:]
h = {"Authorization": f"Bearer {key}"}
deadline = time.time() + 240
while time.time() < deadline:
    st = {j: requests.get(f"{url}/status/{j}", headers=h, timeout=10).json()["status"] for j in ids}
    if all(v in ("succeeded", "failed", "canceled") for v in st.values()):
        break
    time.sleep(0.5)
assert all(v == "succeeded" for v in st.values()), st
PYEOF
figure "after podman start" "both jobs succeeded"
podman rm -f -v -t 5 "$C" >/dev/null 2>&1

# --- 6. started as root ---
mkdir -p "$WORK/rootstart"
out=$(podman run --rm --label "twin-ct=$RUN_ID" --user 0 -v "$WORK/rootstart:/data" "$IMAGE" \
  sh -c 'echo "$(id -u) $(stat -c %u /data)"' 2> >(grep -v 'systemd connection' >&2))
[ "$out" = "10001 10001" ] || fail "--user 0: got '$out' (want the command as uid 10001 and /data owned by it)"
figure "--user 0" "volume chowned, command ran as uid 10001"

# --- 7. compose: redis + api + one CPU worker ---
cat > "$WORK/redis.Containerfile" <<EOF
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/* \
 && mkdir /data && chown redis:redis /data
USER redis
EOF
bg nice -n 10 podman build --format docker --network host -t "$REDIS_IMAGE" -f "$WORK/redis.Containerfile" "$WORK" \
  > "$WORK/redis-build.log" 2>&1 || { tail -20 "$WORK/redis-build.log" >&2; fail "redis image build"; }
printf 'TWIN_API_KEYS=%s\nTWIN_LOG_LEVEL=INFO\n' "$KEY" > "$WORK/twin.env"
PORT2=$(free_port)
export TWIN_IMAGE=$IMAGE REDIS_IMAGE TWIN_ENV_FILE=$WORK/twin.env TWIN_PUBLISH=127.0.0.1:$PORT2
COMPOSE=("$PODMAN_COMPOSE" -p "$RUN_ID" -f docker-compose.yml -f docker-compose.cpu.yml)
t=$(date +%s)
bg "${COMPOSE[@]}" up -d --no-build > "$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log" >&2; fail "podman-compose up"; }
for svc in redis api worker; do
  [ -n "$(podman ps -q --filter "label=io.podman.compose.project=$RUN_ID" --filter "label=io.podman.compose.service=$svc")" ] \
    || { cat "$WORK/compose.log" >&2; fail "compose service $svc is not running"; }
done
wait_ready "http://127.0.0.1:$PORT2" 300 "${RUN_ID}_api_1" >/dev/null
figure "compose up -> api ready" "$(elapsed "$t") s"
t=$(date +%s)
VENV=$VENV API_KEY=$KEY bg ./test_api.sh "http://127.0.0.1:$PORT2" > "$WORK/test_api2.log" 2>&1 \
  || { cat "$WORK/test_api2.log" >&2; "${COMPOSE[@]}" logs --tail 30 worker >&2 2>/dev/null; fail "test_api.sh through compose"; }
workers=$("$PY" - "http://127.0.0.1:$PORT2" "$KEY" <<'PYEOF'
import sys, requests
url, key = sys.argv[1:]
body = requests.get(url + "/system-status", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
print(len(body["cluster"]["workers"]))
PYEOF
)
[ "$workers" = 1 ] || fail "/system-status lists $workers cluster workers (want the one CPU worker)"
figure "compose cluster flow" "upload -> generate -> status -> download OK in $(elapsed "$t") s, run by 1 worker"
t=$(date +%s)
bg "${COMPOSE[@]}" down -v -t 60 > "$WORK/compose-down.log" 2>&1 || { cat "$WORK/compose-down.log" >&2; fail "podman-compose down"; }
COMPOSE=()
figure "compose down" "$(elapsed "$t") s"
