#!/usr/bin/env python3
"""SimpleQuery on a local ppml cluster (1 scheduler + N executors, separate processes on
loopback, TLS) in client and cluster mode against `ppml submit --mode local`, measured in
one run, interleaved. The exit status judges client mode (target: <= 1.5x local).

Usage: bench/cluster_simple_query.py [--rows 10000000] [--runs 3] [--executors 2]
                                     [--executor-cores 1] [--ppml PATH]
Prints a Markdown table (paste into BENCHMARKS.md). Works in bench/out/cluster (git-ignored).
Both modes read the same encrypted dataset with the embedded KMS (no TEE) and write an
encrypted result; the script checks that both results decrypt to the same rows.
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


def run(cmd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.decode()}")
    return wall, proc.stdout.decode()


def rm(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def rows_digest(ppml, env, dataset):
    """Order-independent digest of a decrypted dataset (header lines dropped)."""
    out = subprocess.run([ppml, "-q", "decrypt", "--in", dataset, "--out", "-"], env=env,
                         stdout=subprocess.PIPE, check=True).stdout
    lines = sorted(l for l in out.split(b"\n") if l and not l.startswith(b"name,"))
    h = hashlib.sha256()
    for line in lines:
        h.update(line + b"\n")
    return len(lines), h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--executors", type=int, default=2)
    ap.add_argument("--executor-cores", type=int, default=1)
    ap.add_argument("--partitions", type=int, default=4, help="part files of the input")
    ap.add_argument("--port", type=int, default=51050)
    ap.add_argument("--ppml", default=None, help="ppml binary (default: build it)")
    args = ap.parse_args()

    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ppml = args.ppml
    if ppml is None:
        subprocess.run(["cargo", "build", "--release", "-p", "ppml-cli"], cwd=ROOT, check=True)
        ppml = os.path.join(target, "release", "ppml")
    work = os.path.join(HERE, "out", "cluster")
    rm(work)
    os.makedirs(work)
    env = dict(os.environ, PPML_HOME=os.path.join(work, "home"), RUST_LOG="error")
    for k in ("PPML_APPID", "PPML_APIKEY", "PPML_PRIMARY_KEY", "PPML_CONFIG", "PPML_KMS_URL",
              "PPML_TEE", "PPML_MASTER"):
        env.pop(k, None)

    csv = os.path.join(work, "people.csv")
    enc = os.path.join(work, "people.enc")
    run([ppml, "-q", "generate", "people", "--rows", str(args.rows), "--seed", "1", "--out", csv], env)
    run([ppml, "-q", "encrypt", "--in", csv, "--out", enc, "--partitions", str(args.partitions)], env)
    rm(csv)

    cluster_dir = os.path.join(work, "cluster")
    run([ppml, "-q", "cluster", "up", "--dir", cluster_dir, "--executors", str(args.executors),
         "--executor-cores", str(args.executor_cores), "--port", str(args.port)], env)
    master = f"127.0.0.1:{args.port}"
    parallelism = args.executors * args.executor_cores
    modes = {
        "local": ["submit", "--mode", "local", "--driver-cores", str(parallelism)],
        "cluster": ["submit", "--mode", "client", "--master", master,
                    "--cluster-tls", os.path.join(cluster_dir, "tls"),
                    "--num-executors", str(args.executors),
                    "--executor-cores", str(args.executor_cores)],
        # The driver is a task on an executor: it holds one of the cluster's task slots.
        "cluster-mode": ["submit", "--mode", "cluster", "--master", master,
                         "--cluster-tls", os.path.join(cluster_dir, "tls"),
                         "--num-executors", str(args.executors),
                         "--executor-cores", str(args.executor_cores)],
    }
    times = {mode: [] for mode in modes}
    outputs = {}
    try:
        for _ in range(args.runs):
            for mode, prefix in modes.items():
                out = os.path.join(work, f"result-{mode}.enc")
                rm(out)
                wall, _ = run([ppml, "-q"] + prefix +
                              ["simple-query", "--no-preview", "--input", enc, "--output", out], env)
                times[mode].append(wall)
                outputs[mode] = out
        digests = {mode: rows_digest(ppml, env, out) for mode, out in outputs.items()}
    finally:
        subprocess.run([ppml, "-q", "cluster", "down", "--dir", cluster_dir], env=env)
    if len(set(digests.values())) != 1:
        sys.exit(f"results differ: {digests}")
    local = statistics.median(times["local"])
    cluster = statistics.median(times["cluster"])
    print(f"command: bench/cluster_simple_query.py --rows {args.rows} --runs {args.runs} "
          f"--executors {args.executors} --executor-cores {args.executor_cores}")
    print(f"result rows (all modes, identical): {digests['local'][0]}")
    print()
    print("| mode | median wall (s) | runs (s) | ratio vs local |")
    print("|---|---|---|---|")
    shape = f"{args.executors} executors x {args.executor_cores} core(s)"
    for mode, label in (("local", "`submit --mode local`"),
                        ("cluster", f"`submit --mode client`, {shape}"),
                        ("cluster-mode", f"`submit --mode cluster`, {shape} (one slot holds the driver)")):
        med = statistics.median(times[mode])
        runs = ", ".join(f"{t:.2f}" for t in times[mode])
        print(f"| {label} | {med:.2f} | {runs} | {med / local:.2f}x |")
    return 0 if cluster <= 1.5 * local else 1


if __name__ == "__main__":
    sys.exit(main())
