#!/usr/bin/env bash
# Makes the certificates the TLS tests use: a test CA, a server certificate it signed for
# `localhost` and 127.0.0.1, a client certificate it signed (for servers that ask clients for
# one), and a second CA that signed nothing here (a client that trusts only it must refuse the
# server). Valid for 100 years; test-only keys, never for real use.
# Run from this directory: `bash generate.sh` (needs the openssl command).
set -euo pipefail
cd "$(dirname "$0")"
days=36500
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

for ca in ca other-ca; do
    key "$ca.key"
    openssl req -x509 -new -key "$ca.key" -sha256 -days "$days" -out "$ca.pem" \
        -subj "/CN=cqrs test $ca" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
done

key server.key
openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
    -days "$days" -out server.pem -extfile <(printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=DNS:localhost,IP:127.0.0.1") 2>/dev/null
key client.key
openssl req -new -key client.key -subj "/CN=cqrs test client" -out client.csr
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
    -days "$days" -out client.pem -extfile <(printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=clientAuth") 2>/dev/null
rm -f server.csr client.csr ca.srl ca.key other-ca.key
