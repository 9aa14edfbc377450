#!/usr/bin/env bash
# Regenerates the Go stubs from ../../proto into src/krispingest/ingestv1 (never edit them
# by hand) with protoc, protoc-gen-go and protoc-gen-go-grpc from Debian's packages.
#
# The protos carry no go_package: a Go import path is a Go client's choice, not the
# contract's (and adding one later would be a change buf breaking reports). The M options
# map both files to the import path krispingest/ingestv1 instead.
set -euo pipefail
cd "$(dirname "$0")"
out=src/krispingest/ingestv1
rm -rf "$out" && mkdir -p "$out"
map="Mkrisp/ingest/v1/resources.proto=krispingest/ingestv1"
map="$map,Mkrisp/ingest/v1/ingest_service.proto=krispingest/ingestv1"
protoc -I ../../proto -I /usr/include \
  --go_out=src --go_opt="$map" \
  --go-grpc_out=src --go-grpc_opt="$map" \
  krisp/ingest/v1/resources.proto krisp/ingest/v1/ingest_service.proto
