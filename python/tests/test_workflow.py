"""The seed workflow through the Python package, against plaintext pyarrow computations."""

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

import ppml
from conftest import developers, sorted_rows


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh embedded KMS in its own $PPML_HOME, and nothing of the caller's KMS settings."""
    for name in list(os.environ):
        if name.startswith("PPML_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PPML_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def people(home):
    path = home / "people.csv"
    assert ppml.generate_people(path, 5000, seed=7) == 5000
    return path


def test_query_over_an_encrypted_dataset_matches_plaintext(home, people):
    ctx = ppml.Context()
    assert not ctx.attested
    summary = ctx.encrypt(people, str(home / "people.enc"), partitions=3)
    assert summary["parts"] == 3
    ctx.register("people", str(home / "people.enc"))
    frame = ctx.sql(
        "SELECT name, age FROM people WHERE job = 'Developer' AND age BETWEEN 20 AND 40"
    )
    assert frame.schema.names == ["name", "age"]
    got = pa.table(frame)  # through __arrow_c_stream__
    want = developers(pacsv.read_csv(people))
    assert got.num_rows == want.num_rows > 0
    assert sorted_rows(got) == sorted_rows(want)
    assert frame.count() == want.num_rows
    assert sorted_rows(frame.to_arrow()) == sorted_rows(want)


def test_results_are_written_encrypted_and_decrypt_to_the_same_rows(home, people):
    ctx = ppml.Context()
    ctx.encrypt(people, str(home / "people.enc"))
    frame = ctx.read(str(home / "people.enc"))
    ctx.register("people", str(home / "people.enc"))
    result = ctx.sql("SELECT name, age FROM people WHERE job = 'Developer' AND age BETWEEN 20 AND 40")
    out = home / "developers.enc"
    summary = ctx.write(result, str(out), partitions=2)
    want = developers(pacsv.read_csv(people))
    assert summary["rows"] == want.num_rows and summary["parts"] == 2
    # Ciphertext on disk: no name of the result appears in any file of the dataset.
    names = set(want["name"].to_pylist())
    for part in out.iterdir():
        data = part.read_bytes()
        assert not any(name.encode() in data for name in list(names)[:50])
    plain = home / "developers.csv"
    assert ctx.decrypt(str(out), plain) > 0
    assert sorted_rows(pacsv.read_csv(plain)) == sorted_rows(want)
    assert frame.count() == 5000


def test_arrow_data_from_python_is_written_encrypted_as_it_streams(home):
    ctx = ppml.Context()
    table = pa.table({"id": list(range(10_000)), "word": [f"w{i % 97}" for i in range(10_000)]})
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=1000))
    summary = ctx.write(reader, str(home / "words.enc"), format="parquet")
    assert summary["rows"] == 10_000
    back = pa.table(ctx.read(str(home / "words.enc")))
    assert sorted_rows(back) == sorted_rows(table)


def test_python_generators_stream_into_parts_without_deadlock(home):
    # The producer is Python code: pyarrow calls back into it (taking the GIL) while ppml
    # encrypts on its own threads.
    ctx = ppml.Context()
    schema = pa.schema([("n", pa.int64()), ("square", pa.int64())])

    def batches():
        for start in range(0, 20_000, 500):
            n = pa.array(range(start, start + 500), pa.int64())
            yield pa.record_batch([n, pc.multiply(n, n)], schema=schema)

    reader = pa.RecordBatchReader.from_batches(schema, batches())
    summary = ctx.write(reader, str(home / "squares.enc"), format="json", partitions=3)
    assert summary == {"rows": 20_000, "parts": 3, "plaintext_bytes": summary["plaintext_bytes"]}
    assert len([p for p in (home / "squares.enc").iterdir() if p.name.startswith("part-")]) == 3
    ctx.register("squares", str(home / "squares.enc"))
    total = pa.table(ctx.sql("SELECT sum(square) AS s, count(*) AS c FROM squares"))
    assert total["c"][0].as_py() == 20_000
    assert total["s"][0].as_py() == sum(i * i for i in range(20_000))


