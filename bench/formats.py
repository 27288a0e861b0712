#!/usr/bin/env python3
"""SimpleQuery on encrypted Parquet, plaintext Parquet and encrypted CSV, side by side.

  python3 bench/formats.py --ppml PATH [--rows 10000000] [--runs 5] [--dir bench/out/formats]
                           [--others]

Makes people.csv (`ppml generate people --seed 1`), encrypts it as CSV (`encrypt
--partitions 2`) and as Parquet with modular encryption (`encrypt --to parquet --partitions
2`), and decrypts the latter to plaintext Parquet files. Then runs, interleaved per
repetition, whole `ppml simple-query` processes: on the encrypted Parquet, on the plaintext
Parquet through DataFusion (`--plaintext`), and on the encrypted CSV. Prints the median wall
time and the peak RSS (GNU time's %M) of each, the ratios, and the time of the two encrypts.
Every run's output row count is checked against the generator's count of Developers aged 20..40.
With --others, DuckDB and Spark (bench/duckdb_simple_query.py, bench/spark_simple_query.py, as
in bench/compare.py; `pip install duckdb==1.4.4 pyspark==4.0.1`, Java 17) run SimpleQuery on
the same plaintext Parquet files in the same rotation.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time


def timed(cmd, env):
    start = time.monotonic()
    out = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, env=env, capture_output=True,
                         text=True)
    wall = time.monotonic() - start
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    rss_kib = int(out.stderr.strip().splitlines()[-1])
    return wall, rss_kib / 1024, out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ppml", required=True)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="bench/out/formats")
    ap.add_argument("--others", action="store_true", help="also DuckDB and Spark")
    args = ap.parse_args()
    ppml = os.path.abspath(args.ppml)
    work = os.path.abspath(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = dict(os.environ, PPML_HOME=os.path.join(work, "home"))
    for var in ("PPML_KMS_URL", "PPML_CONFIG"):
        env.pop(var, None)
    p = lambda *a: [ppml, *a]
    csv = os.path.join(work, "people.csv")
    generated = subprocess.run(p("generate", "people", "--rows", str(args.rows), "--out", csv,
                                 "--seed", "1"), env=env, capture_output=True, text=True,
                               check=True).stdout
    developers = int(re.search(r"Developers aged 20..=40: (\d+)", generated).group(1))
    enc_csv, enc_pq, plain_pq = (os.path.join(work, n) for n in
                                 ("people.enc", "people.pq.enc", "people.parquet.d"))
    encrypt_csv = timed(p("encrypt", "--in", csv, "--out", enc_csv, "--partitions", "2"), env)
    encrypt_pq = timed(p("encrypt", "--in", csv, "--out", enc_pq, "--to", "parquet",
                         "--partitions", "2"), env)
    subprocess.run(p("decrypt", "--in", enc_pq, "--out-dir", plain_pq), env=env, check=True,
                   capture_output=True)
    here = os.path.dirname(os.path.abspath(__file__))
    cases = {
        "encrypted Parquet (ppml)": p("simple-query", "--input", enc_pq),
        "plaintext Parquet (DataFusion)": p("simple-query", "--plaintext", "--input", plain_pq),
        "encrypted CSV (ppml)": p("simple-query", "--input", enc_csv),
    }
    if args.others:
        for engine in ("duckdb", "spark"):
            script = os.path.join(here, f"{engine}_simple_query.py")
            cases[f"plaintext Parquet ({engine})"] = [sys.executable, script, plain_pq]
    results = {name: [] for name in cases}
    for run in range(args.runs):
        for i, (name, cmd) in enumerate(cases.items()):
            out = os.path.join(work, f"out-{i}")
            shutil.rmtree(out, ignore_errors=True)
            if cmd[0] == ppml:
                cmd = cmd + ["--output", out, "--no-preview"]
            else:
                cmd = cmd + [out, os.path.join(work, "scratch")]
            wall, rss, _ = timed(cmd, env)
            results[name].append((wall, rss))
            # The output's rows, outside the timed region.
            if cmd[0] != ppml or "--plaintext" in cmd:
                files = ([os.path.join(out, f) for f in os.listdir(out)
                          if not f.startswith(("_", "."))] if os.path.isdir(out) else [out])
                rows = sum(max(0, sum(1 for _ in open(f)) - 1) for f in files)
            else:
                text = subprocess.run(p("decrypt", "--in", out, "--out", "-"), env=env,
                                      capture_output=True, text=True, check=True).stdout
                rows = max(0, text.count("\n") - 1)
            if rows != developers:
                sys.exit(f"{name}: {rows} rows, expected {developers}")
    base = statistics.median(w for w, _ in results["plaintext Parquet (DataFusion)"])
    print(f"{args.rows:,} rows, median of {args.runs}, whole process")
    print("| input | wall (s) | vs plaintext Parquet | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        # GNU time sees the Python process of Spark, not the JVM it starts (bench/compare.py
        # measures the whole process tree).
        rss = "n/a" if "spark" in name else f"{max(r for _, r in runs):.0f}"
        print(f"| {name} | {wall:.3f} | {wall / base:.2f}x | {rss} |")
    print(f"encrypt --partitions 2: CSV {encrypt_csv[0]:.2f} s, "
          f"--to parquet {encrypt_pq[0]:.2f} s ({args.rows / encrypt_pq[0] / 1e6:.1f} M rows/s, "
          f"peak RSS {encrypt_pq[1]:.0f} MiB)")


if __name__ == "__main__":
    main()
