# Shared by the scripts in this folder: paths, and running a command as the
# unprivileged account PostgreSQL needs when we are root.

PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config
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
