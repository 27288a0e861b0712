"""An attested Python context (the simulated TEE) against a ppml KMS server: keys marked for
attested release reach it and no unattested context; a refused attestation raises
AttestationFailed; the owner's grant bounds what it writes; and its exceptions carry no row
value (they may be printed where the host reads them)."""

import hashlib
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

import ppml
from conftest import developers, sorted_rows

SQL = "SELECT name, age FROM people WHERE job = 'Developer' AND age BETWEEN 20 AND 40"


def interpreter_measurement():
    """What a Python process's simulated evidence measures: its executable, the interpreter
    (a real SGX or TDX quote measures the whole enclave or VM image)."""
    with open("/proc/self/exe", "rb") as exe:
        return hashlib.sha256(exe.read()).hexdigest()


def release_policy(server, path, mrenclave, platform):
    path.write_text(json.dumps({
        "allowed": [{"tee": "sim", "mrenclave": mrenclave}],
        "allow_simulation": True,
        "sim_platforms": [platform],
    }))
    return server.ppml("kms", "release-policy", "--policy", path).stdout.strip()


def test_only_an_attested_context_gets_gated_keys_within_its_grant(kms_server, monkeypatch):
    server, root = kms_server, kms_server.root
    people = root / "people.csv"
    ppml.generate_people(people, 3000, seed=5)
    enc = root / "people.enc"
    server.ppml("encrypt", "--in", people, "--out", enc)
    # A row whose age does not parse, after enough good rows that the column is numbers.
    bad_csv = root / "bad.csv"
    lines = ["name,age,job"] + [f"p{i},{20 + i % 50},Developer" for i in range(2000)]
    bad_csv.write_text("\n".join(lines + ["alice-ssn-123-45-6789,unknown,Developer"]) + "\n")
    bad = root / "bad.enc"
    server.ppml("encrypt", "--in", bad_csv, "--out", bad)
    # Results go under a key of the owner's that is not gated, so the owner reads them.
    output_key = server.ppml("kms", "create-key").stdout.strip()

    sim_key = root / "sim-platform.pk8"
    platform = server.ppml(
        "attest", "sim-platform", env={"PPML_SIM_PLATFORM_KEY": str(sim_key)}
    ).stdout.strip()
    # The last policy uploaded is the one the inputs' key is released under.
    wrong = release_policy(server, root / "wrong.json", "00" * 32, platform)
    good = release_policy(server, root / "good.json", interpreter_measurement(), platform)

    out = root / "developers.enc"
    grant = root / "grant.txt"
    server.ppml(
        "grant", "-o", grant, "query", "--sql", SQL,
        "--table", f"people={enc}", "--table", f"bad={bad}", "--output", out,
        env={"PPML_OUTPUT_KEY": output_key},
    )

    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PPML_SIM_PLATFORM_KEY", str(sim_key))
    monkeypatch.setenv("PPML_OUTPUT_KEY", output_key)

    # Unattested: the gated key is refused, and that is not an attestation failure.
    with pytest.raises(ppml.AccessDenied, match="attested runtimes") as refused:
        ppml.Context().read(str(enc))
    assert not isinstance(refused.value, ppml.AttestationFailed)

    # Evidence the policy does not accept: the context is not made, and there is no
    # unattested fallback.
    with pytest.raises(ppml.AttestationFailed):
        ppml.Context(tee="sim", policy=wrong, grant=str(grant))

    ctx = ppml.Context(tee="sim", policy=good, grant=str(grant))
    assert ctx.attested
    ctx.register("people", str(enc))
    summary = ctx.write(ctx.sql(SQL), str(out))
    # The output carries the job's receipt, signed in the TEE: it verifies up to the KMS's
    # attestation key, names the SQL text and both inputs, and withholds the count.
    verified = server.ppml("receipt", "verify", "--require-attested", out).stdout
    assert "runtime:  sim attested" in verified, verified
    receipt = json.loads((out / "_receipt.ppml.json").read_text())
    assert receipt["body"]["job"]["app"] == "dataframe"
    assert sorted(i["location"] for i in receipt["body"]["inputs"]) == [str(enc)]
    assert "rows" not in receipt["body"]["output"]
    # An output the grant does not name is refused before anything is written.
    with pytest.raises(ppml.AccessDenied, match="grant"):
        ctx.write(ctx.sql(SQL), str(root / "stolen.enc"))
    assert not (root / "stolen.enc").exists()

    # In the TEE, an error quotes no row value: the parse error names its kind only, as
    # ppml's exception and as the exception of a consumer of the Arrow stream.
    ctx.register("bad", str(bad))
    with pytest.raises(ppml.InvalidInput) as failed:
        ctx.sql("SELECT sum(age) AS s FROM bad").to_arrow()
    with pytest.raises(pa.ArrowInvalid) as consumed:
        pa.table(ctx.sql("SELECT sum(age) AS s FROM bad"))
    for error in (failed.value, consumed.value):
        assert "alice-ssn" not in str(error)
        assert "withheld" in str(error), str(error)

    # Rows are not printed where the host reads them, nor written as plaintext, in the TEE.
    with pytest.raises(ValueError, match="host"):
        ctx.sql(SQL).show()
    from ppml.bigdl import CryptoMode, PPMLContext

    sc = PPMLContext("job", tee="sim", policy=good, grant=str(grant))
    people_df = sc.read(CryptoMode.AES_CBC_PKCS5PADDING).csv(str(enc))
    with pytest.raises(ValueError, match="leave the TEE"):
        sc.write(people_df, CryptoMode.PLAIN_TEXT).csv(str(root / "plain-out"))
    assert not (root / "plain-out").exists()

    # The owner reads the result, unattested (its key is not gated).
    owner = ppml.Context()
    got = pa.table(owner.read(str(out)))
    assert got.num_rows == summary["rows"] > 0
    assert sorted_rows(got) == sorted_rows(developers(pacsv.read_csv(people)))
