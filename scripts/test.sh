#!/usr/bin/env bash
# Runs pgphi's test suites and exits non-zero if any test fails:
#   unit     GoogleTest on the core (CTest)
#   emulator the Vault / KMS emulator, checked by real clients (awscli, boto3, hvac)
#   fuzz     libFuzzer on the ciphertext parser (both algorithms) and the key
#            managers' answers, FUZZ_SECONDS (15) per target
#   regress  pg_regress on the SQL surface, in a temporary cluster (first
#            make check-sql: the generated install script matches src/sql/)
#   tap      TAP tests (prove) with PostgreSQL::Test::Cluster; TAP_TESTS picks
#            files, e.g. TAP_TESTS=test/t/015_grants_and_audit.pl
#   catalogue the bad-input catalogue (docs/bad-input-catalogue.md) against the
#            errors the regress and TAP runs logged, and against the SQLSTATEs
#            the code can raise; every relative link of README.md and docs/
#            against the files and headings it points to; and the layers of src/
#   package  the Debian package for PostgreSQL 15 (make deb), installed with
#            dpkg -i, and the demo against it (as root; 15 only)
#   valgrind the regress suite with the server under valgrind memcheck; slow,
#            so only on request (not in the default list)
#   citus    pgphi on Citus (test/t/citus/*.pl): a coordinator and two workers
#            on 127.0.0.1; Citus is built once into a cache by
#            scripts/build-citus.sh from CITUS_SOURCE (default ../shared/vendor)
# With no argument it installs what is missing, builds, installs pgphi into a
# private copy of PostgreSQL (see use_private_install) and runs all suites.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(unit fuzz emulator regress tap citus catalogue package)

# PG_VERSIONS="15 17 18": the suites against each version in turn (17 and 18
# built by scripts/build-postgres.sh). The suites that do not involve the
# server (unit, fuzz, emulator) run once, with the first version.
if [ -n "${PG_VERSIONS:-}" ]; then
    summary=() status=0 first=1
    # Versions built from source (17, 18: several minutes each on a fresh
    # machine) are built in the background while the first version's suites
    # run; scripts/build-postgres.sh takes a lock, so the loop below waits for
    # a build still running and then uses it, or reports its failure.
    # Packages first, so that no two apt-get runs meet.
    scripts/install-deps.sh && scripts/install-deps.sh build-postgres && scripts/install-deps.sh citus || exit 1
    (for version in $PG_VERSIONS; do
        [ "$version" = 15 ] || scripts/build-postgres.sh "$version" >/dev/null 2>&1 || true
    done) &
    for version in $PG_VERSIONS; do
        started=$SECONDS
        if [ "$version" = 15 ]; then
            pg_config=/usr/lib/postgresql/15/bin/pg_config
        else
            pg_config=$(scripts/build-postgres.sh "$version") || {
                summary+=("PostgreSQL $version: could not be built (in $((SECONDS - started)) s)"); status=1; continue; }
        fi
        prepared=$((SECONDS - started))
        version_suites=()
        for suite in "${suites[@]}"; do
            case $suite in
                unit | fuzz | emulator) [ $first = 1 ] && version_suites+=("$suite") ;;
                # The Debian package is built for Debian's PostgreSQL only.
                package) [ "$version" = 15 ] && version_suites+=("$suite") ;;
                *) version_suites+=("$suite") ;;
            esac
        done
        first=0
        echo "=== pgphi: PostgreSQL $version ($pg_config): ${version_suites[*]}"
        if PG_VERSIONS='' PG_CONFIG=$pg_config scripts/test.sh "${version_suites[@]}"; then
            summary+=("PostgreSQL $version: passed (${version_suites[*]}) in $((SECONDS - started)) s (server ready after $prepared s)")
        else
            summary+=("PostgreSQL $version: FAILED (${version_suites[*]}) in $((SECONDS - started)) s (server ready after $prepared s)")
            status=1
        fi
    done
    echo
    printf '%s\n' "${summary[@]}"
    exit $status
