#!/usr/bin/env bash
# Test certificates for the clients' TLS tests, into DIR: a CA (ca.pem), a server
# certificate for 127.0.0.1 and localhost (server.pem, server.key) and a client
# certificate (client.pem, client.key), both signed by the CA; valid for a day.
set -euo pipefail
dir=${1:?usage: test-pki.sh DIR}
mkdir -p "$dir" && cd "$dir"
ec() { openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$1"; }
ec ca.key
openssl req -x509 -new -key ca.key -days 1 -subj "/CN=krisp test CA" -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
for name in server client; do
  ec "$name.key"
  openssl req -new -key "$name.key" -subj "/CN=krisp test $name" -out "$name.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm "$name.csr" "$name.ext"
done
