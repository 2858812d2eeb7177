#!/usr/bin/env bash
# The API walk-through against a running server: health -> upload several images -> generate -> poll
# -> download, then an avatar without selfies (identity: none). Exits non-zero on any failure.
#
#   ./test_api.sh [BASE_URL] [IMAGE ...]
#   BASE_URL defaults to http://$TWIN_HOST:$TWIN_PORT (127.0.0.1:5000).
#   Without images, it makes 4 selfies of the astronaut photo that ships with scikit-image.
#   API_KEY=...       send 'Authorization: Bearer ...' (when the server has TWIN_API_KEYS)
#   OUT_DIR=...       where the downloaded PNG goes (default: a temp folder)
#   POLL_TIMEOUT=600  seconds to wait for the job
#   PYTHON=...        the python that reads JSON and makes the test selfies (needs Pillow + scikit-image);
#                     default: $VENV/bin/python (VENV as in ./test.sh, default .venv), else python3
set -euo pipefail
cd "$(dirname "$0")"
BASE=${1:-http://${TWIN_HOST:-127.0.0.1}:${TWIN_PORT:-5000}}
[ $# -gt 0 ] && shift
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in "${VENV:-.venv}/bin/python" python3; do
    if command -v "$c" >/dev/null 2>&1 || [ -x "$c" ]; then PY=$c; break; fi
  done
fi
"$PY" -c 'import PIL, skimage' 2>/dev/null \
  || { echo "FAIL: $PY cannot import Pillow and scikit-image: set VENV (as for ./test.sh) or PYTHON" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OUT_DIR=${OUT_DIR:-$WORK/out}
mkdir -p "$OUT_DIR"
JAR=$WORK/cookies
AUTH=()
[ -n "${API_KEY:-}" ] && AUTH=(-H "Authorization: Bearer $API_KEY")

fail() { echo "FAIL: $*" >&2; exit 1; }
json() { "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }
call() {  # call METHOD PATH [curl args...] -> body on stdout; fails on HTTP >= 400
  local method=$1 path=$2; shift 2
  local code
  code=$(curl -sS -o "$WORK/body" -w '%{http_code}' -X "$method" -b "$JAR" -c "$JAR" "${AUTH[@]}" "$@" "$BASE$path") \
    || fail "$method $path: curl could not connect"
  [ "$code" -lt 400 ] || fail "$method $path -> HTTP $code: $(cat "$WORK/body")"
  cat "$WORK/body"
}

echo "== health ($BASE)"
health=$(call GET /health)
echo "$health"
[ "$(echo "$health" | json 'd["status"]')" = ok ] || fail "health status is not ok"
state=$(echo "$health" | json 'd["state"]')
[ "$state" = ready ] || fail "service state is $state"

images=("$@")
if [ ${#images[@]} -eq 0 ]; then
  "$PY" - "$WORK" <<'PYEOF' || fail "could not make test selfies (is scikit-image installed?)"
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.photos import selfie_set
for name, data in selfie_set(4):
    Path(sys.argv[1], name).write_bytes(data)
PYEOF
  images=("$WORK"/selfie_*.jpg)
fi

echo "== upload ${#images[@]} images"
form=()
for f in "${images[@]}"; do form+=(-F "files=@$f"); done
up=$(call POST /upload "${form[@]}")
session=$(echo "$up" | json 'd["session_id"]')
echo "session $session: accepted $(echo "$up" | json 'd["accepted_count"]') of $(echo "$up" | json 'd["total"]')"

echo "== generate"
job=$(call POST /generate -H 'Content-Type: application/json' \
  -d "{\"prompt\": \"professional headshot, studio lighting\", \"num_images\": 1, \"quality_mode\": \"fast\", \"session_id\": \"$session\"}")
job_id=$(echo "$job" | json 'd["id"]')
echo "job $job_id queued"

poll() {  # poll JOB_ID -> the finished job's JSON on stdout (progress on stderr)
  local job_id=$1 st status deadline
  deadline=$(( $(date +%s) + ${POLL_TIMEOUT:-600} ))
  while :; do
    st=$(call GET "/status/$job_id")
    status=$(echo "$st" | json 'd["status"]')
    echo "  $status $(echo "$st" | json 'd["progress"]["step"]')/$(echo "$st" | json 'd["progress"]["total"]')" >&2
    case $status in
      succeeded) break ;;
      failed|canceled) fail "job ended $status: $(echo "$st" | json 'd["error"]')" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || fail "job not finished after ${POLL_TIMEOUT:-600}s"
    sleep 0.5
  done
  echo "$st"
}

download() {  # download JOB_JSON -> its first PNG into OUT_DIR, checked
  local url name
  url=$(echo "$1" | json 'd["outputs"][0]["url"]')
  name=$(echo "$1" | json 'd["outputs"][0]["filename"]')
  call GET "$url" > "$OUT_DIR/$2$name"
  "$PY" -c 'import sys; from PIL import Image; im=Image.open(sys.argv[1]); im.verify(); print("downloaded", sys.argv[1], im.size)' \
    "$OUT_DIR/$2$name" || fail "downloaded file is not a PNG"
}

echo "== poll"
st=$(poll "$job_id")

echo "== download"
download "$st" ""

echo "== avatar without selfies (identity: none)"
job=$(call POST /generate -H 'Content-Type: application/json' \
  -d '{"prompt": "a portrait on a city street", "identity": "none", "persona": {"age": 34}, "attributes": {"gender": "female"}, "num_images": 1, "quality_mode": "fast"}')
job_id=$(echo "$job" | json 'd["id"]')
[ "$(echo "$job" | json 'd["session_id"] != "'"$session"'"')" = True ] || fail "the avatar got the upload's session"
st=$(poll "$job_id")
[ "$(echo "$st" | json 'd["request"]["identity"]')" = none ] || fail "the job does not say identity none"
download "$st" "persona_"
echo "OK"
