#!/usr/bin/env bash
# System packages the test suite drives for real: Debian's chromium (the /test page in a headless
# browser) and redis-server (the cluster-mode tests start their own on a free port). Installed only
# when missing, only as root.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "[setup] missing system packages: ${need[*]} (run as root or install them; their tests will be skipped)" >&2
  exit 0
fi
echo "[setup] apt-get install ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
