#!/usr/bin/env bash
# A throwaway Kafka-protocol broker (tansu) for the integration tests.
#   scripts/tansu.sh install      build tansu once (15-20 min on 2 cores), reused afterwards
#   scripts/tansu.sh start DIR    start it on a free port; prints 127.0.0.1:PORT
#   scripts/tansu.sh stop DIR     stop the broker started in DIR
#
# Storage defaults to a fresh SQLite file in DIR, not memory://: tansu 0.6's memory (object store)
# engine serves a fetch only from batch boundaries (reading from an offset inside a producer batch
# skips the rest of that batch) and answers ListOffsets(latest) with "last batch base + 1", so
# consumer resumption and end offsets are wrong there. Its SQL engines store one row per record and
# behave like Kafka. Override with TANSU_STORAGE=memory://tansu/ once that is fixed upstream.
#
# tansu 0.6's SQLite schema has no index on its record headers, and it looks a fetched record's
# headers up with a scan of every header of every topic: each fetch costs O(all records ever
# written), so consumers slow to a crawl as the file grows (payerx puts four headers on every
# event). `start` adds the missing index once tansu has created its tables.
set -euo pipefail
# shellcheck source=daemon.sh
source "$(dirname "$0")/daemon.sh"

tansu_bin() {
    if command -v tansu >/dev/null 2>&1; then
        command -v tansu
    elif [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]]; then
        echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    else
        return 1
    fi
}

install() {
    if bin=$(tansu_bin); then
        echo "tansu already installed: $bin" >&2
        return 0
    fi
    cargo install tansu --locked --features dynostore,libsql,postgres
}

start() {
    local dir=$1 bin port
    bin=$(tansu_bin) || { echo "tansu not found: run '$0 install' first" >&2; exit 1; }
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -f "$dir/tansu.pid" ]] && kill -0 "$(cat "$dir/tansu.pid")" 2>/dev/null; then
        echo "tansu already running from $dir (pid $(cat "$dir/tansu.pid"))" >&2
        exit 1
    fi
    port=$(free_port)
    rm -f "$dir"/tansu.db "$dir"/tansu.db-*
    # tansu resolves sqlite://NAME against its working directory, hence the cd.
    (cd "$dir" && exec nohup "$bin" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "${TANSU_STORAGE:-sqlite://tansu.db}" \
        >"$dir/tansu.log" 2>&1 </dev/null) &
    echo $! >"$dir/tansu.pid"

    wait_listening tansu "$port" "$dir/tansu.pid" "$dir/tansu.log"
    if [[ -z "${TANSU_STORAGE:-}" ]]; then
        index_headers "$dir/tansu.db"
    fi
    echo "127.0.0.1:$port"
}

# index_headers DB: the index tansu's header lookups need (see the top of this file).
index_headers() {
    python3 - "$1" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=10)
deadline = time.monotonic() + 30
# tansu creates its tables as it starts; wait for the one that needs the index.
while not db.execute("select 1 from sqlite_master where type = 'table' and name = 'header'").fetchone():
    if time.monotonic() > deadline:
        sys.exit("tansu created no header table in 30 s")
    time.sleep(0.1)
db.execute("create index if not exists header_topition_offset on header (topition, offset_id)")
db.commit()
PY
}

stop() {
    stop_pidfile "$1/tansu.pid"
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
