#!/usr/bin/env bash
# The adversarial suite (tests/adversarial/) and its summary table -- the "make adversarial" of this repository.
#
#   scripts/adversarial.sh [--long] [pytest arguments...]
#
# Default: exactly what CI runs (tests/adversarial: ~3 minutes on 2 cores).  --long: the issue's soak with 500
# clients for 150 s per load run (long enough to assert the RSS slope after warm-up), a 10-minute atheris run, and
# fault storms of 10,000 connections per run instead of 1,000; each figure can also be set on its own with
# ADVERSARIAL_SOAK_CLIENTS, ADVERSARIAL_SOAK_SECONDS, ADVERSARIAL_FUZZ_SECONDS and ADVERSARIAL_STORM_CONNECTIONS
# (ADVERSARIAL_STORM_SEED replays a storm).  The table (cases per category, requests under load, errors, peak RSS,
# RSS slope, proxy file descriptors before/after, the storms' per-stage figures) is printed at the end and written
# as JSON to $ADVERSARIAL_JSON (default build/adversarial.json).  sslyze is installed on first use into its own virtualenv under
# ~/.cache/mtls-proxy (it pins an older cryptography than the proxy's).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--long" ]; then
  shift
  export ADVERSARIAL_SOAK_CLIENTS="${ADVERSARIAL_SOAK_CLIENTS:-500}"
  export ADVERSARIAL_SOAK_SECONDS="${ADVERSARIAL_SOAK_SECONDS:-150}"
  export ADVERSARIAL_FUZZ_SECONDS="${ADVERSARIAL_FUZZ_SECONDS:-600}"
  export ADVERSARIAL_STORM_CONNECTIONS="${ADVERSARIAL_STORM_CONNECTIONS:-10000}"
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q -e '.[test]'
fi
# 500 clients and the proxy's side of each connection: more descriptors than a default 1024 soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec .venv/bin/python -m pytest tests/adversarial -q "$@"
