#!/usr/bin/env python3
"""Interleaved A/B of SimpleQuery: encrypted vs plaintext, for one or more ppml binaries.

Usage: bench/ab_simple_query.py --data DIR --runs 7 BIN [BIN ...]
DIR holds people.csv and people.enc (with the embedded KMS in DIR/home), e.g. made by
`PPML_HOME=DIR/home ppml generate people --rows 10000000 --out DIR/people.csv --seed 1` and
`ppml encrypt --in DIR/people.csv --out DIR/people.enc --partitions 2`. Every repetition runs
each binary on the encrypted dataset and on the plaintext CSV (`--plaintext`), so machine noise
spreads over all of them; prints the medians and the encrypted/plaintext ratio per binary.
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
parser.add_argument("binaries", nargs="+")
args = parser.parse_args()
env = dict(os.environ, PPML_HOME=os.path.join(args.data, "home"))
times = {}
for _ in range(args.runs):
    for i, binary in enumerate(args.binaries):
        for mode in ("encrypted", "plaintext"):
            out = os.path.join(args.data, f"ab-out-{i}-{mode}")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [binary, "-q", "simple-query", "--no-preview", "--output", out]
            if mode == "encrypted":
                cmd += ["--input", os.path.join(args.data, "people.enc")]
            else:
                cmd += ["--plaintext", "--input", os.path.join(args.data, "people.csv")]
            start = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            times.setdefault((i, mode), []).append(time.perf_counter() - start)
            shutil.rmtree(out, ignore_errors=True)
for i, binary in enumerate(args.binaries):
    enc = statistics.median(times[(i, "encrypted")])
    plain = statistics.median(times[(i, "plaintext")])
    print(f"{binary}: encrypted {enc * 1000:.0f} ms, plaintext {plain * 1000:.0f} ms, "
          f"ratio {enc / plain:.3f} (median of {args.runs})")
