#!/usr/bin/env bash
# One command to try mtls-proxy: virtualenv, development certificates in certs/, the built-in demo API upstream
# and the proxy in front of it on https://localhost:8443 (admin on http://127.0.0.1:9100).  Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e .
exec .venv/bin/mtls-proxy demo --dir certs "$@"
