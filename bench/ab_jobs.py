#!/usr/bin/env python3
"""Interleaved A/B of whole ppml jobs for two or more binaries: encrypt, decrypt, a GROUP BY
query and a filter/sort query over the same encrypted dataset.

Usage: bench/ab_jobs.py --data DIR [--runs 7] [--cases encrypt,decrypt,group-by,sort-like] BIN [BIN ...]
DIR holds people.csv and people.enc with the embedded KMS in DIR/home, as for
bench/ab_simple_query.py. Every repetition runs every case with every binary in turn, so
machine noise spreads over all of them; prints each case's median wall time per binary and
its ratio to the first binary. Set PPML_NO_SYNC=1 to leave fsync (disk noise) out.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True)
parser.add_argument("--runs", type=int, default=7)
parser.add_argument("--cases", default="encrypt,decrypt,group-by,sort-like")
parser.add_argument("binaries", nargs="+")
args = parser.parse_args()
data = args.data
env = dict(os.environ, PPML_HOME=os.path.join(data, "home"))
table = f"people={data}/people.enc"
cases = {
    "encrypt": lambda b, out: [b, "-q", "encrypt", "--in", f"{data}/people.csv", "--out", out,
                               "--partitions", "2"],
    "decrypt": lambda b, out: [b, "-q", "decrypt", "--in", f"{data}/people.enc", "--out", out],
    "group-by": lambda b, out: [b, "-q", "query", "--table", table, "--output", out, "--sql",
                                "SELECT job, count(*) AS n, avg(age) AS a, max(name) AS m "
                                "FROM people GROUP BY job"],
    "sort-like": lambda b, out: [b, "-q", "query", "--table", table, "--output", out, "--sql",
                                 "SELECT name, age FROM people WHERE name LIKE '%9%' AND "
                                 "upper(job) = 'DEVELOPER' ORDER BY age DESC, name LIMIT 1000"],
}
chosen = args.cases.split(",")


def remove(path):
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        os.remove(path)


times = {}
for _ in range(args.runs):
    for case in chosen:
        for i, binary in enumerate(args.binaries):
            out = os.path.join(data, f"ab-{case}-{i}")
            remove(out)
            start = time.perf_counter()
            subprocess.run(cases[case](binary, out), env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.setdefault((case, i), []).append(time.perf_counter() - start)
            remove(out)
for case in chosen:
    first = statistics.median(times[(case, 0)])
    cells = []
    for i, binary in enumerate(args.binaries):
        median = statistics.median(times[(case, i)])
        cells.append(f"{binary} {median * 1000:.0f} ms ({median / first:.3f})")
    print(f"{case}: " + ", ".join(cells) + f" (median of {args.runs})")
