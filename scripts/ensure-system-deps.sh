#!/usr/bin/env bash
# Installs the system packages the project runs on, only when they are missing:
# PostgreSQL server binaries (the local database) and Chromium (the browser test).
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "installing system packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# A packaged cluster is not needed: the project starts its own server. Keep the system one stopped.
if command -v pg_lsclusters >/dev/null 2>&1; then
    $SUDO pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | while read -r version name; do
        $SUDO pg_ctlcluster "$version" "$name" stop 2>/dev/null || true
    done
fi
