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

# sign NAME CN EXTENSIONS...: a key and a certificate for NAME that the test CA signed.
sign() {
    local name=$1 cn=$2; shift 2
    key "$name.key"
    openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
        -days "$days" -out "$name.pem" -extfile <(printf '%s\n' \
            "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "$@") \
        2>/dev/null
}
sign server localhost "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1"
sign client "cqrs test client" "extendedKeyUsage=clientAuth"
rm -f server.csr client.csr ca.srl ca.key other-ca.key
