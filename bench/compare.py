#!/usr/bin/env python3
"""SimpleQuery side by side (issue 6): ppml on ENCRYPTED data vs DataFusion, Spark and DuckDB on
the PLAINTEXT people.csv, in one run, plus the scale curve of ppml's whole workflow.

    python3 bench/compare.py                          # 1M, 10M and 100M rows, 3 runs
    python3 bench/compare.py --rows 1000000,10000000 --runs 5
    python3 bench/compare.py --smoke --ppml PATH      # 100k rows, 1 run, no installs (CI)

It creates bench/out/venv with pinned pyspark and duckdb (once; reused after), builds ppml
unless --ppml is given, and works in bench/out/compare/ (git-ignored). For each row count it
generates people.csv, encrypts it, runs SimpleQuery in every engine, interleaved per repetition
(ppml, DataFusion, DuckDB, Spark, ppml, ...), checks after every run that each engine wrote the
same rows (row count and an order-independent content hash), and only then prints Markdown
tables: median whole-process wall time, ratio to ppml, query-only time, peak RSS; and the scale
table (generate, encrypt, simple-query, decrypt: wall time, time per million rows, peak RSS
against the 512 MiB budget). Exit status: 0 ok; 1 a result check failed (the engine that
differs is named) or an engine failed; 2 usage; 3 a ppml step went over the RSS budget.

How peak RSS is measured (see BENCHMARKS.md): every engine runs as a child of this script,
which makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so that processes that
outlive their parent (pyspark's JVM) are reparented to it and reaped with wait4 too. Two
figures are taken: (a) the largest ru_maxrss of the engine's process or any descendant (exact,
but per process; taken through GNU time, which forks the engine from a 2 MiB process, because
a child's ru_maxrss starts at the peak RSS of the address space it ran in before its exec, and
Python vforks from this script's ~20 MiB), and (b) the sum of the resident sets
(/proc/PID/statm) of the whole process tree, sampled every 50 ms (a child still sharing its
parent's memory between vfork and exec is not counted twice). The reported peak is max(a, b):
for one-process engines (ppml, DataFusion, DuckDB) that is (a); for Spark it is the python
driver plus the JVM, as a user's `ps` would add them up.
"""
import argparse
import ctypes
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
WORK = os.path.join(OUT, "compare")
VENV = os.path.join(OUT, "venv")
# pyspark 4.0 runs on Java 17 and 21 and Python 3.9+; duckdb 1.4 is the long-term-support line.
PINS = {"pyspark": "4.0.1", "duckdb": "1.4.4"}
ENGINES = ["ppml", "datafusion", "duckdb", "spark"]
LABELS = {
    "ppml": ("ppml (DataFusion + AES-GCM)", "encrypted"),
    "datafusion": ("DataFusion (ppml --plaintext)", "plaintext CSV"),
    "duckdb": ("DuckDB, 2 threads", "plaintext CSV"),
    "spark": ("Spark local[2] (pyspark)", "plaintext CSV"),
}
HEADER = b"name,age,job"
RSS_LIMIT_MIB = 512
SAMPLE_INTERVAL = 0.05
PAGE = os.sysconf("SC_PAGE_SIZE")


class CheckFailed(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Running and measuring a process tree


def become_subreaper():
    """Orphaned descendants (e.g. the JVM pyspark starts, if it outlives python) are reparented
    to this process, so that we can see and reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except OSError:
        return False


def descendants(root):
    """[(pid, parent pid)] of every descendant of root."""
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend((k, pid) for k in kids)
            stack.extend(kids)
    return found


def statm(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return f.read()
    except OSError:
        return ""


_LIBC = ctypes.CDLL(None, use_errno=True)
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)


def same_memory(pid, parent):
    """True while pid still runs in its parent's address space (a vfork/posix_spawn child
    before exec): its statm then repeats the parent's RSS, which must not be counted twice."""
    if _SYS_KCMP is not None:
        r = _LIBC.syscall(_SYS_KCMP, pid, parent, 1, 0, 0)  # KCMP_VM
        if r >= 0:
            return r == 0
    a = statm(pid)
    return bool(a) and a == statm(parent)


