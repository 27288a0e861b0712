#!/usr/bin/env bash
# KMS server load for two ppml binaries at once: each binary's `kms serve` (TLS, audit log on)
# loaded by its own `kms bench`, rounds interleaved so that a noisy machine slows both alike.
# Usage: bench/kms_bench_ab.sh OLD_PPML NEW_PPML [CONNECTIONS] [SECONDS] [ROUNDS]
set -euo pipefail
a="$1"; b="$2"; connections="${3:-64}"; seconds="${4:-8}"; rounds="${5:-4}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

start_server() { # name, binary
    PPML_HOME="$work/home-$1" "$2" kms serve --listen 127.0.0.1:0 --data-dir "$work/$1" \
        > "$work/$1.out" 2> "$work/$1.err" &
    for _ in $(seq 100); do
        grep -q listening "$work/$1.out" 2>/dev/null && break
        sleep 0.1
    done
}
start_server A "$a"
start_server B "$b"

echo "| round | binary | requests/s | p50 ms | p99 ms | failed |"
echo "|---|---|---:|---:|---:|---:|"
for round in $(seq "$rounds"); do
    for name in A B; do
        binary="$a"; [ "$name" = B ] && binary="$b"
        url=$(grep -o 'https://[0-9.:]*' "$work/$name.out" | head -1)
        fingerprint=$(awk '/fingerprint:/ {print $3}' "$work/$name.out")
        out=$(PPML_HOME="$work/client-$name" "$binary" --kms-url "$url" \
            --kms-fingerprint "$fingerprint" kms bench --enroll \
            --connections "$connections" --seconds "$seconds" 2>/dev/null)
        rps=$(awk '/throughput:/ {print $2}' <<<"$out")
        p50=$(awk '/latency ms:/ {print $4}' <<<"$out")
        p99=$(awk '/latency ms:/ {print $8}' <<<"$out")
        failed=$(awk '/requests:/ {print $4}' <<<"$out")
        echo "| $round | $name | $rps | $p50 | $p99 | $failed |"
    done
done
echo
echo "A = $a, B = $b; $connections connections, $seconds s per run"
