#!/usr/bin/env bash
# Builds the wheel, installs it into a fresh virtual environment, type-checks the example
# and the tests with mypy --strict, and runs the tests against the installed package and
# a live server (KRISP_BIN). Needs python3 with the tools of requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d /tmp/krisp-py.XXXXXX)
trap 'rm -rf "$work"' EXIT

./generate.sh
python3 -m build --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check -c requirements.txt \
  "$work"/dist/krisp_ingest_client-*.whl pytest mypy types-grpcio types-protobuf types-grpcio-reflection grpcio-reflection
echo "built and installed $(basename "$work"/dist/*.whl)"
"$work/venv/bin/mypy" --strict --config-file pyproject.toml example.py tests
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider
