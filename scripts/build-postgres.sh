#!/usr/bin/env bash
# Builds a PostgreSQL major version that Debian 12 does not ship (17 from
# trixie, 18 from sid) from Debian's source packages, and prints the path of
# its pg_config. Usage: scripts/build-postgres.sh MAJOR
#
# - The machine's apt configuration is left alone: a private sources list,
#   with its own state and cache directories, names the newer suites, at the
#   archive address the machine's own configuration uses (the repository names
#   no host).
# - The suite's index can be ahead of the files the archive serves. When the
#   indexed version's files are missing (HTTP 404), the newest upstream
#   tarball that is served from the same pool directory and whose checksum is
#   in scripts/postgres-sources.sha256 is used instead.
# - The build (--with-openssl --enable-tap-tests, contrib included) goes into
#   $PGPHI_PG_CACHE/postgresql-VERSION (default /var/cache/pgphi), outside the
#   repository, and is reused by later runs: one build per version.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

major=${1:?usage: build-postgres.sh MAJOR}
case $major in
    17) suite=trixie ;;
    18) suite=sid ;;
    *) echo "build-postgres.sh: PostgreSQL $major is not built from source here" >&2; exit 2 ;;
esac

cache=${PGPHI_PG_CACHE:-/var/cache/pgphi}
apt_dir=$cache/apt
mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$cache/src"
# One build of a version at a time (scripts/test.sh starts them ahead in the
# background): a second caller waits for the first, then finds its build.
# The private apt state is shared by every version, so one lock serves all.
exec 9>"$cache/.build.lock"
flock 9

log() { echo "build-postgres: $*" >&2; }

# A finished build of this major version, if any (newest first).
cached_build() {
    local dir
    for dir in $(ls -d "$cache"/postgresql-"$major".* 2>/dev/null | sort -t. -k2,2nr); do
        [ -e "$dir/.complete" ] && { echo "$dir"; return 0; }
    done
    return 1
}

# The archive the machine already uses for Debian (from its deb822 or
# one-line sources).
archive_uri() {
    local uri
    uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /debian\/?$/) { print $i; exit } }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
    [ -z "$uri" ] && uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)
    [ -n "$uri" ] || { log "no Debian archive address in the apt configuration"; return 1; }
    echo "${uri%/}"
}

apt_private() {
    local cmd=$1; shift
    "$cmd" -o Dir::Etc::sourcelist="$apt_dir/sources.list" -o Dir::Etc::sourceparts=- \
        -o Dir::State="$apt_dir/state" -o Dir::Cache="$apt_dir/cache" \
        -o APT::Sandbox::User=root "$@"
}

# Downloads URL to FILE; fails (without leaving FILE) on any HTTP error.
fetch() {
    curl -fsSL --retry 2 -m 600 -o "$2.part" "$1" && mv "$2.part" "$2" || { rm -f "$2.part"; return 1; }
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Fetches the source tarball of the version the suite's index lists, or of
# the newest one served; prints VERSION TARBALL.
fetch_source() {
    local uri index_version dsc_line dir upstream minor tarball expected name
    uri=$(archive_uri)
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" >"$apt_dir/sources.list"
    apt_private apt-get update -qq >&2
    index_version=$(apt_private apt-cache showsrc "postgresql-$major" | awk '/^Version:/ { print $2; exit }')
    dir=$(apt_private apt-cache showsrc "postgresql-$major" | awk '/^Directory:/ { print $2; exit }')
    [ -n "$index_version" ] && [ -n "$dir" ] || { log "postgresql-$major is not in $suite's index"; return 1; }
    upstream=${index_version%%-*}
    minor=${upstream#*.}

    # The indexed version, checked against the index's own checksum.
    name="postgresql-${major}_${upstream}.orig.tar.bz2"
    tarball=$cache/src/$name
    expected=$(apt_private apt-cache showsrc "postgresql-$major" |
        awk -v f="$name" '/^Checksums-Sha256:/ { on = 1; next } /^[^ ]/ { on = 0 } on && $3 == f { print $1; exit }')
    if [ -e "$tarball" ] || fetch "$uri/$dir/$name" "$tarball"; then
        if [ -n "$expected" ] && [ "$(sha256_of "$tarball")" = "$expected" ]; then
            echo "$upstream $tarball"
            return 0
        fi
        log "$name does not match the index's checksum"; rm -f "$tarball"; return 1
    fi

    # The index is ahead of the archive: the newest older release served.
    log "$suite lists $upstream but the archive does not serve it; trying older releases"
    while [ "$minor" -gt 0 ]; do
        minor=$((minor - 1))
        name="postgresql-${major}_${major}.${minor}.orig.tar.bz2"
        tarball=$cache/src/$name
        if [ -e "$tarball" ] || fetch "$uri/$dir/$name" "$tarball"; then
            expected=$(awk -v f="$name" '$2 == f { print $1 }' "$REPO_ROOT/scripts/postgres-sources.sha256")
            if [ -n "$expected" ] && [ "$(sha256_of "$tarball")" = "$expected" ]; then
                echo "$major.$minor $tarball"
                return 0
            fi
            # Served, but nothing vouches for it: look further down.
            log "$name: checksum $(sha256_of "$tarball") is not in scripts/postgres-sources.sha256; skipped"
            rm -f "$tarball"
        fi
    done
    log "no release of PostgreSQL $major is served"
    return 1
}

build() {
    local version=$1 tarball=$2 prefix work
    prefix=$cache/postgresql-$version
    work=$(mktemp -d "$cache/src/build-$version.XXXXXX")
    log "building PostgreSQL $version into $prefix (a few minutes)"
    tar -xjf "$tarball" -C "$work"
    (
        cd "$work"/postgresql-"$version"
        ./configure --prefix="$prefix" --with-openssl --enable-tap-tests --without-icu \
            --without-readline --disable-nls >"$work/configure.log" 2>&1 ||
            { tail -n 30 "$work/configure.log" >&2; exit 1; }
        # The server, its client programs, contrib (pgcrypto for the benchmark)
        # and the TAP modules; no documentation.
        make -s -j"$(nproc)" world-bin >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }
        rm -rf "$prefix"
        make -s install-world-bin >"$work/install.log" 2>&1 || { tail -n 20 "$work/install.log" >&2; exit 1; }
    )
    touch "$prefix/.complete"
    rm -rf "$work"
    echo "$prefix"
}

scripts/install-deps.sh build-postgres >&2
if source_info=$(fetch_source); then
    read -r version tarball <<<"$source_info"
    prefix=$cache/postgresql-$version
    [ -e "$prefix/.complete" ] || prefix=$(build "$version" "$tarball")
elif prefix=$(cached_build); then
    log "using the cached build in $prefix"
else
    exit 1
fi
echo "$prefix/bin/pg_config"
