#!/usr/bin/env bash
# Load test of `ppml kms serve` on this machine (client and server together), audit log on:
# signed GenerateDataKeyWithoutPlaintext + Decrypt from N connections, over TLS and plain HTTP.
# Usage: bench/kms_bench.sh [PPML_BINARY] [SECONDS]
set -euo pipefail
ppml="${1:-${CARGO_TARGET_DIR:-target}/release/ppml}"
seconds="${2:-10}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

start_server() { # name, extra flags...
    local name="$1"; shift
    PPML_HOME="$work/home" "$ppml" kms serve --listen 127.0.0.1:0 --data-dir "$work/$name" "$@" \
        > "$work/$name.out" 2> "$work/$name.err" &
    for _ in $(seq 100); do
        grep -q listening "$work/$name.out" 2>/dev/null && break
        sleep 0.1
    done
}

start_server tls
start_server http --insecure-http
tls_url=$(grep -o 'https://[0-9.:]*' "$work/tls.out" | head -1)
http_url=$(grep -o 'http://[0-9.:]*' "$work/http.out" | head -1)
fingerprint=$(awk '/fingerprint:/ {print $3}' "$work/tls.out")

echo "| transport | connections | requests/s | p50 ms | p99 ms | failed |"
echo "|---|---|---|---|---|---|"
for transport in tls http; do
    for connections in 8 32 64; do
        if [ "$transport" = tls ]; then
            flags=(--kms-url "$tls_url" --kms-fingerprint "$fingerprint")
        else
            flags=(--kms-url "$http_url")
        fi
        out=$(PPML_HOME="$work/client" "$ppml" "${flags[@]}" kms bench --enroll \
            --connections "$connections" --seconds "$seconds" 2>/dev/null)
        rps=$(awk '/throughput:/ {print $2}' <<<"$out")
        p50=$(awk '/latency ms:/ {print $4}' <<<"$out")
        p99=$(awk '/latency ms:/ {print $8}' <<<"$out")
        failed=$(awk '/requests:/ {print $4}' <<<"$out")
        echo "| $transport | $connections | $rps | $p50 | $p99 | $failed |"
    done
done
for name in tls http; do
    PPML_HOME="$work/home" "$ppml" kms audit verify --data-dir "$work/$name" | head -1 \
        | sed "s|$work/||"
done
