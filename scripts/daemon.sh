# Shared by the scripts that run a throwaway server for the integration tier (tansu.sh, s3.sh):
# a free port, waiting for it to listen, and a bounded stop. Source it; it defines functions only.

# A free TCP port on 127.0.0.1 (the kernel picks it; a tiny race until the server binds it).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_listening NAME PORT PIDFILE LOG: until 127.0.0.1:PORT accepts connections (30 s at most).
# If the process dies or time runs out, prints the log's tail, stops it and exits 1.
wait_listening() {
    local name=$1 port=$2 pidfile=$3 log=$4
    local deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null || ((SECONDS >= deadline)); then
            echo "$name did not come up on 127.0.0.1:$port; last lines of $log:" >&2
            tail -n 30 "$log" >&2 || true
            stop_pidfile "$pidfile"
            exit 1
        fi
        sleep 0.2
    done
}

# stop_pidfile PIDFILE: SIGTERM, a bounded wait for a clean exit (5 s), then SIGKILL.
stop_pidfile() {
    local pidfile=$1 pid
    [[ -f "$pidfile" ]] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}