def tree_rss_bytes(root, exclude=()):
    total = 0
    for pid, parent in set(descendants(root)):
        if pid in exclude or same_memory(pid, parent):
            continue
        try:
            total += int(statm(pid).split()[1]) * PAGE
        except (ValueError, IndexError):
            pass
    return total


def gnu_time():
    """GNU time, if present: it forks (not vforks) the engine from a 2 MiB process and reports
    the engine's own ru_maxrss, free of this script's RSS (a child's ru_maxrss starts at the
    peak RSS of the address space it ran in before its exec, i.e. ours when Python vforks)."""
    path = "/usr/bin/time"
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True)
        return path if "GNU" in (r.stdout + r.stderr) else None
    except OSError:
        return None


GNU_TIME = gnu_time()


class TreeSampler(threading.Thread):
    """Peak of the summed RSS of all descendants of this process, sampled."""

    def __init__(self, exclude=()):
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.exclude = set(exclude)
        self.peak = 0
        self.samples = 0

    def run(self):
        me = os.getpid()
        while not self.done.is_set():
            self.peak = max(self.peak, tree_rss_bytes(me, self.exclude))
            self.samples += 1
            self.done.wait(SAMPLE_INTERVAL)


def measure(cmd, env, log_path, cwd=WORK):
    """Runs cmd with stdout and stderr to log_path(.out/.err). Returns a dict: wall (s, from
    start until the main process exits), peak_mib (see the module docstring), cpu (s, user+sys
    of everything reaped), linger (s a descendant outlived the main process), stdout."""
    sampler = TreeSampler()
    rss_file = log_path + ".maxrss"
    wrapped = [GNU_TIME, "-f", "%M", "-o", rss_file] + cmd if GNU_TIME else cmd
    with open(log_path + ".out", "wb") as out, open(log_path + ".err", "wb") as err:
        sampler.start()
        busy_before, ours_before = machine_cpu()
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        if GNU_TIME:
            sampler.exclude.add(proc.pid)  # the 2 MiB wrapper is not the engine's
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        maxrss = usage.ru_maxrss
        if GNU_TIME:
            try:
                with open(rss_file) as f:
                    maxrss = int(f.read().split()[-1])  # the engine's, in KiB
            except (OSError, ValueError, IndexError):
                pass  # e.g. the command could not be started: it fails below
        cpu = usage.ru_utime + usage.ru_stime
        # Reap whatever the engine left behind (reparented to us as the subreaper).
        deadline = time.perf_counter() + 120
        while True:
            try:
                pid, _, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                if time.perf_counter() > deadline:
                    for p, _ in descendants(os.getpid()):
                        try:
                            os.kill(p, signal.SIGKILL)
                        except OSError:
                            pass
                time.sleep(0.01)
                continue
            maxrss = max(maxrss, ru.ru_maxrss)
            cpu += ru.ru_utime + ru.ru_stime
        linger = time.perf_counter() - start - wall
        sampler.done.set()
        sampler.join()
        busy_after, ours_after = machine_cpu()
    # CPU that processes other than this run's took from the machine while it ran.
    others = max(0.0, (busy_after - busy_before) - (ours_after - ours_before))
    other_load = others / ((wall + linger) * (os.cpu_count() or 1))
    with open(log_path + ".out", "rb") as f:
        stdout = f.read().decode(errors="replace")
    if proc.returncode != 0:
        with open(log_path + ".err", "rb") as f:
            tail = f.read()[-3000:].decode(errors="replace")
        raise CheckFailed(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {
        "wall": wall,
        "peak_mib": max(maxrss / 1024.0, sampler.peak / 2**20),
        "ru_maxrss_mib": maxrss / 1024.0,
        "tree_sampled_mib": sampler.peak / 2**20,
        "samples": sampler.samples,
        "cpu": cpu,
        "linger": linger,
        "other_load": other_load,
        "stdout": stdout,
    }


# ---------------------------------------------------------------------------------------------
# Result normalisation and the order-independent content hash


def data_files(path):
    if os.path.isfile(path):
        return [path]
    # Spark: part-*.csv plus _SUCCESS and hidden .crc files; ppml --plaintext: part-*.csv.
    return sorted(
        os.path.join(path, n)
        for n in os.listdir(path)
        if not n.startswith(("_", ".")) and os.path.isfile(os.path.join(path, n))
    )


def content_digest(path):
    """(data rows, hash) of a CSV result: one file, or a directory of part files each starting
    with the header `name,age,job` (an empty part file is allowed). The hash is the sum of the
    SHA-256 of every data line (line ending removed) mod 2^256: independent of row order and of
    how rows are split into files, but sensitive to any changed, missing or duplicated row.
    Streams: this process stays small (its RSS would otherwise leak into children's ru_maxrss)."""
    rows, acc = 0, 0
    sha, from_bytes = hashlib.sha256, int.from_bytes
    files = data_files(path)
    if not files:
        raise CheckFailed(f"{path}: no result files")
    for name in files:
        with open(name, "rb") as f:
            first = f.readline()
            if not first:
                continue
            if first.rstrip(b"\r\n") != HEADER:
                raise CheckFailed(f"{name}: first line {first[:60]!r} is not the header {HEADER!r}")
            for line in f:
                acc += from_bytes(sha(line.rstrip(b"\r\n")).digest(), "big")
                rows += 1
            acc %= 1 << 256
    return rows, acc.to_bytes(32, "big").hex()


def self_test():
    """Checks that content_digest sees what it must and ignores what it may."""
    with tempfile.TemporaryDirectory() as d:
        def write(name, text):
            p = os.path.join(d, name)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w", newline="") as f:
                f.write(text)
            return p

        h = "name,age,job\n"
        one = write("one.csv", h + "ann,20,Developer\nbob,40,Developer\nbob,40,Developer\n")
        write("parts/part-0.csv", h + "bob,40,Developer\n")
        write("parts/part-1.csv", h + "bob,40,Developer\r\nann,20,Developer")
        write("parts/part-2.csv", "")
        write("parts/_SUCCESS", "")
        write("parts/.part-0.csv.crc", "junk")
        ref = content_digest(one)
        assert ref[0] == 3, ref
        assert content_digest(os.path.join(d, "parts")) == ref, "order/split/CRLF must not matter"
        changed = write("changed.csv", h + "ann,21,Developer\nbob,40,Developer\nbob,40,Developer\n")
        dropped = write("dropped.csv", h + "ann,20,Developer\nbob,40,Developer\n")
        dup = write("dup.csv", h + "ann,20,Developer\nann,20,Developer\nbob,40,Developer\n")
        assert content_digest(changed)[0] == 3 and content_digest(changed)[1] != ref[1]
        assert content_digest(dropped)[0] == 2 and content_digest(dropped)[1] != ref[1]
        assert content_digest(dup)[0] == 3 and content_digest(dup)[1] != ref[1]
        for bad in ("ann,20,Developer\n", "name,age\nann,20,Developer\n"):
            try:
                content_digest(write("bad.csv", bad))
            except CheckFailed:
                pass
            else:
                raise AssertionError(f"missing header not caught: {bad!r}")
        # The cross-engine verdict names the odd one out.
        good = {"rows": 3, "hash": ref[1], "count": 10}
        bad = {"rows": 3, "hash": content_digest(changed)[1], "count": 10}
        try:
            verdict({"ppml": good, "datafusion": good, "duckdb": good, "spark": bad}, 3, 10)
        except CheckFailed as e:
            assert "spark" in str(e) and "ppml:" not in str(e).split("\n")[0], e
        else:
            raise AssertionError("differing engine not caught")
        verdict({"ppml": good, "datafusion": good}, 3, 10)
    print("self-test passed: content hash is order/split independent, catches changed, missing "
          "and duplicated rows and missing headers; the verdict names the differing engine")


def verdict(results, expected_rows, expected_count, reference=None):
    """results: engine -> {rows, hash, count}. Raises CheckFailed naming every engine that
    differs from the expected row count (the generator's own count of matching rows), from
    count(name) = number of input rows, or from the reference hash (that of the first
    repetition), or else from the hash most engines agree on. Returns the hash they agree on."""
    hashes = [r["hash"] for r in results.values()]
    majority = reference or max(set(hashes), key=hashes.count)
    if not reference and len(set(hashes)) > 1 and hashes.count(majority) * 2 <= len(hashes):
        majority = None  # no majority: every engine is suspect
    wrong = []
    for engine, r in results.items():
        why = []
        if r["rows"] != expected_rows:
            why.append(f"{r['rows']} rows, expected {expected_rows}")
        if r["count"] != expected_count:
            why.append(f"count(name) {r['count']}, expected {expected_count}")
        if majority is None or r["hash"] != majority:
            why.append(f"content hash {r['hash'][:16]}")
        if why:
            wrong.append(f"{engine}: " + "; ".join(why))
    if wrong:
        names = ", ".join(w.split(":")[0] for w in wrong)
        table = "\n".join(f"  {e}: rows {r['rows']}, count(name) {r['count']}, hash {r['hash'][:16]}"
                          for e, r in results.items())
        raise CheckFailed(f"result check failed, differing: {names}\n" + "\n".join("  " + w for w in wrong)
                          + f"\nall results:\n{table}")
    return majority


# ---------------------------------------------------------------------------------------------
# Environment: ppml binary, venv with pinned pyspark and duckdb


def venv_versions(py):
    code = ("import importlib.metadata as m, json\n"
            "v = {}\n"
            f"for p in {list(PINS)!r}:\n"
            "    try: v[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(v))")
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, check=True, text=True).stdout
        return json.loads(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


def ensure_venv(install):
    """Returns {package: version} available in bench/out/venv, installing the pins if asked."""
    py = os.path.join(VENV, "bin", "python")
    have = venv_versions(py) if os.path.exists(py) else None
    if have is not None and all(have.get(p) == v for p, v in PINS.items()) or not install:
        return py, have or {}
    log(f"installing {', '.join(f'{p}=={v}' for p, v in PINS.items())} into {VENV} (once)")
    if have is None:  # no venv, or one whose python no longer runs
        subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    subprocess.run([py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
                   + [f"{p}=={v}" for p, v in PINS.items()], check=True)
    have = venv_versions(py)
    missing = [p for p, v in PINS.items() if have.get(p) != v]
    if missing:
        sys.exit(f"could not install {missing} into {VENV}")
    return py, have


def machine_cpu():
    """(busy CPU seconds of the whole machine, CPU seconds of this script and its reaped
    children): the difference over a run is what other work took from the machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    ours = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for a in ("ru_utime", "ru_stime"))
    return busy, ours


def java_version():
    try:
        r = subprocess.run(["java", "-version"], capture_output=True, text=True)
        return (r.stderr or r.stdout).splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def rm(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_ppml(stdout):
    count = int(re.search(r"^count\(name\): (\d+)$", stdout, re.M).group(1))
    wrote = int(re.search(r"^wrote (\d+) rows", stdout, re.M).group(1))
    times = [float(x) for x in re.findall(r"^\w+ time: ([0-9.]+) s$", stdout, re.M)]
    return count, wrote, sum(times) if times else None


def parse_result(stdout):
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise CheckFailed("no RESULT line in the engine's output")


def corrupt(path):
    """--debug-corrupt: change one data row in place (same row count, different content)."""
    name = data_files(path)[0] if os.path.isdir(path) else path
    with open(name, "rb") as f:
        lines = f.readlines()
    idx = next(i for i, l in enumerate(lines) if i > 0 and l.strip())
    n, a, j = lines[idx].rstrip(b"\r\n").split(b",")
    lines[idx] = b"%s,%d,%s\n" % (n, 20 + (int(a) - 19) % 21, j)  # still a Developer aged 20..40
    with open(name, "wb") as f:
        f.writelines(lines)
    log(f"--debug-corrupt: changed one row of {name}")


# ---------------------------------------------------------------------------------------------
# The benchmark


def fmt_rows(n):
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


class Bench:
    def __init__(self, args, ppml, venv_py, engines):
        self.args = args
        self.ppml = ppml
        self.venv_py = venv_py
        self.engines = engines
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PPML_", "PYSPARK_", "SPARK_"))}
        self.env.update(PPML_HOME=os.path.join(WORK, "home"), RUST_LOG="error", SPARK_LOCAL_IP="127.0.0.1")
        if args.no_sync:
            self.env["PPML_NO_SYNC"] = "1"
        self.logs = os.path.join(WORK, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def p(self, *a):
        return [self.ppml] + list(a)

    def median_steps(self, name, cmd, before, runs):
        ms = []
        for i in range(runs):
            before()
            ms.append(measure(cmd, self.env, os.path.join(self.logs, f"{name}.{i}")))
            if i + 1 < runs or "generate" not in name:
                del ms[-1]["stdout"]
        return ms

    def run_size(self, rows):
        a = self.args
        d = os.path.join(WORK, fmt_rows(rows))
        os.makedirs(d, exist_ok=True)
        csv, enc, dec = (os.path.join(d, n) for n in ("people.csv", "people.enc", "people.dec.csv"))
        scale = {}

        log(f"[{fmt_rows(rows)}] generate, encrypt (x{a.runs})")
        gen = self.median_steps(f"{fmt_rows(rows)}.generate",
                                self.p("generate", "people", "--rows", str(rows), "--out", csv, "--seed", "1"),
                                lambda: rm(csv), a.runs)
        expected = int(re.search(r"Developers aged 20..=40: (\d+)", gen[-1]["stdout"]).group(1))
        scale["generate"] = gen
        for m in gen:
            m.pop("stdout", None)
        scale["encrypt"] = self.median_steps(
            f"{fmt_rows(rows)}.encrypt",
            self.p("-q", "encrypt", "--in", csv, "--out", enc, "--partitions", str(a.partitions)),
            lambda: rm(enc), a.runs)
        size = os.path.getsize(csv)

        runs = {e: [] for e in self.engines}
        result_decrypts = []
        reference = None
        for rep in range(a.runs):
            checked = {}
            for engine in self.engines:
                log(f"[{fmt_rows(rows)}] run {rep + 1}/{a.runs}: {engine}")
                m, out = self.run_engine(engine, rows, d, csv, enc, rep)
                # Outside the timed region: normalise the output and hash it.
                if engine == "ppml":
                    plain = os.path.join(d, "ppml.out.csv")
                    rm(plain)
                    result_decrypts.append(measure(self.p("-q", "decrypt", "--in", out, "--out", plain),
                                                   self.env, os.path.join(self.logs, f"{fmt_rows(rows)}.decrypt-result.{rep}")))
                    del result_decrypts[-1]["stdout"]
                    check_path = plain
                else:
                    check_path = out
                if a.debug_corrupt == engine and rep == 0:
                    corrupt(check_path)
                nrows, digest = content_digest(check_path)
                if m.get("wrote") is not None and m["wrote"] != nrows:
                    raise CheckFailed(f"{engine}: reported writing {m['wrote']} rows, its output holds {nrows}")
                checked[engine] = {"rows": nrows, "hash": digest, "count": m["count"]}
                m.update(rows=nrows, hash=digest)
                runs[engine].append(m)
                rm(out)
                if engine == "ppml":
                    rm(check_path)
            reference = verdict(checked, expected, rows, reference)
        scale["simple-query"] = runs["ppml"] if "ppml" in runs else []
        scale["decrypt (query result)"] = result_decrypts

        log(f"[{fmt_rows(rows)}] decrypt the whole dataset (x{a.runs})")
        scale["decrypt (whole dataset)"] = self.median_steps(
            f"{fmt_rows(rows)}.decrypt", self.p("-q", "decrypt", "--in", enc, "--out", dec),
            lambda: rm(dec), a.runs)
        if file_sha256(dec) != file_sha256(csv):
            raise CheckFailed("decrypting the whole dataset did not restore people.csv byte for byte")
        if not a.keep:
            for p in (csv, enc, dec):
                rm(p)
        return {"rows": rows, "bytes": size, "expected": expected, "runs": runs, "scale": scale}

    def run_engine(self, engine, rows, d, csv, enc, rep):
        tag = os.path.join(self.logs, f"{fmt_rows(rows)}.{engine}.{rep}")
        scratch = os.path.join(d, f"{engine}.scratch")
        if engine == "ppml":
            out = os.path.join(d, "ppml.out.enc")
            cmd = self.p("simple-query", "--input", enc, "--output", out)
        elif engine == "datafusion":
            out = os.path.join(d, "datafusion.out")
            cmd = self.p("simple-query", "--plaintext", "--input", csv, "--output", out)
        elif engine == "duckdb":
            out = os.path.join(d, "duckdb.out.csv")
            cmd = [self.venv_py, os.path.join(HERE, "duckdb_simple_query.py"), csv, out, scratch]
        elif engine == "spark":
            out = os.path.join(d, "spark.out")
            cmd = [self.venv_py, os.path.join(HERE, "spark_simple_query.py"), csv, out, scratch]
        rm(out)
        rm(scratch)
        m = measure(cmd, self.env, tag)
        if engine in ("ppml", "datafusion"):
            m["count"], m["wrote"], m["query"] = parse_ppml(m["stdout"])
        else:
            r = parse_result(m["stdout"])
            m["count"], m["wrote"], m["query"], m["version"] = r["count"], None, r["query_s"], r.get("version")
            m["session"] = r.get("session_s")
        del m["stdout"]
        rm(scratch)
        return m, out


def med(ms, key="wall"):
    vals = [m[key] for m in ms if m.get(key) is not None]
    return statistics.median(vals) if vals else None


def report(res, args, meta):
    rows, runs = res["rows"], res["runs"]
    lines = [f"#### {rows:,} rows ({res['bytes'] / 1e6:.0f} MB CSV), median of {args.runs}", ""]
    any_runs = next(iter(runs.values()))
    lines.append(f"Result check: every engine wrote {any_runs[0]['rows']:,} rows (the generator counted "
                 f"{res['expected']:,} Developers aged 20..40) with content hash "
                 f"`{any_runs[0]['hash'][:16]}`, in every run; count(name) = {rows:,} everywhere.")
    lines.append("")
    lines.append("| engine | input | median wall (s) | vs ppml | median query-only (s) | query-only vs ppml "
                 "| peak RSS (MiB) | rows | hash | all runs: wall s (other load %) |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    base = med(runs["ppml"]) if "ppml" in runs else None
    base_q = med(runs["ppml"], "query") if "ppml" in runs else None
    for engine, ms in runs.items():
        name, inp = LABELS[engine]
        w, q = med(ms), med(ms, "query")
        ratio = f"{w / base:.2f}x" if base else "-"
        qratio = f"{q / base_q:.2f}x" if base_q and q else "-"
        peak = max(m["peak_mib"] for m in ms)
        all_walls = ", ".join("%.2f (%.0f)" % (m["wall"], 100 * m["other_load"]) for m in ms)
        lines.append(f"| {name} | {inp} | {w:.3f} | {ratio} | {q:.3f} | {qratio} | {peak:.0f} | "
                     f"{ms[0]['rows']:,} | `{ms[0]['hash'][:12]}` | {all_walls} |")
    lines.append("")
    if "spark" in runs:
        s = runs["spark"]
        lines.append(f"- Spark: JVM + session start {med(s, 'session'):.2f} s (median) of the wall time; "
                     f"peak RSS = python driver + JVM tree "
                     f"(largest single process {max(m['ru_maxrss_mib'] for m in s):.0f} MiB); "
                     f"the JVM outlived python by {max(m['linger'] for m in s):.2f} s at most (not in the wall time).")
    if "duckdb" in runs:
        lines.append(f"- DuckDB: python start + import + connect {med(runs['duckdb'], 'session'):.2f} s (median) of the wall time.")
    lines.append("- other load: CPU that processes outside the run took during it, in % of the "
                 "machine's cores over the run's wall time (/proc/stat busy time minus the run's "
                 "own rusage); 0-5 % is the sampler and the kernel's writeback.")
    lines.append("- query-only: ppml and DataFusion from their own loadInputs + doSQLOperations + "
                 "encryptAndSaveOutputs timings; Spark and DuckDB timed inside the script from "
                 "reading to finished writing (session start excluded).")
    lines.append("")
    return "\n".join(lines)


STEPS = ["generate", "encrypt", "simple-query", "decrypt (whole dataset)", "decrypt (query result)"]


def scale_report(results, args):
    lines = ["#### Scale: ppml generate -> encrypt -> simple-query -> decrypt", ""]
    lines.append(f"| step | rows | median wall (s) | s per M rows | marginal s per M rows | peak RSS (MiB) | < {RSS_LIMIT_MIB} MiB |")
    lines.append("|---|---:|---:|---:|---:|---:|---|")
    over = []
    for step in STEPS:
        prev = None
        for res in results:
            ms = res["scale"].get(step)
            if not ms:
                continue
            rows, w = res["rows"], med(ms)
            peak = max(m["peak_mib"] for m in ms)
            ok = peak < RSS_LIMIT_MIB
            if not ok:
                over.append(f"{step} at {rows:,} rows: {peak:.0f} MiB")
            marginal = "-"
            if prev:
                marginal = f"{(w - prev[1]) / ((rows - prev[0]) / 1e6):.4f}"
            lines.append(f"| {step} | {rows:,} | {w:.3f} | {w / (rows / 1e6):.4f} | {marginal} | {peak:.0f} | "
                         f"{'yes' if ok else '**NO**'} |")
            prev = (rows, w)
    lines.append("")
    lines.append("s per M rows = median wall / millions of rows (includes process start, KMS and "
                 "manifest work, so it falls with size when that fixed cost dominates); marginal = "
                 "extra time per extra million rows from the previous size: constant marginal "
                 "cost = linear growth.")
    lines.append("")
    return "\n".join(lines), over


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,10000000,100000000",
                    help="comma-separated row counts (default: 1M, 10M, 100M)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions per engine; the median is reported")
    ap.add_argument("--engines", default=",".join(ENGINES), help="subset of " + ",".join(ENGINES))
    ap.add_argument("--ppml", default=None, help="ppml binary (default: cargo build --release -p ppml-cli)")
    ap.add_argument("--partitions", type=int, default=2, help="part files of the encrypted input")
    ap.add_argument("--no-sync", action="store_true", help="run ppml with --no-sync (Spark and DuckDB do not fsync)")
    ap.add_argument("--no-install", action="store_true", help="do not create the venv; skip engines it lacks")
    ap.add_argument("--keep", action="store_true", help="keep people.csv / people.enc under bench/out/compare")
    ap.add_argument("--smoke", action="store_true",
                    help="CI smoke check: 100k rows, 1 run, ppml + DataFusion (+ DuckDB if bench/out/venv has it), no installs")
    ap.add_argument("--self-test", action="store_true", help="check the result hash and verdict logic, then exit")
    ap.add_argument("--debug-corrupt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.self_test:
        self_test()
        return 0
    if args.smoke:
        args.rows, args.runs, args.no_install = "100000", 1, True
        if args.engines == ",".join(ENGINES):
            args.engines = "ppml,datafusion,duckdb"
    sizes = [int(r.replace("_", "")) for r in args.rows.split(",") if r]
    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not sizes or args.runs < 1:
        ap.error(f"unknown engines {bad}" if bad else "need --rows and --runs >= 1")
    engines = [e for e in ENGINES if e in engines]  # fixed interleaving order

    os.makedirs(WORK, exist_ok=True)
    need = int(max(sizes) * 19.2 * 4.2) + (1 << 30)
    free = shutil.disk_usage(WORK).free
    if free < need:
        sys.exit(f"need about {need / 1e9:.1f} GB free under {WORK}, have {free / 1e9:.1f} GB")

    ppml = args.ppml
    if ppml is None:
        subprocess.run(["cargo", "build", "--release", "-p", "ppml-cli"], cwd=ROOT, check=True)
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        ppml = os.path.join(target, "release", "ppml")
    ppml = os.path.abspath(ppml)
    if not os.access(ppml, os.X_OK):
        sys.exit(f"no ppml binary at {ppml} (build it, or give --ppml PATH)")

    notes = []
    venv_py, versions = None, {}
    if "spark" in engines or "duckdb" in engines:
        venv_py, versions = ensure_venv(not args.no_install)
    java = java_version()
    for engine, pkg in (("spark", "pyspark"), ("duckdb", "duckdb")):
        if engine in engines and pkg not in versions:
            engines.remove(engine)
            notes.append(f"{engine} skipped: {pkg} is not installed in {VENV} "
                         f"(run without --smoke/--no-install to install it)")
    if "spark" in engines and not java:
        engines.remove("spark")
        notes.append("spark skipped: no `java` on PATH")
    for n in notes:
        log("note: " + n)
    if not become_subreaper():
        notes.append("could not become a child subreaper: processes that outlive their parent are not measured")

    started = time.time()
    load_before = os.getloadavg()
    cpu_before = machine_cpu()
    bench = Bench(args, ppml, venv_py, engines)
    ppml_version = subprocess.run([ppml, "--version"], capture_output=True, text=True).stdout.strip()
    results, sections = [], []
    try:
        for rows in sizes:
            res = bench.run_size(rows)
            results.append(res)
            sections.append(report(res, args, None))
            print(sections[-1], flush=True)  # printed only once this size's checks passed
    except CheckFailed as e:
        log(str(e))
        log("no times reported: the engines' results or runs did not check out")
        return 1
    scale, over = scale_report(results, args)
    print(scale)
    load_after = os.getloadavg()
    cpu_after = machine_cpu()
    elapsed = time.time() - started
    others = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1]))

    cmdline = "python3 bench/compare.py " + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    head = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {os.cpu_count()} cores, "
        f"in {elapsed:.0f} s; command: `{cmdline}`",
        "Versions: " + "; ".join([ppml_version] + [f"{p} {v}" for p, v in versions.items()
                                                  if {"pyspark": "spark", "duckdb": "duckdb"}[p] in engines]
                                 + ([java] if java and "spark" in engines else []))
        + f"; load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
        f"other processes used {others:.0f} CPU s of the {elapsed * (os.cpu_count() or 1):.0f} "
        f"the machine had during the run ({others / (elapsed * (os.cpu_count() or 1)) * 100:.0f} %).",
        f"Engines in order per repetition: {', '.join(engines)}." + "".join(f" Note: {n}." for n in notes),
        "",
    ]
    text = "\n".join(head) + "\n" + "\n".join(sections) + "\n" + scale
    with open(os.path.join(WORK, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({"args": vars(args), "engines": engines, "versions": versions, "ppml": ppml_version,
                   "java": java, "results": results}, f, indent=1, default=str)
    print("\n".join(head))
    log(f"report: {os.path.join(WORK, 'report.md')}; raw: {os.path.join(WORK, 'results.json')}")
    if over:
        log(f"over the {RSS_LIMIT_MIB} MiB budget: " + "; ".join(over))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