fi

scripts/install-deps.sh || exit 1
make -s -j2 PG_CONFIG="$PG_CONFIG" || exit 1
use_private_install || exit 1

PG_MAJOR=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
PGXS_DIR=$(dirname "$("$PG_CONFIG" --pgxs)")/../..
PG_REGRESS=$PGXS_DIR/src/test/regress/pg_regress
PERL_TEST_LIB=$PGXS_DIR/src/test/perl

run_unit() {
    cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null &&
        cmake --build build -j2 >/dev/null &&
        (cd build && ctest --output-on-failure)
}

run_fuzz() {
    # The targets in test/fuzz, built by CMake with clang's libFuzzer,
    # AddressSanitizer and UBSan, each run for FUZZ_SECONDS (15) from its
    # committed seed corpus (test/fuzz/corpus/<target>) and dictionary. New
    # inputs go to a scratch corpus; a failing input is kept as
    # build-fuzz/<target>-crash-*.
    local seconds=${FUZZ_SECONDS:-15} status=0 target corpus dict log
    CXX=clang++ cmake -S . -B build-fuzz -DPGPHI_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null &&
        cmake --build build-fuzz -j2 >/dev/null || return 1
    for target in ciphertext vault_response kms_response aws_credentials kmip_ttlv; do
        corpus=$(mktemp -d)
        dict=()
        [ -f "test/fuzz/$target.dict" ] && dict=(-dict="test/fuzz/$target.dict")
        log=$(mktemp)
        "build-fuzz/${target}_fuzz" "${dict[@]}" -max_total_time="$seconds" -print_final_stats=1 \
            -artifact_prefix="build-fuzz/$target-" "$corpus" "test/fuzz/corpus/$target" >"$log" 2>&1
        local result=$?
        # One line per target: inputs run and time, or the finding.
        if [ $result -eq 0 ]; then
            echo "$target: $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') inputs" \
                "in $(grep -E '^Done ' "$log" | awk '{print $5}') s, no finding"
        else
            echo "$target: FINDING (exit $result)"
            grep -E "^(fuzz finding|==|SUMMARY)|runtime error|Test unit written" "$log"
            status=1
        fi
        rm -rf "$corpus" "$log"
    done
    return $status
}

