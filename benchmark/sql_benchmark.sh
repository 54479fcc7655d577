#!/usr/bin/env bash
# pgphi's SQL benchmark: creates its own cluster and data, then times, in one
# run, per-row costs of decrypting, encrypting and re-encrypting with pgphi
# against a plaintext scan, the function-call floor, raw AES-256-GCM in C, and
# pgcrypto (decrypt_iv with AES-CBC, and the seed's pgp_sym_*), plus pgbench
# throughput on a warm cache. Prints a table of per-row costs and ratios and
# writes it, with a chart, to benchmark/results/.
#   ROWS=1000000 (default)  PGP_ROWS=2000 (pgp_sym_* is timed on a sample)
#   RUNS=3 (the median is kept)  PGBENCH_SECONDS=10
#   PG_VERSIONS="15 17 18": the benchmark on each version in turn (17 and 18
#   built by scripts/build-postgres.sh); results in benchmark-pgNN.md.
# The statements a ratio compares run interleaved, round after round (each
# round in a rotated order), and each keeps its median over the rounds, so a
# noisy stretch of a shared machine slows all of them alike instead of
# flipping a ratio. pgbench's point lookup (one row decrypted per
# transaction) runs in simple and in prepared protocol, plaintext and
# decrypt_phi alternating, with the target of 0.95 of plaintext throughput.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"
cd "$REPO_ROOT"

if [ -n "${PG_VERSIONS:-}" ]; then
    status=0
    for version in $PG_VERSIONS; do
        if [ "$version" = 15 ]; then
            pg_config=/usr/lib/postgresql/15/bin/pg_config
        else
            pg_config=$(scripts/build-postgres.sh "$version") || { echo "PostgreSQL $version: could not be built" >&2; status=1; continue; }
        fi
        echo "=== pgphi benchmark: PostgreSQL $version"
        PG_VERSIONS='' PG_CONFIG=$pg_config RESULTS_FILE=benchmark-pg$version.md "$0" || status=1
    done
    exit $status
fi

ROWS=${ROWS:-1000000}
PGP_ROWS=${PGP_ROWS:-2000}
RUNS=${RUNS:-3}
PGBENCH_SECONDS=${PGBENCH_SECONDS:-10}
PORT=${PGPHI_BENCH_PORT:-5498}
RESULTS=$REPO_ROOT/benchmark/results
RESULTS_FILE=${RESULTS_FILE:-benchmark.md}

scripts/install-deps.sh
command -v gnuplot >/dev/null || as_root apt-get install -y -qq gnuplot-nox >/dev/null || true
make -s -j2 PG_CONFIG="$PG_CONFIG"
# Into this checkout's private copy of that PostgreSQL (as the tests do), so
# a shared installation (Debian's, or a cached source build) stays untouched.
use_private_install
make -s -C benchmark/floor PG_CONFIG="$PG_CONFIG"
make -s -C benchmark/floor install PG_CONFIG="$PG_CONFIG" DESTDIR="${PG_BIN%"$("$PG_CONFIG" --bindir)"}" >/dev/null
chmod -R a+rX "${PG_BIN%"$("$PG_CONFIG" --bindir)"}"

WORK=$(make_pg_workdir bench)
trap 'as_pg_user "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
start_throwaway_cluster "$WORK" "$PORT" <<CONF
shared_buffers = '1GB'
max_parallel_workers_per_gather = 0   # per-row costs, one process
jit = off
CONF

