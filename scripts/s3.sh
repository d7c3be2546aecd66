#!/usr/bin/env bash
# A throwaway S3-compatible server (s3s-fs, a file-system backed S3 API) for the integration tests.
#   scripts/s3.sh install      build s3s-fs once (a few minutes on 2 cores), reused afterwards
#   scripts/s3.sh start DIR    start it on a free port with bucket payerx-test; prints its endpoint URL
#   scripts/s3.sh stop DIR     stop the server started in DIR
# Credentials: access key `payerx`, secret `payerx-secret` (export them as AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY for the client).
set -euo pipefail

# 0.14.1: the newest release that builds with the toolchain here (0.17 needs rustc 1.96).
S3S_FS_VERSION=0.14.1

s3s_bin() {
    if command -v s3s-fs >/dev/null 2>&1; then
        command -v s3s-fs
    elif [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]]; then
        echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
    else
        return 1
    fi
}

install() {
    if bin=$(s3s_bin); then
        echo "s3s-fs already installed: $bin" >&2
        return 0
    fi
    cargo install "s3s-fs@$S3S_FS_VERSION" --locked --features binary
}

start() {
    local dir=$1 bin port
    bin=$(s3s_bin) || { echo "s3s-fs not found: run '$0 install' first" >&2; exit 1; }
    mkdir -p "$dir/s3/payerx-test"
    dir=$(cd "$dir" && pwd)
    if [[ -f "$dir/s3s.pid" ]] && kill -0 "$(cat "$dir/s3s.pid")" 2>/dev/null; then
        echo "s3s-fs already running from $dir (pid $(cat "$dir/s3s.pid"))" >&2
        exit 1
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    nohup "$bin" --host 127.0.0.1 --port "$port" --access-key payerx --secret-key payerx-secret \
        "$dir/s3" >"$dir/s3s.log" 2>&1 </dev/null &
    echo $! >"$dir/s3s.pid"

    local deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        if ! kill -0 "$(cat "$dir/s3s.pid")" 2>/dev/null || ((SECONDS >= deadline)); then
            echo "s3s-fs did not come up on 127.0.0.1:$port; last lines of $dir/s3s.log:" >&2
            tail -n 30 "$dir/s3s.log" >&2 || true
            stop "$dir"
            exit 1
        fi
        sleep 0.2
    done
    echo "http://127.0.0.1:$port"
}

stop() {
    local dir=$1 pid
    [[ -f "$dir/s3s.pid" ]] || return 0
    pid=$(cat "$dir/s3s.pid")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/s3s.pid"
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
