# Sourced by the Go scripts: GOPATH mode over this directory and Debian's Go packages
# (golang-google-grpc-dev, golang-google-protobuf-dev, golang-github-golang-protobuf-1-5-dev;
# module mode cannot resolve grpc's dependencies offline).
GO_CLIENT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export GO111MODULE=off
export GOPATH="$GO_CLIENT_DIR:/usr/share/gocode"
export GOCACHE="${GOCACHE:-$GO_CLIENT_DIR/.cache}"
