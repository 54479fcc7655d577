#!/usr/bin/env bash
# pgphi's load test (opt-in: `make loadtest`). In a throwaway cluster, pgbench
# runs LOADTEST_CLIENTS (8) clients for LOADTEST_SECONDS (300), mixing
# encrypt-inserts and decrypt-selects that check every value they read, while
# the key is rotated LOADTEST_ROTATIONS (2) times and after each rotation
# CALL pgphi.reencrypt moves the whole table to the new version. It then checks
# and prints, exiting non-zero when any check fails:
#   errors   pgbench's failed transactions and aborted clients, and every
#            ERROR / FATAL / PANIC in the server log (none is expected)
#   rows     rows present = rows preloaded + inserts pgbench saw committed,
#            and every row decrypts to the value derived from its id
#   versions every row is on the key's active version at the end
#   memory   private resident memory (RssAnon) of each pgbench backend and of
#            the key broker, after the warm-up and at the end: growth beyond
#            LOADTEST_MAX_GROWTH_KB (4096) fails
# Other settings: LOADTEST_PRELOAD_ROWS (100000), LOADTEST_PORT (5497).
# The cluster's directory is removed on success and kept on failure.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

DURATION=${LOADTEST_SECONDS:-300}
CLIENTS=${LOADTEST_CLIENTS:-8}
ROTATIONS=${LOADTEST_ROTATIONS:-2}
PRELOAD=${LOADTEST_PRELOAD_ROWS:-100000}
MAX_GROWTH_KB=${LOADTEST_MAX_GROWTH_KB:-4096}
PORT=${LOADTEST_PORT:-5497}
# Memory is sampled about 30 times per run; the first sample that counts is
# taken after a warm-up (a tenth of the run, at most 30 s), once each session
# has filled its catalog and plan caches.
SAMPLE_EVERY=$(( DURATION / 30 > 2 ? DURATION / 30 : 2 ))
WARMUP=$(( DURATION / 10 < 30 ? DURATION / 10 : 30 ))

scripts/install-deps.sh || exit 1
make -s -j2 PG_CONFIG="$PG_CONFIG" || exit 1
use_private_install || exit 1

WORK=$(make_pg_workdir load)
failures=0
cleanup() {
    as_pg_user "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1
    if [ $failures -eq 0 ]; then
        rm -rf "$WORK"
    else
        echo "cluster directory, server log and pgbench output kept in $WORK"
    fi
}
trap cleanup EXIT
trap 'failures=1; exit 1' INT TERM

start_throwaway_cluster "$WORK" "$PORT" <<CONF || { failures=1; exit 1; }
pgphi.local_kek_file = '$WORK/pgphi.kek'
max_connections = 40
shared_buffers = '256MB'
log_line_prefix = '%m [%p] %b '
CONF

