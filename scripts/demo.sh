#!/usr/bin/env bash
# pgphi's demo: installs what is missing, builds and installs pgphi, starts a
# throwaway PostgreSQL 15 cluster with the local key provider, runs the
# clinical scenario and leaves the cluster running.
#   scripts/demo.sh        (re)create the demo cluster and run the scenario
#   scripts/demo.sh stop   stop the demo cluster and remove it
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

DEMO_DIR=/tmp/pgphi-demo
DEMO_PORT=${PGPHI_DEMO_PORT:-5499}

stop_demo() {
    if [ -f "$DEMO_DIR/data/postmaster.pid" ]; then
        # A stale pid file (the machine was restarted) is not an error.
        as_pg_user "$PG_BIN/pg_ctl" -D "$DEMO_DIR/data" -m fast stop >/dev/null 2>&1 || true
    fi
    rm -rf "$DEMO_DIR"
}

if [ "${1:-}" = stop ]; then
    stop_demo
    echo "pgphi demo cluster stopped and removed."
    exit 0
fi

# PGPHI_DEMO_INSTALLED=1: pgphi is already installed (the package test's
# dpkg -i), so the checkout is neither built nor installed.
if [ -z "${PGPHI_DEMO_INSTALLED:-}" ]; then
    scripts/install-deps.sh
    make -s -j2 PG_CONFIG="$PG_CONFIG"
    as_root make -s install PG_CONFIG="$PG_CONFIG" >/dev/null
fi

stop_demo
mkdir -p "$DEMO_DIR"
[ "$(id -u)" = 0 ] && chown "$PG_USER" "$DEMO_DIR"
start_throwaway_cluster "$DEMO_DIR" "$DEMO_PORT" <<CONF
pgphi.local_kek_file = 'pgphi_local.kek'
CONF

psql_as() {
    local role=$1
    shift
    as_pg_user "$PG_BIN/psql" -X -q -h "$DEMO_DIR" -p "$DEMO_PORT" -U "$role" -d clinic "$@"
}
as_pg_user "$PG_BIN/createdb" -h "$DEMO_DIR" -p "$DEMO_PORT" -U postgres clinic
as_pg_user "$PG_BIN/psql" -X -q -h "$DEMO_DIR" -p "$DEMO_PORT" -U postgres -d clinic \
    -c "ALTER DATABASE clinic SET search_path = public, pgphi"

psql_as postgres -f scripts/demo/clinic.sql
psql_as clinician -f scripts/demo/as_clinician.sql
# The clerk's refusals are the point of step 6: they must fail.
if psql_as billing_clerk -v ON_ERROR_STOP=1 -c 'SELECT 1 FROM patients_decrypted' >/dev/null 2>&1; then
    echo "pgphi demo: billing_clerk was NOT refused; this is a bug" >&2
    exit 1
fi
psql_as billing_clerk -f scripts/demo/as_clerk.sql 2>&1
psql_as postgres -f scripts/demo/tamper.sql 2>&1
psql_as postgres -f scripts/demo/audit.sql
psql_as postgres -f scripts/demo/evidence.sql

cat <<MSG

== The demo cluster is still running.
   Connect:  psql -h $DEMO_DIR -p $DEMO_PORT -U postgres clinic$([ "$(id -u)" = 0 ] && echo "   (as root: runuser -u postgres -- psql ...)")
   Stop:     make demo-stop
   The local KEK is $DEMO_DIR/data/pgphi_local.kek; the server log is $DEMO_DIR/server.log.
MSG
