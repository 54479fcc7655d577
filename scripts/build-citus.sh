#!/usr/bin/env bash
# Builds Citus for the PostgreSQL that PG_CONFIG names, once, into a cache
# outside the repository, and prints the folder its files were staged into
# (a DESTDIR tree: copy it over the installation, or over the private copy
# scripts/test.sh makes). Usage: PG_CONFIG=... scripts/build-citus.sh
#
# - The source comes from CITUS_SOURCE: a folder holding the release tarballs
#   (citus-X.Y.Z.tar.gz; default ../shared/vendor beside the repository), one
#   tarball, or a checkout of Citus (a folder with its configure script).
#   Tarballs are checked against scripts/citus-sources.sha256; a checkout is
#   the user's own and is built as it is.
# - From a folder of tarballs the release is chosen by the PostgreSQL major:
#   Citus 13.2 on 15, Citus 14 on 17 and 18 (CITUS_VERSION overrides).
# - No Citus code enters the repository. The compatibility edit PostgreSQL
#   15.18 and later need (below) is made in the cache's copy of the source.
# - The build goes to $PGPHI_PG_CACHE/citus-VERSION-pgPGVERSION (default
#   /var/cache/pgphi) and is reused by later runs: one build per pair.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

log() { echo "build-citus: $*" >&2; }

cache=${PGPHI_PG_CACHE:-/var/cache/pgphi}
source=${CITUS_SOURCE:-$REPO_ROOT/../shared/vendor}
pg_version=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9.]+).*/\1/')
pg_major=${pg_version%%.*}

if [ -z "${CITUS_VERSION:-}" ]; then
    case $pg_major in
        15) CITUS_VERSION=13.2.2 ;;
        16 | 17 | 18) CITUS_VERSION=14.0.1 ;;
        *) log "no Citus release is known to support PostgreSQL $pg_major"; exit 2 ;;
    esac
fi

# Debian packages Citus's build needs (lz4 and zstd for columnar compression).
scripts/install-deps.sh citus >&2

checkout=''
if [ -d "$source" ] && [ -x "$source/configure" ]; then
    checkout=$source
    CITUS_VERSION=$(sed -nE "s/^PACKAGE_VERSION='([^']+)'.*/\1/p" "$source/configure")
    tarball=''
elif [ -d "$source" ]; then
    tarball=$source/citus-$CITUS_VERSION.tar.gz
else
    tarball=$source
    CITUS_VERSION=$(basename "$tarball" | sed -E 's/^citus-(.*)\.tar\.gz$/\1/')
fi

# A checkout gets a cache entry of its own per path, so it never reuses a
# release's build (or another checkout's).
suffix=''
[ -n "$checkout" ] && suffix=-src$(echo -n "$(cd "$checkout" && pwd)" | sha256sum | cut -c1-8)
build_dir=$cache/citus-$CITUS_VERSION-pg$pg_version$suffix
stage=$build_dir/stage

if [ -e "$build_dir/.complete" ] && [ -z "$checkout" ]; then
    echo "$stage"
    exit 0
fi

if [ -n "$tarball" ]; then
    [ -f "$tarball" ] || { log "no Citus source at $tarball (set CITUS_SOURCE)"; exit 1; }
    expected=$(awk -v f="$(basename "$tarball")" '$2 == f { print $1 }' "$REPO_ROOT/scripts/citus-sources.sha256")
    actual=$(sha256sum "$tarball" | cut -d' ' -f1)
    if [ -z "$expected" ] || [ "$actual" != "$expected" ]; then
        log "$tarball: checksum $actual is not the one in scripts/citus-sources.sha256; not built"
        exit 1
    fi
fi

log "building Citus $CITUS_VERSION for PostgreSQL $pg_version into $build_dir (a few minutes)"
rm -rf "$build_dir"
mkdir -p "$build_dir"
if [ -n "$tarball" ]; then
    tar -xzf "$tarball" -C "$build_dir"
    src=$build_dir/citus-$CITUS_VERSION
else
    # A copy, so the user's checkout is neither edited nor filled with objects.
    mkdir -p "$build_dir/src"
    (cd "$checkout" && tar -cf - --exclude=.git .) | tar -xf - -C "$build_dir/src"
    src=$build_dir/src
fi

# PostgreSQL 15.18 declares have_createdb_privilege() in
# commands/dbcommands.h, and Citus 13's pg_version_compat.h defines a static
# inline of the same name for 15 ("static declaration follows non-static
# declaration"). On a server that declares it, the server's own is used.
compat=$src/src/include/pg_version_compat.h
if grep -q 'have_createdb_privilege' "$("$PG_CONFIG" --includedir-server)/commands/dbcommands.h" &&
    grep -q '^have_createdb_privilege(void)' "$compat"; then
    log "using PostgreSQL's have_createdb_privilege() instead of Citus's copy"
    perl -0pi -e 's/static inline bool\nhave_createdb_privilege\(void\)\n\{.*?\n\}\n/#include "commands\/dbcommands.h"\n/s' "$compat"
    ! grep -q '^have_createdb_privilege(void)' "$compat" || { log "the compatibility edit did not apply"; exit 1; }
fi

(
    cd "$src"
    ./configure PG_CONFIG="$PG_CONFIG" --without-libcurl >"$build_dir/configure.log" 2>&1 ||
        { tail -n 30 "$build_dir/configure.log" >&2; exit 1; }
    make -s -j2 >"$build_dir/build.log" 2>&1 || { tail -n 40 "$build_dir/build.log" >&2; exit 1; }
    make -s install DESTDIR="$stage" >"$build_dir/install.log" 2>&1 ||
        { tail -n 20 "$build_dir/install.log" >&2; exit 1; }
)
# The objects are not needed again; the staged files are.
rm -rf "$src"
touch "$build_dir/.complete"
echo "$stage"
