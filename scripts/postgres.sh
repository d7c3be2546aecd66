#!/usr/bin/env bash
# A throwaway PostgreSQL (Debian's postgresql package) for the integration tests.
#   scripts/postgres.sh install     apt-get install postgresql, unless its binaries are there
#   scripts/postgres.sh start DIR   initdb + pg_ctl in DIR on a free port; prints the admin URL
#   scripts/postgres.sh stop DIR    stop it
# initdb and pg_ctl refuse to run as root, so they run as the postgres user when we are root.
set -euo pipefail
# shellcheck source=daemon.sh
source "$(dirname "$0")/daemon.sh"

pg_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" ]] && { echo "$d"; return 0; }
    done
    return 1
}

as_pg() {
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install() {
    if pg_bin >/dev/null; then
        echo "postgres already installed: $(pg_bin)" >&2
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
}

start() {
    local dir=$1 bin port
    bin=$(pg_bin) || { echo "PostgreSQL not found: run '$0 install' first" >&2; exit 1; }
    mkdir -p "$dir/pg"
    dir=$(cd "$dir" && pwd)
    [[ $(id -u) -eq 0 ]] && chown -R postgres "$dir/pg"
    port=$(free_port)
    as_pg "$bin/initdb" -D "$dir/pg/data" -A trust -U postgres --no-sync >"$dir/pg/initdb.log" 2>&1 \
        || { cat "$dir/pg/initdb.log" >&2; exit 1; }
    # Test settings: durability traded for speed, enough connections for parallel tests.
    as_pg "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 60 \
        -o "-p $port -k $dir/pg -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        start >/dev/null || { tail -n 30 "$dir/pg/server.log" >&2; exit 1; }
    echo "$port" >"$dir/pg/port"
    echo "postgres://postgres@127.0.0.1:$port/postgres"
}

stop() {
    local dir=$1 bin
    bin=$(pg_bin) || exit 0
    [[ -d "$dir/pg/data" ]] || exit 0
    as_pg "$bin/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null 2>&1 || true
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
