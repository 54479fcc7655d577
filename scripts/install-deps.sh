#!/usr/bin/env bash
# Installs the Debian 12 packages pgphi needs to build, test and demo, if any
# is missing. Safe to run again: it does nothing when all are present.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PACKAGES=(
    g++ make cmake pkg-config           # build tools
    libssl-dev openssl                  # OpenSSL 3: all cryptography; the CLI makes test PKI
    libcurl4-openssl-dev                # HTTPS to Vault and AWS KMS
    nlohmann-json3-dev                  # JSON for the key managers' APIs
    postgresql-15 postgresql-server-dev-15  # server and PGXS, same version
    libkrb5-dev                         # GSSAPI headers that libpq/libpq-be.h includes
    postgresql-contrib                  # pgcrypto, for the benchmarks against it
    libgtest-dev libbenchmark-dev       # GoogleTest and Google Benchmark
    clang libclang-rt-dev               # libFuzzer and sanitizers for the fuzz suite
    valgrind                            # the regression suite under memcheck (on request)
    libipc-run-perl                     # TAP tests (PostgreSQL::Test::Cluster)
    python3 python3-cryptography        # the Vault / KMS emulator in test/emulator
    awscli python3-boto3 python3-hvac   # independent clients that check the emulator
    python3-pykmip                      # pykmip-server: a real KMIP server for test/t/024_kmip.pl
    libp11-kit-dev softhsm2 opensc      # PKCS#11 header; a real token and pkcs11-tool/pkcs11-spy for its tests
)

# scripts/build-postgres.sh builds PostgreSQL 17 and 18 from source.
if [ "${1:-}" = build-postgres ]; then
    PACKAGES=(gcc make bison flex zlib1g-dev libssl-dev curl bzip2 ca-certificates libipc-run-perl)
fi

# scripts/build-citus.sh builds Citus from source for the citus suite.
if [ "${1:-}" = citus ]; then
    PACKAGES=(gcc make libzstd-dev liblz4-dev libkrb5-dev libssl-dev)
fi

# scripts/build-deb.sh builds the Debian packages with pg_buildext.
if [ "${1:-}" = deb ]; then
    PACKAGES=(debhelper dpkg-dev fakeroot postgresql-server-dev-all postgresql-server-dev-15 g++ make
              libssl-dev libcurl4-openssl-dev nlohmann-json3-dev libkrb5-dev)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "pgphi: installing ${missing[*]}"
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
    echo "pgphi: run as root, or install these packages: ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
as_root apt-get update -qq
# postgresql-15 is named again so it is upgraded to match the -dev package.
[ "${1:-}" = build-postgres ] || [ "${1:-}" = deb ] || [ "${1:-}" = citus ] || missing+=(postgresql-15)
as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
