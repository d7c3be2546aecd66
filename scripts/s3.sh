#!/usr/bin/env bash
# A throwaway S3-compatible server (s3s-fs, a file-system backed S3 API) for the integration tests.
#   scripts/s3.sh install      build s3s-fs once (a few minutes on 2 cores), reused afterwards
#   scripts/s3.sh start DIR    start it on a free port with bucket payerx-test; prints its endpoint URL
#   scripts/s3.sh stop DIR     stop the server started in DIR
# Credentials: access key `payerx`, secret `payerx-secret` (export them as AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY for the client).
set -euo pipefail
# shellcheck source=daemon.sh
source "$(dirname "$0")/daemon.sh"

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
    port=$(free_port)
    nohup "$bin" --host 127.0.0.1 --port "$port" --access-key payerx --secret-key payerx-secret \
        "$dir/s3" >"$dir/s3s.log" 2>&1 </dev/null &
    echo $! >"$dir/s3s.pid"

    wait_listening s3s-fs "$port" "$dir/s3s.pid" "$dir/s3s.log"
    echo "http://127.0.0.1:$port"
}

stop() {
    stop_pidfile "$1/s3s.pid"
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
