# Shared by the scripts in this folder: paths, and running a command as the
# unprivileged account PostgreSQL needs when we are root.

# The PostgreSQL to build against and test with: Debian's 15 unless PG_CONFIG
# names another (scripts/build-postgres.sh builds 17 and 18).
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG_BIN=$("$PG_CONFIG" --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# PostgreSQL refuses to run as root, so as root the servers run as "postgres".
if [ "$(id -u)" = 0 ]; then
    PG_USER=postgres
else
    PG_USER=$(id -un)
fi

as_pg_user() {
    if [ "$(id -un)" = "$PG_USER" ]; then
        "$@"
    else
        runuser -u "$PG_USER" -- "$@"
    fi
}

# Runs a command as root, through sudo when we are not root.
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

# A private copy of the PostgreSQL installation with this checkout's pgphi
# installed into it, as PostgreSQL's own "make check" does: the tests never
# touch (or depend on) the system's installed extension, and two checkouts
# can test side by side. PostgreSQL finds its share and lib directories
# relative to its binaries, so the copy works wherever it is. Sets PG_BIN.
# With an argument, pgphi is built and installed from that directory (a
# build tree of its own, see build_side_tree) instead of the checkout.
use_private_install() {
    local dest bindir sharedir root dirs source_dir=${1:-$REPO_ROOT}
    bindir=$("$PG_CONFIG" --bindir) sharedir=$("$PG_CONFIG" --sharedir)
    root=$(dirname "$bindir") dirs=("$root")
    # Debian keeps the share folder apart; a source build has it in its root.
    case $sharedir/ in "$root"/*) ;; *) dirs+=("$sharedir") ;; esac
    dest=/tmp/pgphi-install.$(echo -n "$REPO_ROOT $PG_CONFIG" | sha256sum | cut -c1-12)
    # Copied again whenever that PostgreSQL has changed since. The copy holds
    # the installation's root (binaries and libraries) and its share folder.
    if [ ! -e "$dest/.copied" ] || [ "$bindir/postgres" -nt "$dest/.copied" ]; then
        rm -rf "$dest"
        local dir
        for dir in "${dirs[@]}"; do
            mkdir -p "$dest$(dirname "$dir")" && cp -a "$dir" "$dest$(dirname "$dir")/" || return 1
        done
        touch "$dest/.copied"
    fi
    # Scripts this checkout no longer has (another branch's, a renamed one)
    # must not linger: PostgreSQL would use them.
    rm -f "$dest$sharedir"/extension/pgphi--*.sql
    make -s -C "$source_dir" install PG_CONFIG="$PG_CONFIG" DESTDIR="$dest" >/dev/null || return 1
    chmod -R a+rX "$dest"
    PG_BIN=$dest$bindir
}

# Builds pgphi against another PostgreSQL (its pg_config in $1) in a build
# tree of its own, build/pgphi-pgMAJOR (a copy of the sources, updated
# incrementally), installs it into that PostgreSQL's private copy and prints
# the copy's installation root (the folder holding bin/). The checkout's own
# objects, built for the version under test, stay as they are. Used by the
# pg_upgrade test, which needs the old version's server with pgphi.
side_private_install() {
    local other=$1 major tree
    major=$("$other" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
    tree=$REPO_ROOT/build/pgphi-pg$major
    # A tree whose list of sources differs (a file added or removed) starts over.
    [ "$(cd "$REPO_ROOT" && find src -type f \( -name '*.cpp' -o -name '*.hpp' -o -name '*.sql' \) | sort)" = \
        "$(cd "$tree" 2>/dev/null && find src -type f \( -name '*.cpp' -o -name '*.hpp' -o -name '*.sql' \) | sort)" ] ||
        rm -rf "$tree"
    mkdir -p "$tree"
    # The sources only, with their times, so make rebuilds only what changed.
    # Never the checkout's objects: they were built against another
    # PostgreSQL, and, newer than this tree's build stamp, would be linked
    # into this one as they are.
    (cd "$REPO_ROOT" && tar -cf - --exclude='*.o' --exclude='*.d' --exclude='*.so' --exclude='*.bc' \
        Makefile pgphi.control src) | tar -xf - -C "$tree" || return 1
    make -s -j2 -C "$tree" PG_CONFIG="$other" >&2 || return 1
    (PG_CONFIG=$other; use_private_install "$tree" >&2 && dirname "$PG_BIN")
}

# A scratch directory the PostgreSQL user owns.
make_pg_workdir() {
    local dir
    dir=$(mktemp -d "/tmp/pgphi-$1.XXXXXX")
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown "$PG_USER" "$dir"
    echo "$dir"
}

# Creates and starts a throwaway cluster in DIR/data, listening only on a
# socket in DIR on PORT, with pgphi preloaded. Extra postgresql.conf lines
# come on standard input. The server log is DIR/server.log.
start_throwaway_cluster() {
    local dir=$1 port=$2
    as_pg_user "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
    {
        echo "port = $port"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$dir'"
        echo "shared_preload_libraries = 'pgphi'"
        cat
    } >> "$dir/data/postgresql.conf"
    as_pg_user "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}
