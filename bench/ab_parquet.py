#!/usr/bin/env python3
"""Interleaved A/B of SimpleQuery on Parquet, encrypted and plaintext, for two or more binaries.

Usage: bench/ab_parquet.py --data DIR [--runs 11] BIN [BIN ...]
DIR is a directory that bench/formats.py made (`--dir DIR`): people.pq.enc (Parquet with
modular encryption), people.parquet.d (the same rows as plaintext Parquet) and the embedded KMS
in DIR/home. Every repetition runs each binary on both inputs in turn, so machine noise spreads
over all of them; prints each binary's median wall time per input and its ratio to the first
binary's.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True)
parser.add_argument("--runs", type=int, default=11)
parser.add_argument("binaries", nargs="+")
args = parser.parse_args()
env = dict(os.environ, PPML_HOME=os.path.join(args.data, "home"))
inputs = {
    "encrypted Parquet": (os.path.join(args.data, "people.pq.enc"), []),
    "plaintext Parquet": (os.path.join(args.data, "people.parquet.d"), ["--plaintext"]),
}
for path, _ in inputs.values():
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: make DIR with bench/formats.py --dir DIR")
times = {(b, name): [] for b in args.binaries for name in inputs}
with tempfile.TemporaryDirectory() as scratch:
    out = os.path.join(scratch, "out")
    for _ in range(args.runs):
        for binary in args.binaries:
            for name, (path, extra) in inputs.items():
                shutil.rmtree(out, ignore_errors=True)
                cmd = [binary, "-q", "simple-query", "--no-preview", "--input", path,
                       "--output", out] + extra
                start = time.monotonic()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                elapsed = time.monotonic() - start
                if done.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
                times[(binary, name)].append(elapsed)
for name in inputs:
    first = statistics.median(times[(args.binaries[0], name)])
    cells = []
    for binary in args.binaries:
        median = statistics.median(times[(binary, name)])
        cells.append(f"{binary} {median * 1000:.0f} ms ({median / first:.3f})")
    print(f"{name}: " + ", ".join(cells) + f" (median of {args.runs})")