def test_tampered_data_raises_tampered_data_and_leaves_no_output(home, people):
    ctx = ppml.Context()
    ctx.encrypt(people, str(home / "people.enc"))
    part = next(p for p in (home / "people.enc").iterdir() if p.name.startswith("part-"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(ppml.TamperedData, match="failed authentication"):
        pa.table(ctx.read(str(home / "people.enc")))
    with pytest.raises(ppml.TamperedData):
        ctx.decrypt(str(home / "people.enc"), home / "out.csv")
    assert not (home / "out.csv").exists()
    # A part removed from the dataset: the manifest names it.
    part.unlink()
    with pytest.raises(ppml.TamperedData, match="missing"):
        ctx.read(str(home / "people.enc"))
    assert issubclass(ppml.TamperedData, ppml.InvalidInput)
    assert issubclass(ppml.InvalidInput, ppml.PpmlError)
    assert issubclass(ppml.AttestationFailed, ppml.AccessDenied)


def test_invalid_input_that_is_not_tampering_is_told_apart(home):
    ctx = ppml.Context()
    (home / "notppml").mkdir()
    (home / "notppml" / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ppml.InvalidInput) as raised:
        ctx.read(str(home / "notppml"))
    assert not isinstance(raised.value, ppml.TamperedData)
    ragged = home / "ragged.csv"
    ragged.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(ppml.InvalidInput, match="line 3") as raised:
        ctx.encrypt(ragged, str(home / "ragged.enc"))
    assert not isinstance(raised.value, ppml.TamperedData)
    assert not (home / "ragged.enc").exists()


def test_each_format_reads_back_and_a_wrong_format_is_refused(home, people):
    ctx = ppml.Context()
    table = pacsv.read_csv(people)
    for form in ("csv", "json", "parquet"):
        ctx.write(table, str(home / f"people.{form}.enc"), format=form, partitions=2)
    read = {
        "csv": ctx.read_csv,
        "json": ctx.read_json,
        "parquet": ctx.read_parquet,
    }
    for form, reader in read.items():
        got = pa.table(reader(str(home / f"people.{form}.enc")))
        assert sorted_rows(got) == sorted_rows(table), form
    with pytest.raises(ppml.InvalidInput, match="not Parquet"):
        ctx.read_parquet(str(home / "people.csv.enc"))
    with pytest.raises(ppml.InvalidInput, match="not CSV"):
        ctx.read_csv(str(home / "people.json.enc"))
    # Plaintext files, when asked explicitly, whatever their extension.
    plain = home / "people.data"
    plain.write_bytes(people.read_bytes())
    assert ctx.read_csv(str(plain), plaintext=True).count() == 5000
    headless = home / "headless.txt"
    headless.write_text("ann,31,Developer\nbob,52,Engineer\n")
    assert ctx.read_csv(str(headless), plaintext=True, header=False).count() == 2
    with pytest.raises(ValueError, match="header=False"):
        ctx.read_csv(str(home / "people.csv.enc"), header=False)


def test_frames_filter_select_show_and_convert(home, people, capsys):
    import duckdb
    import pandas as pd
    import polars as pl

    ctx = ppml.Context()
    ctx.encrypt(people, str(home / "people.enc"))
    frame = ctx.read_csv(str(home / "people.enc"))
    developers_frame = frame.filter(
        "job = 'Developer' AND age BETWEEN 20 AND 40"
    ).select("name", "age")
    want = developers(pacsv.read_csv(people))
    assert sorted_rows(developers_frame.to_arrow()) == sorted_rows(want)
    # pandas, polars and DuckDB take the frame as it streams.
    df = developers_frame.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == want.num_rows
    polars_df = pl.from_arrow(developers_frame.to_arrow())
    assert polars_df.height == want.num_rows
    assert pl.DataFrame(developers_frame).height == want.num_rows
    counted = duckdb.sql("SELECT count(*) FROM developers_frame").fetchall()[0][0]
    assert counted == want.num_rows
    # And a polars frame is written back encrypted, streaming through __arrow_c_stream__.
    ctx.write(polars_df, str(home / "from-polars.enc"), format="parquet")
    assert sorted_rows(pa.table(ctx.read_parquet(str(home / "from-polars.enc")))) == sorted_rows(want)
    batches = developers_frame.collect()
    assert sum(b.num_rows for b in batches) == want.num_rows
    assert developers_frame.limit(7).count() == 7
    developers_frame.show(3)
    printed = capsys.readouterr().out
    assert printed.count("\n") == 3 + 4, printed  # 3 rows, the header and three rules
    assert "| name" in printed
    developers_frame.create_view("developers")
    assert pa.table(ctx.sql("SELECT count(*) AS c FROM developers"))["c"][0].as_py() == want.num_rows
    with pytest.raises(ppml.PpmlError):
        frame.filter("no_such_column > 1")
    with pytest.raises(ppml.PpmlError):
        frame.select("no_such_column")


def test_kms_settings_are_taken_as_arguments(home, people):
    # The same embedded KMS, named by argument instead of $PPML_HOME.
    os.environ.pop("PPML_HOME")
    other = home / "other-home"
    ctx = ppml.Context(home=str(other))
    ctx.encrypt(people, str(home / "people.enc"))
    assert (other / "kms").is_dir()
    assert ppml.Context(home=str(other)).read(str(home / "people.enc")).count() == 5000
    with pytest.raises(ValueError, match="grant is for an attested context"):
        ppml.Context(grant=str(home / "grant.txt"))


def test_bad_arguments_are_refused_clearly(home):
    with pytest.raises(ValueError, match="tee needs policy"):
        ppml.Context(tee="sim")
    with pytest.raises(ValueError, match="tee must be"):
        ppml.Context(tee="tpm", policy="p")
    ctx = ppml.Context()
    with pytest.raises(ValueError, match="format must be"):
        ctx.write(pa.table({"a": [1]}), str(home / "x.enc"), format="avro")
    with pytest.raises(ppml.PpmlError):
        ctx.read(str(home / "missing.enc"))


def test_ctrl_c_cancels_a_write_and_leaves_nothing(home):
    import _thread
    import threading
    import time

    ctx = ppml.Context()
    schema = pa.schema([("n", pa.int64())])

    def slow():
        for i in range(200):
            time.sleep(0.05)
            yield pa.record_batch([pa.array([i], pa.int64())], schema=schema)

    threading.Timer(0.3, _thread.interrupt_main).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ctx.write(pa.RecordBatchReader.from_batches(schema, slow()), str(home / "slow.enc"))
    assert time.monotonic() - start < 3
    assert not any(p.name.startswith((".slow.enc", "slow.enc")) for p in home.iterdir())


def test_the_type_stubs_name_what_the_module_has():
    import ast
    from pathlib import Path

    stubs = ast.parse((Path(ppml.__file__).parent / "_ppml.pyi").read_text())
    native = ppml._ppml
    typing_only = {"WriteSummary", "EncryptSummary"}  # the dicts' shapes, for checkers
    for node in stubs.body:
        if isinstance(node, ast.ClassDef) and node.name not in typing_only:
            assert hasattr(native, node.name), node.name
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__":
                    assert hasattr(getattr(native, node.name), item.name), item.name
        elif isinstance(node, ast.FunctionDef):
            assert hasattr(native, node.name), node.name
    stubbed = {n.name for n in stubs.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    for name in dir(native):
        if not name.startswith("_"):
            assert name in stubbed, f"{name} has no stub"
    for cls in (native.Context, native.Frame):
        methods = {n.name for n in next(
            c for c in stubs.body if isinstance(c, ast.ClassDef) and c.name == cls.__name__
        ).body if isinstance(n, ast.FunctionDef)}
        for name in dir(cls):
            if not name.startswith("_"):
                assert name in methods, f"{cls.__name__}.{name} has no stub"


def free_cluster_port(executors):
    """A base port such that `ppml cluster up --port BASE` finds its ports free: BASE to
    BASE+executors and, for metrics, BASE+100 to BASE+100+executors."""
    import socket

    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base >= 60000:
            continue
        try:
            for port in [*range(base, base + executors + 1),
                         *range(base + 100, base + 101 + executors)]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError("no free ports for a cluster")


def test_a_query_runs_on_a_local_cluster_in_client_mode(home, people):
    from conftest import ppml_command

    ctx = ppml.Context()
    ctx.encrypt(people, str(home / "people.enc"), partitions=2)
    cluster = home / "cluster"
    port = free_cluster_port(1)
    ppml_command("cluster", "up", "--executors", "1", "--port", port, "--dir", cluster,
                 home=home / "home")
    try:
        remote = ppml.Context(master=f"127.0.0.1:{port}", tls_dir=str(cluster / "tls"))
        remote.register("people", str(home / "people.enc"))
        frame = remote.sql(
            "SELECT name, age FROM people WHERE job = 'Developer' AND age BETWEEN 20 AND 40"
        )
        want = developers(pacsv.read_csv(people))
        assert sorted_rows(frame.to_arrow()) == sorted_rows(want)
        summary = remote.write(frame, str(home / "developers.enc"), partitions=2)
        assert summary["rows"] == want.num_rows
        assert sorted_rows(ctx.read(str(home / "developers.enc")).to_arrow()) == sorted_rows(want)
        # The executor ran the tasks (its metrics count them).
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port + 101}/metrics").read()
        tasks = [
            float(line.split()[-1]) for line in metrics.decode().splitlines()
            if line.startswith("ppml_executor_tasks_total")
        ]
        assert sum(tasks) > 0, metrics
    finally:
        ppml_command("cluster", "down", "--dir", cluster, home=home / "home")
    # Without the cluster, the same context's queries fail: they never ran in this process.
    with pytest.raises(ppml.PpmlError):
        remote.sql("SELECT count(*) FROM people").count()
