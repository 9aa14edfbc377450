#!/usr/bin/env bash
# Regenerates the Python stubs from ../../proto into gen/ (never edit gen/ by hand).
set -euo pipefail
cd "$(dirname "$0")"
rm -rf gen && mkdir -p gen
python3 -m grpc_tools.protoc -I ../../proto \
  --python_out=gen --grpc_python_out=gen --pyi_out=gen \
  ../../proto/krisp/ingest/v1/resources.proto ../../proto/krisp/ingest/v1/ingest_service.proto
touch gen/krisp/__init__.py gen/krisp/ingest/__init__.py gen/krisp/ingest/v1/__init__.py
