#!/usr/bin/env python3
"""What a job receipt costs SimpleQuery, measured in the same runs as SimpleQuery itself.

Every SimpleQuery writes a receipt (docs/receipts.md); the engine logs, at debug level under
`ppml::receipt`, the time it spent making it (runtime record, canonical JSON, signature) and
writing and syncing its file. Each round runs:

- `ppml quickstart --rows N`: an attested SimpleQuery in the simulated TEE against a KMS
  server, whose receipt is signed; its `simple-query` step time is the comparison;
- `ppml simple-query --no-preview` on an encrypted dataset of N rows with the embedded KMS
  (unattested: the receipt is unsigned), timed as a whole process.

It prints, for both, the medians of the receipt's cost and of the SimpleQuery time, the
receipt's share, and SimpleQuery's own run-to-run spread (median absolute deviation), the
noise the receipt would have to exceed to be measurable.

Usage: bench/receipt_overhead.py [--rows 10000000] [--rounds 5] [--ppml PATH]
Works in bench/out/receipt (git-ignored).
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RECEIPT = re.compile(r"job receipt made and written\s+micros=(\d+)")


def receipt_micros(text):
    found = RECEIPT.findall(ANSI.sub("", text))
    if len(found) != 1:
        raise SystemExit(f"expected one receipt line, found {len(found)}:\n{text[-2000:]}")
    return int(found[0])


def run(cmd, env):
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{cmd} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stdout + done.stderr


def spread(values):
    median = statistics.median(values)
    return statistics.median(abs(v - median) for v in values)


def report(name, receipts_us, times_s):
    receipt = statistics.median(receipts_us) / 1e6
    total = statistics.median(times_s)
    noise = spread(times_s)
    print(
        f"{name}: receipt {receipt * 1e3:.3f} ms (median of {len(receipts_us)}), "
        f"SimpleQuery {total:.3f} s (median), receipt share {100 * receipt / total:.3f} %, "
        f"SimpleQuery run-to-run spread {noise * 1e3:.1f} ms "
        f"({100 * noise / total:.2f} %), {noise / receipt:.0f}x the receipt"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--ppml",
        default=os.path.join(
            os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "ppml"
        ),
    )
    args = parser.parse_args()
    work = os.path.join(HERE, "out", "receipt")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = dict(os.environ, PPML_HOME=os.path.join(work, "home"), RUST_LOG="ppml::receipt=debug")
    for name in ("PPML_KMS_URL", "PPML_APPID", "PPML_APIKEY", "PPML_PRIMARY_KEY", "PPML_CONFIG"):
        env.pop(name, None)

    csv = os.path.join(work, "people.csv")
    enc = os.path.join(work, "people.enc")
    run([args.ppml, "-q", "generate", "people", "--rows", str(args.rows), "--out", csv,
         "--seed", "1"], env)
    run([args.ppml, "-q", "encrypt", "--in", csv, "--out", enc, "--partitions", "2"], env)

    attested_receipts, attested_times = [], []
    local_receipts, local_times = [], []
    for i in range(args.rounds):
        qs = os.path.join(work, f"qs-{i}")
        _, text = run([args.ppml, "quickstart", "--rows", str(args.rows), "--workdir", qs,
                       "--home", os.path.join(work, f"qs-home-{i}")], env)
        attested_receipts.append(receipt_micros(text))
        step = re.search(r"simple-query\s+([0-9.]+) s", ANSI.sub("", text))
        attested_times.append(float(step.group(1)))
        shutil.rmtree(qs)

        out = os.path.join(work, "developers.enc")
        shutil.rmtree(out, ignore_errors=True)
        wall, text = run([args.ppml, "simple-query", "--no-preview", "--input", enc,
                          "--output", out], env)
        local_receipts.append(receipt_micros(text))
        local_times.append(wall)

    print(f"{args.rows} rows, {args.rounds} rounds, {args.ppml}")
    report("attested (quickstart, sim TEE, signed receipt)", attested_receipts, attested_times)
    report("unattested (embedded KMS, whole process)", local_receipts, local_times)


if __name__ == "__main__":
    main()