# The server logs of a suite's run, kept in build/evidence/SUITE for the
# bad-input catalogue check (they record each error with its SQLSTATE).
keep_evidence() {
    local suite=$1 logs=$2
    rm -rf "build/evidence/$suite"
    mkdir -p "build/evidence/$suite"
    cp "$logs"/*.log "build/evidence/$suite"/ 2>/dev/null
}

run_catalogue() {
    # The documentation's links first: every relative link of README.md and
    # docs/*.md must reach an existing file, and its #anchor a heading there.
    # It needs no test run, so it reports even when the evidence is stale.
    local src status=0
    /usr/bin/python3 scripts/check-doc-links.py || status=1
    # The layers of src/ (docs/development.md#layout), in the includes and,
    # from the objects this run built, in the symbols each file uses.
    /usr/bin/python3 scripts/check-layering.py || status=1
    # Every row of the bad-input catalogue (docs/bad-input-catalogue.md) must
    # have been produced by the regress or TAP suites (from their kept server
    # logs), and every SQLSTATE pgphi can raise must be in the catalogue.
    for src in docs/bad-input-catalogue.md src sql expected test; do
        if [ -n "$(find "$src" -newer build/evidence/tap -type f -print -quit 2>/dev/null)" ] ||
            [ -n "$(find "$src" -newer build/evidence/regress -type f -print -quit 2>/dev/null)" ]; then
            echo "the kept server logs are older than $src: run scripts/test.sh regress tap catalogue" >&2
            return 1
        fi
    done
    PGPHI_PG_MAJOR=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/') \
        /usr/bin/python3 test/catalogue/check_catalogue.py docs/bad-input-catalogue.md build/evidence \
        "$("$PG_CONFIG" --includedir-server)/utils/errcodes.h" || status=1
    return $status
}

run_package() {
    # The Debian package of PostgreSQL 15, installed with dpkg -i and used by
    # the demo on a fresh cluster (scripts/test-package.sh; as root).
    if [ "$PG_MAJOR" != 15 ]; then
        echo "the package suite runs on Debian's PostgreSQL 15 only" >&2
        return 1
    fi
    scripts/test-package.sh
}

run_emulator() {
    # Debian's python3 (not a pyenv one on PATH): it has boto3, hvac and cryptography.
    /usr/bin/python3 test/emulator/check_emulator.py
}

run_regress() {
    local work
    # The committed install script is, byte for byte, what src/sql/ produces.
    make -s check-sql PG_CONFIG="$PG_CONFIG" || return 1
    work=$(make_pg_workdir regress)
    cp -r sql expected test/regress/* "$work"/
    (cd "$work" && as_pg_user "$PG_REGRESS" --bindir="$PG_BIN" --inputdir="$work" --outputdir="$work" \
        --temp-instance="$work/tmp_check" --temp-config="$work/pgphi.conf" \
        --schedule="$work/schedule")
    local status=$?
    keep_evidence regress "$work/log"
    [ $status -ne 0 ] && [ -f "$work/regression.diffs" ] && cat "$work/regression.diffs"
    [ $status -eq 0 ] && rm -rf "$work"
    return $status
}

run_valgrind() {
    # The pg_regress suite against a server whose every process runs under
    # valgrind memcheck. initdb runs natively (under valgrind it would take
    # minutes); pg_ctl -p starts the server through a wrapper that execs
    # valgrind on the real postgres, and pg_regress runs as installcheck.
    # A memcheck error makes the process exit 128, which PostgreSQL treats
    # as a crash; test/valgrind/check_logs.py then fails the run on any
    # error, and on leaks pgphi allocated, in the per-process logs. (Leaks
    # do not set the exit code: PostgreSQL leaves memory to process exit.)
    # VALGRIND_OPTS adds options (for example --track-origins=yes).
    local work status started
    if ! command -v valgrind >/dev/null; then
        echo "valgrind is not installed" >&2
        return 1
    fi
    work=$(make_pg_workdir valgrind)
    cp -r sql expected test/regress/* test/valgrind/* "$work"/
    mkdir "$work/logs"
    cat > "$work/postgres-valgrind" <<EOF
#!/bin/sh
exec valgrind --tool=memcheck --trace-children=yes --num-callers=40 --read-var-info=no \\
    --suppressions="$work/pgphi.supp" --gen-suppressions=all \\
    --error-markers=VALGRINDERROR-BEGIN,VALGRINDERROR-END --error-exitcode=128 \\
    --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=none \\
    --log-file="$work/logs/%p.log" "$PG_BIN/postgres" "\$@"
EOF
    chmod 755 "$work/postgres-valgrind"
    [ "$(id -u)" = 0 ] && chown -R "$PG_USER" "$work"
    as_pg_user "$PG_BIN/initdb" -D "$work/data" -A trust -U postgres --no-sync >/dev/null || return 1
    {
        cat "$work/pgphi.conf"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$work'"
        # A process that valgrind failed ends the run instead of a recovery.
        echo "restart_after_crash = off"
    } >> "$work/data/postgresql.conf"
    started=$SECONDS
    as_pg_user "$PG_BIN/pg_ctl" -D "$work/data" -p "$work/postgres-valgrind" -l "$work/server.log" \
        -t 600 -w start >/dev/null || { cat "$work/server.log"; return 1; }
    (cd "$work" && as_pg_user "$PG_REGRESS" --bindir="$PG_BIN" --inputdir="$work" --outputdir="$work" \
        --host="$work" --port=5432 --schedule="$work/schedule")
    status=$?
    if ! as_pg_user "$PG_BIN/pg_ctl" -D "$work/data" -m fast -t 300 -w stop >/dev/null; then
        as_pg_user "$PG_BIN/pg_ctl" -D "$work/data" -m immediate -t 60 -w stop >/dev/null
        status=1
    fi
    echo "valgrind run: $((SECONDS - started)) s"
    [ $status -ne 0 ] && [ -f "$work/regression.diffs" ] && cat "$work/regression.diffs"
    # A process that valgrind made exit 128 shows up as a crash here.
    grep -E "terminated by signal|exited with exit code 128" "$work/server.log" && status=1
    /usr/bin/python3 "$work/check_logs.py" "$work/logs" || status=1
    [ $status -ne 0 ] && echo "valgrind logs kept in $work/logs"
    [ $status -eq 0 ] && rm -rf "$work"
    return $status
}

run_tap() {
    local work
    if ! compgen -G "test/t/*.pl" >/dev/null; then
        echo "no TAP tests found" >&2
        return 1
    fi
    # The pg_upgrade test (023) upgrades a PostgreSQL 15 cluster to the
    # version under test: it needs 15 with this checkout's pgphi, built in a
    # tree of its own so this version's objects stay.
    local old_install=''
    if [ "$PG_MAJOR" != 15 ] && [[ " ${TAP_TESTS:-test/t/023_pg_upgrade.pl} " == *023_pg_upgrade* ]]; then
        scripts/install-deps.sh || return 1
        old_install=$(side_private_install /usr/lib/postgresql/15/bin/pg_config) || {
            echo "could not build pgphi for PostgreSQL 15, which the pg_upgrade test needs" >&2; return 1; }
    fi
    work=$(make_pg_workdir tap)
    cp -r test docs "$work"/   # docs: the policies the emulator gives pgphi
    # TESTDIR places tmp_check on 15; 17 and later take TESTDATADIR and
    # TESTLOGDIR instead (both absolute, as the tests' settings expect).
    (cd "$work" && as_pg_user env PATH="$PG_BIN:$PATH" PG_REGRESS="$PG_REGRESS" TESTDIR="$work" \
        TESTDATADIR="$work/tmp_check" TESTLOGDIR="$work/tmp_check/log" \
        PGPHI_TEST_DIR="$work/test" PGPHI_OLD_INSTALL="$old_install" prove -I "$PERL_TEST_LIB" -I "$work/test/perl" ${TAP_TESTS:-test/t/*.pl})
    local status=$?
    keep_evidence tap "$work/tmp_check/log"
    [ $status -ne 0 ] && echo "TAP logs kept in $work/tmp_check/log"
    [ $status -eq 0 ] && rm -rf "$work"
    return $status
}

run_citus() {
    # Citus, built once (scripts/build-citus.sh), is copied into the private
    # installation beside pgphi; the tests start their own nodes.
    local stage dest work
    stage=$(scripts/build-citus.sh) || { echo "could not build Citus" >&2; return 1; }
    dest=${PG_BIN%"$("$PG_CONFIG" --bindir)"}
    cp -a "$stage"/. "$dest"/ && chmod -R a+rX "$dest" || return 1
    work=$(make_pg_workdir citus)
    cp -r test "$work"/
    cp --parents src/pg/*/*.cpp "$work"/   # the sources the transport test enumerates its cases from
    (cd "$work" && as_pg_user env PATH="$PG_BIN:$PATH" PG_REGRESS="$PG_REGRESS" TESTDIR="$work" \
        TESTDATADIR="$work/tmp_check" TESTLOGDIR="$work/tmp_check/log" \
        PGPHI_TEST_DIR="$work/test" prove -I "$PERL_TEST_LIB" -I "$work/test/perl" ${CITUS_TESTS:-test/t/citus/*.pl})
    local status=$?
    keep_evidence citus "$work/tmp_check/log"
    [ $status -ne 0 ] && echo "Citus TAP logs kept in $work/tmp_check/log"
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
