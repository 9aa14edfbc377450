#!/usr/bin/env bash
# Generates the messages and stubs from ../../proto into src/krisp/ (never edit them by
# hand), with type information: .pyi for the messages and for the sync and asyncio stubs
# (mypy-protobuf), and py.typed.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf src/krisp && mkdir -p src
python3 -m grpc_tools.protoc -I ../../proto \
  --python_out=src --grpc_python_out=src --mypy_out=quiet:src --mypy_grpc_out=quiet:src \
  ../../proto/krisp/ingest/v1/resources.proto ../../proto/krisp/ingest/v1/ingest_service.proto
touch src/krisp/__init__.py src/krisp/ingest/__init__.py src/krisp/ingest/v1/__init__.py \
  src/krisp/py.typed
