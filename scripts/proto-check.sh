#!/usr/bin/env bash
# The contract's checks, by buf (scripts/tools.sh installs it; buf.yaml configures it):
# lint (STANDARD + COMMENTS: every element documented), format, and breaking changes
# against proto/snapshot/krisp-ingest-v1.binpb, the descriptor set of the released v1
# that existing clients were generated from (FILE rules: wire and JSON/grpcurl names).
#
# After a deliberate new release, refresh the snapshot:  scripts/proto-check.sh --release
set -euo pipefail
cd "$(dirname "$0")/.."
buf=tools/node_modules/.bin/buf
[ -x "$buf" ] || scripts/tools.sh

if [ "${1:-}" = "--release" ]; then
  "$buf" build -o proto/snapshot/krisp-ingest-v1.binpb
  echo "proto/snapshot/krisp-ingest-v1.binpb refreshed: commit it with the release"
  exit 0
fi
"$buf" lint
"$buf" format --diff --exit-code
"$buf" breaking --against proto/snapshot/krisp-ingest-v1.binpb
echo "buf: lint, format and breaking checks passed"
