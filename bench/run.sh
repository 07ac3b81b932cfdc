#!/usr/bin/env bash
# mtls-proxy against NGINX on this machine (the comparison table).  Run from anywhere; see bench/README.md.
#   bench/run.sh --quick            smoke run, ~1.5 min
#   bench/run.sh --repeat 3         the figures to quote (~5 min)
# Everything else is in bench/run.py (--help).  Needs Python >= 3.11 to start; as root it installs the
# rest (apt packages, the project's .venv), otherwise it prints the command to run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"; else py="$(command -v python3)"; fi
exec "$py" "$here/run.py" "$@"
