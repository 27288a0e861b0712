#!/usr/bin/env python3
"""ppml foundation benchmark: SimpleQuery on encrypted vs plaintext data, encrypt/decrypt
throughput and peak RSS, measured side by side in one run.

Usage: bench/bench.py [--rows 10000000] [--runs 3] [--ppml PATH]
Prints a Markdown report (paste into BENCHMARKS.md). Works in bench/out/ (git-ignored).
"""
import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(cmd, env, cpu=None):
    """Runs cmd; returns (wall seconds, peak RSS MiB, stdout)."""
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu)] + cmd
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err.decode()}")
    return wall, usage.ru_maxrss / 1024.0, out.decode()


def median_run(cmd, env, runs, before=None, cpu=None):
    walls, rss, out = [], [], ""
    for _ in range(runs):
        if before:
            before()
        wall, peak, out = run(cmd, env, cpu)
        walls.append(wall)
        rss.append(peak)
    return statistics.median(walls), max(rss), out


def digest(path):
    """SHA-256 of a file, streamed (this process must stay small: children inherit its peak
    RSS in their rusage)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rm(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ppml", default=None, help="ppml binary (default: build it)")
    ap.add_argument("--partitions", type=int, default=2)
    args = ap.parse_args()

    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ppml = args.ppml
    if ppml is None:
        subprocess.run(["cargo", "build", "--release", "-p", "ppml-cli"], cwd=ROOT, check=True)
        ppml = os.path.join(target, "release", "ppml")
    work = os.path.join(HERE, "out")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PPML_HOME=os.path.join(work, "home"))
    for k in ("PPML_APPID", "PPML_APIKEY", "PPML_PRIMARY_KEY", "PPML_CONFIG"):
        env.pop(k, None)
    env["RUST_LOG"] = "error"

    csv = os.path.join(work, "people.csv")
    enc = os.path.join(work, "people.enc")
    dec = os.path.join(work, "people.dec.csv")
    out_enc = os.path.join(work, "dev.enc")
    out_plain = os.path.join(work, "dev.plain")
    rows = args.rows
    results = []

    rm(csv)
    wall, peak, out = run([ppml, "-q", "generate", "people", "--rows", str(rows), "--out", csv, "--seed", "1"], env)
    size = os.path.getsize(csv)
    results.append(("generate people", wall, peak, f"{rows / wall / 1e6:.1f} M rows/s"))

    # Warm the page cache and the KMS, then measure encrypt and decrypt pinned to one core.
    # "Page cache" runs pass --no-sync: the target is file to file in the page cache, and an
    # fsync measures the disk. The default (durable) runs follow. Every figure includes the
    # process start-up, which is also measured alone (a one-row file) so that the throughput
    # without it can be given too.
    subprocess.run(["cat", csv], stdout=subprocess.DEVNULL, check=True)
    tiny = os.path.join(work, "tiny.csv")
    with open(tiny, "w") as f:
        f.write("name,age,job\nann,30,Developer\n")
    startup = {}
    startup["encrypt"], _, _ = median_run(
        [ppml, "-q", "--no-sync", "encrypt", "--in", tiny, "--out", tiny + ".enc"],
        env, args.runs, before=lambda: rm(tiny + ".enc"), cpu=0)
    startup["decrypt"], _, _ = median_run(
        [ppml, "-q", "--no-sync", "decrypt", "--in", tiny + ".enc", "--out", tiny + ".dec"],
        env, args.runs, before=lambda: rm(tiny + ".dec"), cpu=0)
    rm(tiny + ".enc")
    rm(tiny + ".dec")
    rm(tiny)

    def rate(wall, command):
        net = wall - startup[command]
        return f"{size / wall / 1e9:.2f} GB/s ({size / net / 1e9:.2f} GB/s without start-up)"

    partitions = ["--partitions", str(args.partitions)]
    wall, peak, _ = median_run(
        [ppml, "-q", "--no-sync", "encrypt", "--in", csv, "--out", enc] + partitions,
        env, args.runs, before=lambda: rm(enc), cpu=0)
    enc_gbs = size / wall / 1e9
    results.append((f"encrypt, page cache ({args.partitions} parts, 1 core)", wall, peak, rate(wall, "encrypt")))
    wall, peak, _ = median_run(
        [ppml, "-q", "--no-sync", "encrypt", "--no-row-check", "--in", csv, "--out", enc + ".nrc"] + partitions,
        env, args.runs, before=lambda: rm(enc + ".nrc"), cpu=0)
    results.append(("encrypt --no-row-check, page cache", wall, peak, rate(wall, "encrypt")))
    rm(enc + ".nrc")
    wall, peak, _ = median_run(
        [ppml, "-q", "--no-sync", "decrypt", "--in", enc, "--out", dec], env, args.runs,
        before=lambda: rm(dec), cpu=0)
    dec_gbs = size / wall / 1e9
    results.append(("decrypt, page cache (1 core)", wall, peak, rate(wall, "decrypt")))
    same = digest(csv) == digest(dec)
    wall, peak, _ = median_run(
        [ppml, "-q", "encrypt", "--in", csv, "--out", enc + ".sync"] + partitions,
        env, args.runs, before=lambda: rm(enc + ".sync"), cpu=0)
    results.append(("encrypt, durable (fsync, the default)", wall, peak, f"{size / wall / 1e9:.2f} GB/s"))
    rm(enc + ".sync")
    wall, peak, _ = median_run(
        [ppml, "-q", "decrypt", "--in", enc, "--out", dec], env, args.runs,
        before=lambda: rm(dec), cpu=0)
    results.append(("decrypt, durable (fsync, the default)", wall, peak, f"{size / wall / 1e9:.2f} GB/s"))
    rm(dec)
    wall, peak, _ = median_run(
        ["sh", "-c", f"{ppml} -q decrypt --in {enc} --out - > /dev/null"], env, args.runs, cpu=0)
    results.append(("decrypt to /dev/null (1 core)", wall, peak, f"{size / wall / 1e9:.2f} GB/s"))
    results.append(("start-up alone: encrypt, decrypt of a one-row file",
                    startup["encrypt"], 0, f"decrypt {startup['decrypt'] * 1e3:.1f} ms"))
    wall, peak, _ = median_run(["cp", "--reflink=never", csv, dec], env, args.runs,
                               before=lambda: rm(dec), cpu=0)
    results.append(("reference: cp (copies inside the kernel)", wall, peak, f"{size / wall / 1e9:.2f} GB/s"))
    rm(dec)
    wall, peak, _ = median_run(["dd", f"if={csv}", f"of={dec}", "bs=256k", "status=none"], env,
                               args.runs, before=lambda: rm(dec), cpu=0)
    results.append(("reference: dd bs=256k (read + write, no crypto)", wall, peak, f"{size / wall / 1e9:.2f} GB/s"))
    rm(dec)

    # SimpleQuery: encrypted vs plaintext, same code path, alternating runs.
    enc_walls, plain_walls, enc_rss, plain_rss = [], [], [], []
    enc_out = plain_out = ""
    for _ in range(args.runs):
        rm(out_plain)
        w, p, plain_out = run([ppml, "simple-query", "--plaintext", "--input", csv, "--output", out_plain], env)
        plain_walls.append(w)
        plain_rss.append(p)
        rm(out_enc)
        w, p, enc_out = run([ppml, "simple-query", "--input", enc, "--output", out_enc], env)
        enc_walls.append(w)
        enc_rss.append(p)
    q_enc, q_plain = statistics.median(enc_walls), statistics.median(plain_walls)
    count_line = [l for l in enc_out.splitlines() if l.startswith("wrote")][0]
    plain_count_line = [l for l in plain_out.splitlines() if l.startswith("wrote")][0]
    assert count_line == plain_count_line, (count_line, plain_count_line)
    results.append(("simple-query, plaintext CSV (DataFusion)", q_plain, max(plain_rss), "baseline"))
    results.append(("simple-query, encrypted (ppml)", q_enc, max(enc_rss), f"{q_enc / q_plain:.2f}x plaintext"))

    print(f"### {rows:,} rows ({size / 1e6:.0f} MB CSV), {os.cpu_count()} cores, median of {args.runs}")
    print()
    print(f"Command: `bench/bench.py --rows {rows} --runs {args.runs}`; output check: {count_line}; "
          f"decrypt round trip identical: {same}; encrypt {enc_gbs:.2f} GB/s, decrypt {dec_gbs:.2f} GB/s "
          f"(page cache, 1 core, start-up included)")
    print()
    print("| step | wall (s) | peak RSS (MiB) | figure |")
    print("|---|---:|---:|---|")
    for name, wall, peak, fig in results:
        peak_text = f"{peak:.0f}" if peak else "-"
        print(f"| {name} | {wall:.3f} | {peak_text} | {fig} |")
    print()
    for line in enc_out.splitlines():
        if line.endswith(" s") and "time" in line:
            print(f"- encrypted {line}")
    rm(out_enc)
    rm(out_plain)


if __name__ == "__main__":
    main()
