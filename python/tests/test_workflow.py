"""The seed workflow through the Python package, against plaintext pyarrow computations."""

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

import ppml


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


def developers(table):
    """SimpleQuery's rows, computed on plaintext by pyarrow."""
    mask = pc.and_(
        pc.equal(table["job"], "Developer"),
        pc.and_(pc.greater_equal(table["age"], 20), pc.less_equal(table["age"], 40)),
    )
    return table.filter(mask).select(["name", "age"])


def sorted_rows(table):
    return sorted(zip(*(table[name].to_pylist() for name in table.column_names)))


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


def test_tampered_data_raises_invalid_input_and_leaves_no_output(home, people):
    ctx = ppml.Context()
    ctx.encrypt(people, str(home / "people.enc"))
    part = next(p for p in (home / "people.enc").iterdir() if p.name.startswith("part-"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(ppml.InvalidInput):
        pa.table(ctx.read(str(home / "people.enc")))
    with pytest.raises(ppml.InvalidInput):
        ctx.decrypt(str(home / "people.enc"), home / "out.csv")
    assert not (home / "out.csv").exists()
    assert issubclass(ppml.InvalidInput, ppml.PpmlError)


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