psql_bench() { as_pg_user "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -U postgres -d postgres "$@"; }

echo "pgphi benchmark: $ROWS rows (pgp_sym_* on $PGP_ROWS), median of $RUNS runs"
psql_bench <<SQL
CREATE EXTENSION pgphi;
CREATE EXTENSION pgcrypto;
CREATE EXTENSION pgphi_floor;
SELECT pgphi.create_key('bench') \gset
CREATE TABLE data AS
SELECT i AS id, lpad((i % 1000000000)::text, 9, '0') AS plain FROM generate_series(1, $ROWS) i;
ALTER TABLE data ADD PRIMARY KEY (id);
ALTER TABLE data
  ADD COLUMN plain_bytes bytea, ADD COLUMN phi pgphi.encrypted, ADD COLUMN gcm bytea, ADD COLUMN cbc bytea;
UPDATE data SET plain_bytes = convert_to(plain, 'UTF8'),
                phi = pgphi.encrypt_phi(plain, 'bench'),
                gcm = floor_gcm_encrypt(plain),
                cbc = encrypt_iv(convert_to(plain, 'UTF8'), '\\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea,
                                 '\\x0f0e0d0c0b0a09080706050403020100'::bytea, 'aes-cbc');
CREATE TABLE pgp_sample AS
SELECT id, plain, pgp_sym_encrypt(plain, 'benchmark passphrase', 'cipher-algo=aes256, compress-algo=0') AS pgp
  FROM data WHERE id <= $PGP_ROWS;
-- A reader with what production roles have in force: a time-limited decrypt
-- grant and a decrypt limit (far above what the benchmark reads), so that
-- decrypt_phi_limited times the grant's clock check and the limit's batches.
CREATE ROLE bench_limited;
GRANT pgphi_decrypt TO bench_limited;
GRANT SELECT ON data TO bench_limited;
SELECT pgphi.grant_decrypt('bench', 'bench_limited', valid_until => now() + interval '1 day');
SELECT pgphi.set_decrypt_limit('bench', 'bench_limited', 1000000000000, interval '1 hour');
VACUUM FREEZE ANALYZE;
SQL

# Median milliseconds of a statement over RUNS runs; "prepare" SQL runs untimed first.
time_ms() {
    local sql=$1 prepare=${2:-} runs=${3:-$RUNS} times=()
    for _ in $(seq "$runs"); do
        # Through stdin, so each statement runs on its own (VACUUM cannot run
        # in the transaction a multi-statement -c string gets).
        [ -n "$prepare" ] && psql_bench <<< "$prepare" >/dev/null
        times+=("$(psql_bench -c '\timing on' -c "$sql" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)")
    done
    printf '%s\n' "${times[@]}" | sort -g | sed -n "$(( (runs + 1) / 2 ))p"
}
per_row_ns() { awk -v ms="$1" -v n="$2" 'BEGIN { printf "%.0f", ms * 1e6 / n }'; }

declare -A NS
# A comparison: NAME ROWS SQL PREPARE, repeated for each statement compared.
# RUNS rounds; in each every statement runs once, in an order rotated by one
# per round; each statement keeps its median.
measure_group() {
    local names=() rows=() sqls=() preps=() n round j i t ms
    while [ $# -gt 0 ]; do names+=("$1"); rows+=("$2"); sqls+=("$3"); preps+=("$4"); shift 4; done
    n=${#names[@]}
    local -A times=()
    for round in $(seq "$RUNS"); do
        for j in $(seq 0 $((n - 1))); do
            i=$(( (j + round) % n ))
            [ -n "${preps[$i]}" ] && psql_bench <<< "${preps[$i]}" >/dev/null
            t=$(psql_bench -c '\timing on' -c "${sqls[$i]}" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)
            times[$i]+="$t "
        done
    done
    for i in $(seq 0 $((n - 1))); do
        # shellcheck disable=SC2086
        ms=$(printf '%s\n' ${times[$i]} | sort -g | sed -n "$(( (RUNS + 1) / 2 ))p")
        NS[${names[$i]}]=$(per_row_ns "$ms" "${rows[$i]}")
        printf '  %-34s %8s ns/row\n' "${names[$i]}" "${NS[${names[$i]}]}"
    done
}
measure() { # name rows sql [prepare] [runs]
    local ms
    ms=$(time_ms "$3" "${4:-}" "${5:-$RUNS}")
    NS[$1]=$(per_row_ns "$ms" "$2")
    printf '  %-34s %8s ns/row\n' "$1" "${NS[$1]}"
}

KEY="'\\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea"
IV="'\\x0f0e0d0c0b0a09080706050403020100'::bytea"
echo "decrypt (scan and decrypt every row; interleaved, median of $RUNS rounds):"
measure_group \
    plaintext_scan "$ROWS" "SELECT count(length(plain)) FROM data" "" \
    floor_copy "$ROWS" "SELECT count(length(floor_copy(plain_bytes))) FROM data" "" \
    floor_gcm_decrypt "$ROWS" "SELECT count(length(floor_gcm_decrypt(gcm))) FROM data" "" \
    decrypt_phi "$ROWS" "SELECT count(length(pgphi.decrypt_phi(phi))) FROM data" "" \
    decrypt_phi_limited "$ROWS" "SET ROLE bench_limited; SELECT count(length(pgphi.decrypt_phi(phi))) FROM data" "" \
    pgcrypto_decrypt_iv "$ROWS" "SELECT count(length(decrypt_iv(cbc, $KEY, $IV, 'aes-cbc'))) FROM data" "" \
    pgp_sym_decrypt "$PGP_ROWS" "SELECT count(length(pgp_sym_decrypt(pgp, 'benchmark passphrase'))) FROM pgp_sample" ""

echo "encrypt (INSERT ... SELECT of every row; interleaved, median of $RUNS rounds):"
SINK="DROP TABLE IF EXISTS sink; CREATE UNLOGGED TABLE sink (v bytea)"
measure_group \
    insert_plaintext "$ROWS" "INSERT INTO sink SELECT plain::bytea FROM data" "$SINK" \
    floor_gcm_encrypt "$ROWS" "INSERT INTO sink SELECT floor_gcm_encrypt(plain) FROM data" "$SINK" \
    encrypt_phi "$ROWS" "INSERT INTO sink SELECT pgphi.encrypt_phi(plain, 'bench') FROM data" "$SINK" \
    pgp_sym_encrypt "$PGP_ROWS" \
    "INSERT INTO sink SELECT pgp_sym_encrypt(plain, 'benchmark passphrase', 'cipher-algo=aes256, compress-algo=0') FROM pgp_sample" "$SINK"

echo "re-encrypt (every row of a fresh copy; one run each):"
COPY_SQL="DROP TABLE IF EXISTS copy; CREATE TABLE copy AS SELECT id, phi FROM data; ALTER TABLE copy ADD PRIMARY KEY (id); VACUUM ANALYZE copy"
measure update_set_col_eq_col "$ROWS" "UPDATE copy SET phi = phi" "$COPY_SQL" 1
psql_bench -c "SELECT pgphi.rotate_key('bench')" >/dev/null
measure pgphi_reencrypt "$ROWS" "CALL pgphi.reencrypt('copy', 'phi', batch_size => 50000)" "$COPY_SQL" 1
measure pgcrypto_reencrypt "$PGP_ROWS" \
    "UPDATE pgp_copy SET pgp = pgp_sym_encrypt(pgp_sym_decrypt(pgp, 'benchmark passphrase'), 'benchmark passphrase', 'cipher-algo=aes256, compress-algo=0')" \
    "DROP TABLE IF EXISTS pgp_copy; CREATE TABLE pgp_copy AS SELECT * FROM pgp_sample" 1

echo "concurrency (pgbench, warm cache, one random row per transaction):"
cat > "$WORK/decrypt.sql" <<'PGB'
\set id random(1, :rows)
SELECT pgphi.decrypt_phi(phi) FROM data WHERE id = :id;
PGB
cat > "$WORK/plain.sql" <<'PGB'
\set id random(1, :rows)
SELECT plain FROM data WHERE id = :id;
PGB
# Per client count and protocol, RUNS rounds of a plaintext run and a
# decrypt_phi run back to back (which goes first alternates); each keeps its
# median tps, and the ratio is the median of the rounds' ratios, each from a
# pair measured in the same stretch of time.
declare -A TPS RATIO
pgbench_tps() { # script clients protocol
    as_pg_user "$PG_BIN/pgbench" -n -h "$WORK" -p "$PORT" -U postgres -c "$2" -j "$2" -M "$3" \
        -T "$PGBENCH_SECONDS" -D rows="$ROWS" -f "$WORK/$1.sql" postgres 2>/dev/null |
        sed -n 's/^tps = \([0-9.]*\).*/\1/p' | cut -d. -f1
}
mid() { printf '%s\n' "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
for protocol in simple prepared; do
    for clients in 1 2 8; do
        plain=() decrypt=() ratios=()
        for round in $(seq "$RUNS"); do
            if [ $((round % 2)) = 1 ]; then
                p=$(pgbench_tps plain "$clients" "$protocol"); d=$(pgbench_tps decrypt "$clients" "$protocol")
            else
                d=$(pgbench_tps decrypt "$clients" "$protocol"); p=$(pgbench_tps plain "$clients" "$protocol")
            fi
            plain+=("$p") decrypt+=("$d")
            ratios+=("$(awk -v d="$d" -v p="$p" 'BEGIN { printf "%.3f", (p > 0 ? d / p : 0) }')")
        done
        key=$protocol$clients
        TPS[plain$key]=$(mid "${plain[@]}") TPS[decrypt$key]=$(mid "${decrypt[@]}") RATIO[$key]=$(mid "${ratios[@]}")
        printf '  %-8s %d client(s): %8s tps plaintext, %8s tps decrypt_phi, ratio %s (rounds: %s)\n' "$protocol" "$clients" \
            "${TPS[plain$key]}" "${TPS[decrypt$key]}" "${RATIO[$key]}" "${ratios[*]}"
    done
done
for protocol in simple prepared; do
    met=$(awk -v r="${RATIO[${protocol}1]}" 'BEGIN { print (r >= 0.95 ? "met" : "NOT met") }')
    echo "  point lookup, $protocol protocol, 1 client: ratio ${RATIO[${protocol}1]}, target >= 0.95 $met"
done

echo "cold miss (one row after pgphi.flush_cache(), in a warm session and in a new one; median of 5):"
cold=() warm=() km=() fresh=()
for _ in 1 2 3 4 5; do
    # One session: warm up, then time a hit, a flush, and the miss after it.
    before=$(psql_bench -At -c "SELECT key_manager_calls || ' ' || avg_key_manager_ms FROM pgphi.cache_stats")
    out=$(psql_bench -c "SELECT pgphi.decrypt_phi(phi) FROM data WHERE id = 3" -c '\timing on' \
                     -c "SELECT pgphi.decrypt_phi(phi) FROM data WHERE id = 2" \
                     -c "SELECT pgphi.flush_cache()" -c "SELECT pgphi.decrypt_phi(phi) FROM data WHERE id = 1")
    after=$(psql_bench -At -c "SELECT key_manager_calls || ' ' || avg_key_manager_ms FROM pgphi.cache_stats")
    warm+=("$(sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' <<< "$out" | sed -n 1p)")
    cold+=("$(sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' <<< "$out" | sed -n 3p)")
    # The key-manager time of the miss's one call, from the running average.
    km+=("$(awk -v b="$before" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " ");
            printf "%.3f", (y[1] > x[1]) ? (y[1] * y[2] - x[1] * x[2]) / (y[1] - x[1]) : 0 }')")
    psql_bench -c "SELECT pgphi.flush_cache()" >/dev/null
    fresh+=("$(psql_bench -c '\timing on' -c "SELECT pgphi.decrypt_phi(phi) FROM data WHERE id = 1" |
               sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | sed -n 1p)")
done
median() { printf '%s\n' "$@" | sort -g | sed -n 3p; }
COLD_MS=$(median "${cold[@]}"); WARM_MS=$(median "${warm[@]}"); KM_MS=$(median "${km[@]}"); FRESH_MS=$(median "${fresh[@]}")
OVERHEAD_MS=$(awk -v c="$COLD_MS" -v w="$WARM_MS" -v k="$KM_MS" 'BEGIN { printf "%.3f", c - w - k }')
printf '  warm session: miss %s ms, hit %s ms, key-manager call %s ms: pgphi overhead %s ms; new session first row %s ms\n' \
    "$COLD_MS" "$WARM_MS" "$KM_MS" "$OVERHEAD_MS" "$FRESH_MS"

echo "memory (one session decrypting the table ten times: $((ROWS * 10)) values):"
MEMORY=$(psql_bench -At <<'SQL'
CREATE TEMP TABLE rss (pass int, kb bigint);
CREATE FUNCTION pg_temp.rss_kb() RETURNS bigint LANGUAGE sql AS
  $$ SELECT substring(pg_read_file('/proc/self/status') FROM 'VmRSS:\s+(\d+)')::bigint $$;
SELECT count(length(pgphi.decrypt_phi(phi))) FROM data \g /dev/null
INSERT INTO rss SELECT 1, pg_temp.rss_kb();
SELECT count(length(pgphi.decrypt_phi(phi))) FROM data, generate_series(1, 9) \g /dev/null
INSERT INTO rss SELECT 10, pg_temp.rss_kb();
SELECT string_agg(kb::text, ' ' ORDER BY pass) FROM rss;
SQL
)
RSS_AFTER_1=${MEMORY% *}; RSS_AFTER_10=${MEMORY#* }
printf '  backend RSS after 1 scan %s kB, after 10 scans %s kB\n' "$RSS_AFTER_1" "$RSS_AFTER_10"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
cache=$(psql_bench -At -c "SELECT bytes_per_entry FROM pgphi.cache_stats")
mkdir -p "$RESULTS"
{
    echo "# pgphi SQL benchmark"
    echo
    echo "$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), $ROWS rows of 9-byte values ($PGP_ROWS for pgp_sym_*), median of $RUNS interleaved rounds, $(date -u +%Y-%m-%d), load average $(cut -d' ' -f1-3 /proc/loadavg) at the end (a shared machine reads slower and noisier)."
    echo
    echo "| operation | ns/row | ratio | target | met |"
    echo "|---|---:|---|---|---|"
    row() { printf '| %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" "$5"; }
    met() { awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN { print ((op == "<=" ? v <= t : v >= t) ? "yes" : "no") }'; }
    r=$(ratio "${NS[floor_gcm_decrypt]}" "${NS[plaintext_scan]}"); row "raw AES-256-GCM decrypt (C floor)" "${NS[floor_gcm_decrypt]}" "${r}x plaintext scan" "" ""
    r=$(ratio "${NS[decrypt_phi]}" "${NS[floor_gcm_decrypt]}"); row "decrypt_phi" "${NS[decrypt_phi]}" "${r}x the floor" "<= 1.3x" "$(met "$r" "<=" 1.3)"
    r=$(ratio "${NS[decrypt_phi_limited]}" "${NS[floor_gcm_decrypt]}"); row "decrypt_phi, with a decrypt limit and a time-limited grant" "${NS[decrypt_phi_limited]}" "${r}x the floor" "<= 1.3x" "$(met "$r" "<=" 1.3)"
    r=$(ratio "${NS[pgcrypto_decrypt_iv]}" "${NS[decrypt_phi]}"); row "pgcrypto decrypt_iv (AES-CBC)" "${NS[pgcrypto_decrypt_iv]}" "${r}x decrypt_phi" ">= 2x" "$(met "$r" ">=" 2)"
    r=$(ratio "${NS[pgp_sym_decrypt]}" "${NS[decrypt_phi]}"); row "pgcrypto pgp_sym_decrypt" "${NS[pgp_sym_decrypt]}" "${r}x decrypt_phi" ">= 500x" "$(met "$r" ">=" 500)"
    r=$(ratio "${NS[encrypt_phi]}" "${NS[floor_gcm_encrypt]}"); row "encrypt_phi (INSERT)" "${NS[encrypt_phi]}" "${r}x the floor's encrypt" "<= 1.5x" "$(met "$r" "<=" 1.5)"
    r=$(ratio "${NS[pgp_sym_encrypt]}" "${NS[encrypt_phi]}"); row "pgcrypto pgp_sym_encrypt (INSERT)" "${NS[pgp_sym_encrypt]}" "${r}x encrypt_phi" ">= 500x" "$(met "$r" ">=" 500)"
    r=$(ratio "${NS[pgphi_reencrypt]}" "${NS[update_set_col_eq_col]}"); row "CALL pgphi.reencrypt" "${NS[pgphi_reencrypt]}" "${r}x UPDATE SET col = col" "<= 2x" "$(met "$r" "<=" 2)"
    r=$(ratio "${NS[pgcrypto_reencrypt]}" "${NS[pgphi_reencrypt]}"); row "pgcrypto re-encryption (UPDATE)" "${NS[pgcrypto_reencrypt]}" "${r}x pgphi.reencrypt" ">= 50x" "$(met "$r" ">=" 50)"
    row "plaintext scan" "${NS[plaintext_scan]}" "" "" ""
    row "function-call floor (copy)" "${NS[floor_copy]}" "" "" ""
    row "INSERT of plaintext" "${NS[insert_plaintext]}" "" "" ""
    row "UPDATE SET col = col" "${NS[update_set_col_eq_col]}" "" "" ""
    echo
    echo "pgbench point lookup (one row decrypted per transaction), $PGBENCH_SECONDS s per run, median of $RUNS interleaved rounds; the ratio is the median of the rounds' ratios (target >= 0.95)."
    echo
    echo "| protocol | clients | plaintext tps | decrypt_phi tps | ratio | met |"
    echo "|---|---:|---:|---:|---:|---|"
    for protocol in simple prepared; do
        for c in 1 2 8; do
            printf '| %s | %s | %s | %s | %s | %s |\n' "$protocol" "$c" "${TPS[plain$protocol$c]}" "${TPS[decrypt$protocol$c]}" \
                "${RATIO[$protocol$c]}" "$(met "${RATIO[$protocol$c]}" ">=" 0.95)"
        done
    done
    echo
    echo "Cold miss: in a warm session a row whose DEK is in no cache takes $COLD_MS ms against $WARM_MS ms for a hit; the key-manager call (local provider) took $KM_MS ms, so pgphi's own overhead is $OVERHEAD_MS ms. A new session's first row takes $FRESH_MS ms (PostgreSQL's per-session catalog and plan warm-up included)."
    echo
    echo "Memory: one backend's RSS was $RSS_AFTER_1 kB after decrypting the table once and $RSS_AFTER_10 kB after $((ROWS * 10)) values."
    echo
    echo "Shared DEK cache: $cache bytes of shared memory per entry."
} > "$RESULTS/$RESULTS_FILE"

if command -v gnuplot >/dev/null; then
    {
        for name in plaintext_scan floor_copy floor_gcm_decrypt decrypt_phi pgcrypto_decrypt_iv floor_gcm_encrypt encrypt_phi; do
            echo "$name ${NS[$name]}"
        done
    } > "$RESULTS/per_row.dat"
    gnuplot <<GP 2>/dev/null || true
set terminal pngcairo size 900,480 noenhanced
set output '$RESULTS/per_row.png'
set title 'pgphi: per-row cost (ns), $ROWS rows'
set style fill solid 0.8
set boxwidth 0.6
set ylabel 'ns per row'
set xtics rotate by -30
plot '$RESULTS/per_row.dat' using 0:2:xtic(1) with boxes notitle
GP
fi
echo
cat "$RESULTS/$RESULTS_FILE"
