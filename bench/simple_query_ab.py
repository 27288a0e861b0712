#!/usr/bin/env python3
"""SimpleQuery, encrypted vs plaintext, for two ppml binaries at once: rounds of the four runs
(A plaintext, A encrypted, B plaintext, B encrypted) interleaved, so that a noisy machine
slows both binaries alike. Uses the files of bench/bench.py (bench/out: people.csv,
people.enc, home), which must exist.

Usage: bench/simple_query_ab.py --a OLD_PPML --b NEW_PPML [--rounds 15]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="the first ppml binary (e.g. before a change)")
    ap.add_argument("--b", required=True, help="the second ppml binary (e.g. after it)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    env = dict(os.environ, PPML_HOME=os.path.join(OUT, "home"))
    for k in ("PPML_APPID", "PPML_APIKEY", "PPML_PRIMARY_KEY", "PPML_CONFIG", "PPML_KMS_URL"):
        env.pop(k, None)
    inputs = {
        "plaintext": ["--plaintext", "--input", os.path.join(OUT, "people.csv")],
        "encrypted": ["--input", os.path.join(OUT, "people.enc")],
    }
    walls = {}
    for _ in range(args.rounds):
        for name, binary in (("A", args.a), ("B", args.b)):
            for mode, flags in inputs.items():
                out = os.path.join(OUT, f"ab-{name}-{mode}")
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                subprocess.run([binary, "simple-query", "--output", out] + flags, env=env,
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                walls.setdefault((name, mode), []).append(time.perf_counter() - start)
                shutil.rmtree(out, ignore_errors=True)
    print(f"| binary | plaintext (median s) | encrypted (median s) | encrypted / plaintext |")
    print("|---|---:|---:|---:|")
    for name, binary in (("A", args.a), ("B", args.b)):
        plain = statistics.median(walls[(name, "plaintext")])
        enc = statistics.median(walls[(name, "encrypted")])
        print(f"| {name}: `{binary}` | {plain:.3f} | {enc:.3f} | {enc / plain:.3f}x |")
    print(f"\n{args.rounds} rounds; each figure a median.")


if __name__ == "__main__":
    main()
