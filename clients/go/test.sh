#!/usr/bin/env bash
# Generates the stubs, then runs the Go client's tests against a live krisp-ingest
# (KRISP_BIN, default: the debug build).
set -euo pipefail
cd "$(dirname "$0")"
source ./env.sh
./generate.sh
go vet krispingest/...
go test -count=1 krispingest/...
