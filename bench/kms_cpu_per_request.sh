#!/usr/bin/env bash
# One run of the KMS load test with a fresh `ppml kms serve` (TLS, audit log on), reporting
# throughput and the server's and the client's CPU time per request (from /proc/PID/stat and
# `time`). Alternate two binaries over several runs and compare medians.
# With KMS_IN_TEE=1 the server runs in the simulated TEE, starts sealed and is unsealed with
# `ppml kms unseal` (a binary without that command gets a root key file instead), and the
# client verifies it with a KMS policy (--kms-policy) before it starts, as clients of an
# attested KMS do.
# Usage: [KMS_IN_TEE=1] bench/kms_cpu_per_request.sh PPML_BINARY [CONNECTIONS] [SECONDS]
set -euo pipefail
bin="$1"; connections="${2:-64}"; seconds="${3:-8}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
server_tee=(); client_policy=()
if [ "${KMS_IN_TEE:-0}" = 1 ]; then
    platform=$(PPML_HOME="$work/h" "$bin" --sim-platform-key "$work/kms.pk8" attest sim-platform)
    PPML_HOME="$work/h" "$bin" attest policy new --tee sim --this-binary \
        --sim-platform "$platform" > "$work/kms-policy.json"
    server_tee=(--tee sim --sim-platform-key "$work/kms.pk8")
    client_policy=(--kms-policy "$work/kms-policy.json")
fi
PPML_HOME="$work/h" "$bin" kms serve --listen 127.0.0.1:0 --data-dir "$work/d" \
    "${server_tee[@]}" > "$work/out" 2> "$work/err" &
pid=$!
for _ in $(seq 100); do grep -q listening "$work/out" 2>/dev/null && break; sleep 0.1; done
url=$(grep -o 'https://[0-9.:]*' "$work/out" | head -1)
fingerprint=$(awk '/fingerprint:/ {print $3}' "$work/out")
if [ "${KMS_IN_TEE:-0}" = 1 ] && grep -q "is sealed" "$work/out"; then
    PPML_HOME="$work/h" "$bin" --kms-url "$url" --kms-fingerprint "$fingerprint" \
        "${client_policy[@]}" kms unseal --root-key-file "$work/owner-root.key" --create \
        > /dev/null
fi
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
before=$(ticks)
/usr/bin/time -f "client_cpu %U %S" -o "$work/time" env PPML_HOME="$work/c" "$bin" \
    --kms-url "$url" --kms-fingerprint "$fingerprint" "${client_policy[@]}" kms bench --enroll \
    --connections "$connections" --seconds "$seconds" > "$work/bench" 2> /dev/null
after=$(ticks)
requests=$(awk '/requests:/ {print $2}' "$work/bench")
rps=$(awk '/throughput:/ {print $2}' "$work/bench")
client=$(awk '/client_cpu/ {print $2 + $3}' "$work/time")
python3 - "$bin" "$rps" "$requests" "$before" "$after" "$hz" "$client" <<'PY'
import sys
binary, rps, requests, before, after, hz, client = sys.argv[1:]
requests = int(requests)
server_us = (float(after) - float(before)) / float(hz) * 1e6 / requests
client_us = float(client) * 1e6 / requests
print(f"{binary} rps={rps} requests={requests} server_us_per_request={server_us:.1f} "
      f"client_us_per_request={client_us:.1f}")
PY