psql_load() { as_pg_user "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -U postgres -d postgres "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

echo "pgphi load test: $CLIENTS clients for $DURATION s, $ROTATIONS rotations with re-encryption, $PRELOAD rows preloaded"

# Each row's plaintext derives from its id, which is also the encryption
# context, so any row can be checked and a value moved to another row fails.
psql_load <<SQL || { failures=1; exit 1; }
SET client_min_messages = error;  -- not the new KEK file's warning
CREATE EXTENSION pgphi;
SELECT pgphi.create_key('load') \g /dev/null
CREATE FUNCTION load_plaintext(id bigint) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS \$\$ SELECT 'patient ' || id || ' record ' || md5(id::text) \$\$;
-- Raises when a row did not decrypt to its value: pgbench counts a failure.
CREATE FUNCTION load_check(id bigint, decrypted text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE
AS \$\$
BEGIN
    IF decrypted IS DISTINCT FROM load_plaintext(id) THEN
        RAISE EXCEPTION 'row % did not decrypt to its value', id USING ERRCODE = 'data_corrupted';
    END IF;
    RETURN true;
END
\$\$;
CREATE SEQUENCE load_ids;
CREATE TABLE load_rows (id bigint PRIMARY KEY, payload pgphi.encrypted NOT NULL);
INSERT INTO load_rows
SELECT i, pgphi.encrypt_phi(load_plaintext(i), 'load', i::text)
  FROM (SELECT nextval('load_ids') AS i FROM generate_series(1, $PRELOAD)) ids;
VACUUM ANALYZE load_rows;
SQL

cat > "$WORK/insert.sql" <<'SQL'
INSERT INTO load_rows (id, payload)
SELECT i, pgphi.encrypt_phi(load_plaintext(i), 'load', i::text) FROM nextval('load_ids') i;
SQL
# Ten consecutive rows from a random place among those inserted so far.
cat > "$WORK/select.sql" <<'SQL'
SELECT last_value AS high FROM load_ids \gset
\set low random(1, :high)
SELECT count(*) FROM load_rows
 WHERE id BETWEEN :low AND :low + 9 AND load_check(id, pgphi.decrypt_phi(payload, 'load', id::text));
SQL

# Rotation and re-encryption, at even intervals during the run.
rotate_and_reencrypt() {
    local start=$1 i at elapsed begun
    for i in $(seq "$ROTATIONS"); do
        at=$(( DURATION * i / (ROTATIONS + 1) ))
        elapsed=$(since "$start")
        sleep "$(awk -v a="$at" -v e="$elapsed" 'BEGIN { d = a - e; print (d > 0 ? d : 0) }')"
        begun=$(since "$start")
        version=$(psql_load -c "SELECT pgphi.rotate_key('load')") || return 1
        echo "rotation $i: version $version at ${begun} s"
        begun=$(since "$start")
        psql_load -c "CALL pgphi.reencrypt('load_rows', 'payload', 5000, context_column => 'id')" || return 1
        echo "re-encryption $i: $(psql_load -c "SELECT rows_reencrypted FROM pgphi.reencrypt_progress") rows" \
             "from ${begun} s to $(since "$start") s"
    done
}

# Memory of the pgbench backends and the broker: "seconds pid role VmRSS RssAnon" (kB).
sample_memory() {
    local start=$1 pids pid
    pids=$(psql_load -F ' ' -c "SELECT pid, 'backend' FROM pg_stat_activity WHERE application_name = 'pgbench'
                                UNION ALL SELECT pid, 'broker' FROM pgphi.broker_status()")
    while kill -0 "$PGBENCH_PID" 2>/dev/null; do
        while read -r pid role; do
            awk -v t="$(since "$start")" -v pid="$pid" -v role="$role" '
                /^VmRSS:/ { rss = $2 } /^RssAnon:/ { anon = $2 }
                END { if (rss != "") print t, pid, role, rss, anon }' "/proc/$pid/status" 2>/dev/null
        done <<< "$pids"
        sleep "$SAMPLE_EVERY"
    done
}

START=$(now)
as_pg_user "$PG_BIN/pgbench" -n -h "$WORK" -p "$PORT" -U postgres -c "$CLIENTS" -j 2 -T "$DURATION" -M prepared \
    -P $(( DURATION / 10 > 5 ? DURATION / 10 : 5 )) -l --log-prefix="$WORK/transactions" \
    -f "$WORK/insert.sql@1" -f "$WORK/select.sql@1" postgres > "$WORK/pgbench.out" 2> "$WORK/pgbench.err" &
PGBENCH_PID=$!
# The sampler needs every client connected.
for _ in $(seq 100); do
    [ "$(psql_load -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'")" -ge "$CLIENTS" ] && break
    sleep 0.1
done
sample_memory "$START" > "$WORK/memory.txt" &
SAMPLER_PID=$!
rotate_and_reencrypt "$START" > "$WORK/rotation.out" 2>&1 &
ROTATION_PID=$!

wait "$PGBENCH_PID"
pgbench_status=$?
wait "$ROTATION_PID"
rotation_status=$?
wait "$SAMPLER_PID"
echo "load finished after $(since "$START") s"

echo
echo "== throughput (pgbench)"
sed -n -e '/^progress:/p' "$WORK/pgbench.err"
grep -E '^(number of (transactions actually processed|failed transactions)|latency average|tps)' "$WORK/pgbench.out"
# Counted in the per-transaction log ("client transaction time script ...";
# time is "failed" or "skipped" for those that did not commit): the per-script
# summary leaves out the transactions that finish after the deadline, which
# did commit.
read -r inserts selects <<< "$(cat "$WORK"/transactions.* |
    awk '$3 ~ /^[0-9]+$/ { n[$4]++ } END { print n[0] + 0, n[1] + 0 }')"
echo "encrypt-inserts committed: ${inserts:-?}; decrypt-selects (up to 10 rows each, every value checked): ${selects:-?}"

echo
echo "== rotation and re-encryption (concurrent with the load)"
cat "$WORK/rotation.out"
[ $rotation_status -eq 0 ] || fail "the rotation or re-encryption failed"

echo
echo "== errors (none is expected)"
failed_tx=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$WORK/pgbench.out")
aborted=$(grep -c 'aborted' "$WORK/pgbench.err")
server_errors=$(grep -cE ' (ERROR|FATAL|PANIC): ' "$WORK/server.log")
echo "pgbench exit status $pgbench_status, failed transactions ${failed_tx:-?}, aborted clients $aborted"
echo "server log: $server_errors ERROR/FATAL/PANIC lines"
grep -E ' (ERROR|FATAL|PANIC): ' "$WORK/server.log" | sed 's/^[^ ]* [^ ]* //' | sort | uniq -c | sort -rn | head -10
[ "$pgbench_status" -eq 0 ] || fail "pgbench exited with status $pgbench_status"
[ "${failed_tx:-x}" = 0 ] || fail "pgbench reports ${failed_tx:-no count of} failed transactions"
[ "$aborted" -eq 0 ] || fail "$aborted pgbench clients aborted"
[ "$server_errors" -eq 0 ] || fail "the server logged $server_errors errors"

echo
echo "== rows"
read -r present decrypted wrong_version active <<< "$(psql_load -F ' ' <<'SQL'
SELECT count(*),
       count(*) FILTER (WHERE pgphi.decrypt_phi(payload, 'load', id::text) = load_plaintext(id)),
       count(*) FILTER (WHERE (pgphi.ciphertext_info(payload)).key_version <> a.version),
       min(a.version)
  FROM load_rows, (SELECT version FROM pgphi.key_versions WHERE state = 'active') a;
SQL
)"
expected=$(( PRELOAD + ${inserts:-0} ))
echo "rows expected $expected (preloaded $PRELOAD + inserted ${inserts:-?}), present $present," \
     "decrypting to their value $decrypted"
echo "active key version $active; rows on another version: $wrong_version"
[ -n "$inserts" ] || fail "could not read the number of inserts from pgbench's output"
[ "$present" = "$expected" ] || fail "$(( expected - present )) rows lost (negative: unexpected rows)"
[ "$decrypted" = "$present" ] || fail "$(( present - decrypted )) rows do not decrypt to their value"
[ "$wrong_version" = 0 ] || fail "$wrong_version rows are not on the active version"
[ "$active" = $(( ROTATIONS + 1 )) ] || fail "the active version is $active, not $(( ROTATIONS + 1 ))"

echo
echo "== memory (kB; RssAnon is the process's private memory, VmRSS adds the shared buffers it touched)"
# Per process: the first sample after the warm-up and the last sample.
memory_report=$(awk -v warmup="$WARMUP" -v limit="$MAX_GROWTH_KB" '
    $1 >= warmup && !($2 in first) { first[$2] = $0 }
    { last[$2] = $0 }
    END {
        for (pid in first) {
            split(first[pid], a, " "); split(last[pid], b, " ")
            growth = b[5] - a[5]
            printf "%-8s pid %-7s at %6.1f s: VmRSS %7d RssAnon %6d | at %6.1f s: VmRSS %7d RssAnon %6d | growth %+d%s\n",
                   a[3], pid, a[1], a[4], a[5], b[1], b[4], b[5], growth, (growth > limit ? "  TOO MUCH" : "")
        }
    }' "$WORK/memory.txt" | sort)
echo "$memory_report"
samples=$(awk '{ print $1 }' "$WORK/memory.txt" | sort -u | wc -l)
echo "$samples samples, every $SAMPLE_EVERY s; growth limit $MAX_GROWTH_KB kB per process"
[ "$(grep -c '^backend' <<< "$memory_report")" -eq "$CLIENTS" ] || fail "memory was not sampled for every client's backend"
grep -q '^broker' <<< "$memory_report" || fail "memory was not sampled for the key broker"
grep -q 'TOO MUCH' <<< "$memory_report" && fail "memory grew by more than $MAX_GROWTH_KB kB"

echo
if [ $failures -eq 0 ]; then
    echo "load test passed"
else
    echo "load test FAILED ($failures checks)"
fi
[ $failures -eq 0 ]
