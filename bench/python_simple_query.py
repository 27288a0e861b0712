#!/usr/bin/env python3
"""SimpleQuery through the Python package against the same query through the `ppml` command,
side by side: rounds of one CLI run and one Python run, alternating, each a whole process
timed from start to exit (wall and peak RSS). The Python program does what `ppml
simple-query` does: count(name), a 20-row preview of name, age + 1, and the Developer rows
aged 20 to 40 written as a new encrypted dataset.

Usage: bench/python_simple_query.py [--rows 10000000] [--rounds 7] [--ppml PATH]
Needs the Python package importable (PYTHONPATH=python after scripts/python-module).
Works in bench/out/python (git-ignored).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PYTHON_SIMPLE_QUERY = """
import sys
import ppml

dataset, output = sys.argv[1], sys.argv[2]
ctx = ppml.Context()
ctx.register("people", dataset)
ctx.sql("SELECT count(name) AS count FROM people").show()
ctx.sql("SELECT name, age + 1 FROM people").show(20)
developers = ctx.sql(
    "SELECT * FROM people WHERE job = 'Developer' AND age BETWEEN 20 AND 40"
)
print(ctx.write(developers, output))
"""


def timed(cmd, env):
    """Runs cmd to completion; returns (wall seconds, peak RSS MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err.decode()}")
    return wall, usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ppml", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "ppml"))
    args = ap.parse_args()
    work = os.path.join(HERE, "out", "python")
    os.makedirs(work, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env["PPML_HOME"] = os.path.join(work, "home")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "python")] + [p for p in [env.get("PYTHONPATH")] if p])
    people = os.path.join(work, f"people-{args.rows}.csv")
    dataset = os.path.join(work, f"people-{args.rows}.enc")
    if not os.path.exists(dataset):
        subprocess.run([args.ppml, "generate", "people", "--rows", str(args.rows), "--out", people,
                        "--overwrite"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([args.ppml, "encrypt", "--in", people, "--out", dataset], env=env,
                       check=True, stdout=subprocess.DEVNULL)
    script = os.path.join(work, "simple_query.py")
    with open(script, "w") as f:
        f.write(PYTHON_SIMPLE_QUERY)
    runs = {
        "CLI": lambda out: [args.ppml, "simple-query", "--input", dataset, "--output", out],
        "Python": lambda out: [sys.executable, script, dataset, out],
    }
    walls, rss = {}, {}
    for _ in range(args.rounds):
        for name, cmd in runs.items():
            out = os.path.join(work, f"out-{name}")
            shutil.rmtree(out, ignore_errors=True)
            wall, peak = timed(cmd(out), env)
            walls.setdefault(name, []).append(wall)
            rss.setdefault(name, []).append(peak)
            shutil.rmtree(out, ignore_errors=True)
    cli, py = statistics.median(walls["CLI"]), statistics.median(walls["Python"])
    print(f"SimpleQuery, {args.rows:,} encrypted rows, {args.rounds} rounds (medians)\n")
    print("| run | wall (s) | peak RSS (MiB) |")
    print("|---|---:|---:|")
    print(f"| `ppml simple-query` | {cli:.3f} | {max(rss['CLI']):.0f} |")
    print(f"| Python (`ppml.Context`) | {py:.3f} | {max(rss['Python']):.0f} |")
    print(f"\nPython / CLI: {py / cli:.3f}x")


if __name__ == "__main__":
    main()
