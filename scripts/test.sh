#!/usr/bin/env bash
# Runs pgphi's test suites and exits non-zero if any test fails:
#   unit     GoogleTest on the core (CTest)
#   emulator the Vault / KMS emulator, checked by real clients (awscli, boto3, hvac)
#   fuzz     libFuzzer on the ciphertext parser and decrypt path (both algorithms), for FUZZ_SECONDS (30)
#   regress  pg_regress on the SQL surface, in a temporary cluster
#   tap      TAP tests (prove) with PostgreSQL::Test::Cluster; TAP_TESTS picks
#            files, e.g. TAP_TESTS=test/t/015_grants_and_audit.pl
# With no argument it installs what is missing, builds, installs pgphi into a
# private copy of PostgreSQL (see use_private_install) and runs all suites.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(unit fuzz emulator regress tap)

scripts/install-deps.sh || exit 1
make -s -j2 PG_CONFIG="$PG_CONFIG" || exit 1
use_private_install || exit 1

PGXS_DIR=$(dirname "$("$PG_CONFIG" --pgxs)")/../..
PG_REGRESS=$PGXS_DIR/src/test/regress/pg_regress
PERL_TEST_LIB=$PGXS_DIR/src/test/perl

run_unit() {
    cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null &&
        cmake --build build -j2 >/dev/null &&
        (cd build && ctest --output-on-failure)
}

run_fuzz() {
    # Built with clang's libFuzzer, AddressSanitizer and UBSan; new inputs go
    # to a scratch corpus, the committed seeds stay as they are.
    local out=build-fuzz corpus
    mkdir -p "$out"
    clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Isrc/core \
        test/fuzz/ciphertext_fuzz.cpp src/core/ciphertext_format.cpp src/core/data_key.cpp src/core/aead.cpp \
        src/core/kdf.cpp src/core/blind_index.cpp src/core/nonce.cpp src/core/secure_bytes.cpp -lcrypto -o "$out/ciphertext_fuzz" || return 1
    corpus=$(mktemp -d)
    # A crashing input is kept as build-fuzz/crash-*.
    "$out/ciphertext_fuzz" -max_total_time="${FUZZ_SECONDS:-30}" -print_final_stats=1 -artifact_prefix="$out/" \
        "$corpus" test/fuzz/corpus/ciphertext 2>&1 | grep -E "^(stat::number_of_executed_units|Done|==|SUMMARY)"
    local status=${PIPESTATUS[0]}
    rm -rf "$corpus"
    return $status
}

run_emulator() {
    # Debian's python3 (not a pyenv one on PATH): it has boto3, hvac and cryptography.
    /usr/bin/python3 test/emulator/check_emulator.py
}

run_regress() {
    local work
    work=$(make_pg_workdir regress)
    cp -r sql expected test/regress/* "$work"/
    (cd "$work" && as_pg_user "$PG_REGRESS" --bindir="$PG_BIN" --inputdir="$work" --outputdir="$work" \
        --temp-instance="$work/tmp_check" --temp-config="$work/pgphi.conf" \
        --schedule="$work/schedule")
    local status=$?
    [ $status -ne 0 ] && [ -f "$work/regression.diffs" ] && cat "$work/regression.diffs"
    [ $status -eq 0 ] && rm -rf "$work"
    return $status
}

run_tap() {
    local work
    if ! compgen -G "test/t/*.pl" >/dev/null; then
        echo "no TAP tests found" >&2
        return 1
    fi
    work=$(make_pg_workdir tap)
    cp -r test "$work"/
    (cd "$work" && as_pg_user env PATH="$PG_BIN:$PATH" PG_REGRESS="$PG_REGRESS" TESTDIR="$work" \
        PGPHI_TEST_DIR="$work/test" prove -I "$PERL_TEST_LIB" -I "$work/test/perl" ${TAP_TESTS:-test/t/*.pl})
    local status=$?
    [ $status -ne 0 ] && echo "TAP logs kept in $work/tmp_check/log"
    [ $status -eq 0 ] && rm -rf "$work"
    return $status
}

passed=0
failed=0
failed_names=()
for suite in "${suites[@]}"; do
    echo "=== pgphi: $suite tests"
    if "run_$suite"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failed_names+=("$suite")
    fi
done

echo
[ $failed -gt 0 ] && echo "failed suites: ${failed_names[*]}"
echo "suites: $passed passed, $failed failed"
[ $failed -eq 0 ]
