#!/usr/bin/env bash
# Creates a throwaway PKI for the key-manager emulator's tests, in DIR:
#
#   ca.pem / ca.key               test CA
#   server.pem / server.key       server cert for 127.0.0.1 and localhost, signed by the CA
#   client.pem / client.key       client cert (mTLS), signed by the CA
#   other-ca.pem / other-ca.key   an unrelated CA ("wrong CA" tests)
#   other-client.pem / .key       client cert signed by the unrelated CA
#   selfsigned.pem / .key         self-signed server cert for 127.0.0.1 and localhost
#   expired.pem / expired.key     server cert signed by the CA that expired in 2020
#
# Private keys are mode 0600. Generated at test time only: never commit the output.
# Usage: make_test_pki.sh DIR
set -euo pipefail

dir=${1:?usage: make_test_pki.sh DIR}
mkdir -p "$dir"
cd "$dir"
umask 077

days=30
server_san="IP:127.0.0.1,DNS:localhost"

# A config file of our own, so the user's or the distribution's openssl.cnf defaults
# cannot add or change extensions.
cat > pki.cnf <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = ${ENV::SAN}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[selfsigned_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = ${ENV::SAN}
subjectKeyIdentifier = hash
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
# "openssl ca" is only used for the expired certificate: it is the one openssl 3.0
# command that accepts an explicit validity period in the past.
[ca]
default_ca = expired_ca
[expired_ca]
database = ca-db/index.txt
new_certs_dir = ca-db
serial = ca-db/serial
default_md = sha256
policy = any_policy
copy_extensions = none
unique_subject = no
[any_policy]
commonName = supplied
EOF
export SAN="$server_san"

new_key() {   # new_key FILE
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

new_ca() {    # new_ca NAME CN
    new_key "$1.key"
    openssl req -config pki.cnf -x509 -new -key "$1.key" -subj "/CN=$2" -days "$days" \
        -sha256 -extensions ca_ext -out "$1.pem"
}

signed_cert() {  # signed_cert NAME CN EXTENSION CA
    new_key "$1.key"
    openssl req -config pki.cnf -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA "$4.pem" -CAkey "$4.key" -CAcreateserial \
        -days "$days" -sha256 -extfile pki.cnf -extensions "$3" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr"
}

new_ca ca "pgphi emulator test CA"
new_ca other-ca "unrelated test CA"
signed_cert server "localhost" server_ext ca
signed_cert client "pgphi test client" client_ext ca
signed_cert other-client "client of the unrelated CA" client_ext other-ca

new_key selfsigned.key
openssl req -config pki.cnf -x509 -new -key selfsigned.key -subj "/CN=localhost" \
    -days "$days" -sha256 -extensions selfsigned_ext -out selfsigned.pem

new_key expired.key
openssl req -config pki.cnf -new -key expired.key -subj "/CN=localhost" -out expired.csr
mkdir -p ca-db
: > ca-db/index.txt
echo 1000 > ca-db/serial
openssl ca -config pki.cnf -batch -notext -in expired.csr -cert ca.pem -keyfile ca.key \
    -startdate 20200101000000Z -enddate 20200201000000Z -extfile pki.cnf \
    -extensions server_ext -out expired.pem 2>/dev/null
rm -rf expired.csr ca-db pki.cnf ./*.srl

chmod 0600 ./*.key
chmod 0644 ./*.pem
