#!/usr/bin/env bash
# Install everything the test suite needs (virtualenv, Python packages, curl/nginx from the distribution when
# missing and we may install them) and run the whole suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "scripts/test.sh: please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi

# Partner client stacks for tests/e2e/test_partner_clients.py (Java 17 with javac, Node): installed when missing
# and we may; otherwise those tests are skipped, naming what is missing.  On a fresh Debian 12 (OpenJDK 17,
# Node 18): 38 packages, 139 MiB to download, about 30 s for apt-get update and install.
partner_apt=()
command -v javac >/dev/null 2>&1 || partner_apt+=(default-jdk-headless)
command -v node >/dev/null 2>&1 || partner_apt+=(nodejs)
if [ ${#partner_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    [ ${#need_apt[@]} -gt 0 ] || DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${partner_apt[@]}" >/dev/null \
      || echo "scripts/test.sh: could not install ${partner_apt[*]} (their partner tests will be skipped)" >&2
  else
    echo "scripts/test.sh: not installed (their partner tests will be skipped): ${partner_apt[*]}" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
