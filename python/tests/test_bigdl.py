"""ppml.bigdl: BigDL PPML's Python API. The script in docs/python.md runs with only its import
line changed; what ppml cannot do as BigDL does is refused, never ignored."""

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.csv as pacsv
import pytest

import ppml
from conftest import developers, sorted_rows
from ppml.bigdl import CryptoMode, PPMLContext

DOCS = Path(__file__).resolve().parents[2] / "docs" / "python.md"
PACKAGE = Path(__file__).resolve().parents[1]


def documented_script():
    text = DOCS.read_text()
    block = re.search(r"<!-- bigdl-script -->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/python.md has no BigDL script block"
    return block.group(1)


def test_the_documented_bigdl_script_runs_with_only_its_import_line_changed(
    kms_server, monkeypatch
):
    script = documented_script()
    bigdl_import = "from bigdl.ppml.ppml_context import *\n"
    assert script.startswith(bigdl_import)
    ported = script.replace(bigdl_import, "from ppml.bigdl import *\n", 1)
    work = kms_server.root / "work"
    work.mkdir()
    plain = kms_server.root / "people.csv"
    ppml.generate_people(plain, 4000, seed=3)
    ppml.generate_people(work / "new_people.csv", 100, seed=4)
    # The user's data as BigDL encrypted it, under the app's key on the KMS (an independent
    # writer of BigDL's format).
    bigdl_writer(kms_server, plain, work / "people_encrypted")
    # BigDL's eHSM primary key file: the key id on its first line.
    key_file = kms_server.root / "primaryKey"
    key_file.write_text(kms_server.primary + "\n")
    url = urlparse(kms_server.url)
    path = kms_server.root / "simple_query.py"
    path.write_text(ported)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(
        PYTHONPATH=str(PACKAGE),
        # The owner key of the app (in its home) and the server's certificate, as for the
        # ppml command; the rest comes from ppml_args.
        PPML_HOME=str(kms_server.home),
        PPML_KMS_FINGERPRINT=kms_server.fingerprint,
    )
    done = subprocess.run(
        [sys.executable, str(path), url.hostname, str(url.port), kms_server.appid,
         kms_server.apikey, str(key_file), str(work)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    want = developers(pacsv.read_csv(plain))
    assert f"developers: {want.num_rows}" in done.stdout
    assert "| name" in done.stdout  # show(5)

    for name, value in kms_server.env().items():
        monkeypatch.setenv(name, value)
    ctx = ppml.Context()
    assert sorted_rows(ctx.read_csv(str(work / "developers_encrypted")).to_arrow()) == sorted_rows(want)
    assert sorted_rows(ctx.read_parquet(str(work / "developers_parquet")).to_arrow()) == sorted_rows(want)
    copied = pacsv.read_csv(work / "developers_plain" / "part-00000.csv")
    assert sorted_rows(copied) == sorted_rows(want)
    new = pacsv.read_csv(work / "new_people.csv")
    assert sorted_rows(ctx.read_csv(str(work / "new_people_encrypted")).to_arrow()) == sorted_rows(new)
    # The encrypted outputs are ppml datasets: no name appears in their bytes.
    for dataset in ("developers_encrypted", "developers_parquet", "new_people_encrypted"):
        data = b"".join(p.read_bytes() for p in (work / dataset).iterdir())
        assert not any(name.encode() in data for name in want["name"].to_pylist()[:50])

    # A BigDL part with one byte changed fails its MAC: the read raises, where BigDL would
    # have returned the damaged rows.
    part = next((work / "people_encrypted").glob("part-*"))
    data = bytearray(part.read_bytes())
    data[500] ^= 1
    part.write_bytes(bytes(data))
    sc = PPMLContext("again", {
        "kms_type": "EHSMKeyManagementService", "kms_server_ip": url.hostname,
        "kms_server_port": url.port, "app_id": kms_server.appid, "api_key": kms_server.apikey,
        "primary_key_material": str(key_file),
    })
    with pytest.raises(ppml.TamperedData, match="BigDL file authentication failed"):
        sc.read(CryptoMode.AES_CBC_PKCS5PADDING).option("header", "true").csv(
            str(work / "people_encrypted"))


def bigdl_writer(server, plain, out):
    """A BigDL common-mode dataset of `plain` in two parts, its data key from the KMS as
    BigDL gets it (compat/bigdl_writer.py)."""
    writer = Path(__file__).resolve().parents[2] / "compat" / "bigdl_writer.py"
    subprocess.run(
        [sys.executable, str(writer), "--variant", "common", "--in", str(plain), "--out",
         str(out), "--parts", "2", "--kms", server.url, server.fingerprint, server.appid,
         server.apikey, server.primary],
        check=True, capture_output=True, timeout=120,
    )
    assert (out / ".meta").is_file()


@pytest.fixture
def sc(tmp_path, clean_env, monkeypatch):
    monkeypatch.setenv("PPML_HOME", str(tmp_path / "home"))
    return PPMLContext("test")


def test_save_modes_and_formats(sc, tmp_path):
    people = tmp_path / "people.csv"
    ppml.generate_people(people, 500, seed=1)
    df = sc.read(CryptoMode.PLAIN_TEXT).option("header", "true").csv(str(people))
    assert df.columns == ["name", "age", "job"]
    out = str(tmp_path / "out")
    sc.write(df, CryptoMode.AES_CBC_PKCS5PADDING).csv(out)
    with pytest.raises(ppml.PpmlError, match="exists"):
        sc.write(df, CryptoMode.AES_CBC_PKCS5PADDING).mode("error").csv(out)
    assert sc.write(df, "AES/CBC/PKCS5Padding").mode("ignore").csv(out) is None
    summary = sc.write(df.limit(10), CryptoMode.AES_CBC_PKCS5PADDING).mode("overwrite").csv(out)
    assert summary["rows"] == 10
    assert sc.read(CryptoMode.AES_CBC_PKCS5PADDING).csv(out).count() == 10
    sc.write(df, CryptoMode.AES_CBC_PKCS5PADDING).option("numPartitions", 3).json(
        str(tmp_path / "json"))
    back = sc.read(CryptoMode.AES_CBC_PKCS5PADDING).json(str(tmp_path / "json"))
    assert len([p for p in (tmp_path / "json").iterdir() if p.name.startswith("part-")]) == 3
    assert sorted_rows(back.toArrow()) == sorted_rows(pacsv.read_csv(people))
    assert len(back.collect()) == 500 and set(back.collect()[0]) == {"name", "age", "job"}
    # A plaintext write replaces the old output only when complete, headerless if asked.
    plain = tmp_path / "plain"
    sc.write(df, CryptoMode.PLAIN_TEXT).option("header", "false").csv(str(plain))
    assert (plain / "part-00000.csv").read_text().count("\n") == 500
    sc.write(df.limit(3), CryptoMode.PLAIN_TEXT).mode("overwrite").json(str(plain))
    assert sorted(p.name for p in plain.iterdir()) == ["part-00000.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Reading the wrong format of a ppml dataset is refused.
    with pytest.raises(ppml.InvalidInput, match="not Parquet"):
        sc.read(CryptoMode.AES_GCM_V1).parquet(out)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda sc, p: sc.write(sc.sql("SELECT 1 AS a"), CryptoMode.AES_GCM_CTR_V1).parquet(p),
         "AES_GCM_CTR_V1"),
        (lambda sc, p: sc.write(sc.sql("SELECT 1 AS a"), CryptoMode.AES_GCM_V1).csv(p),
         "Parquet only"),
        (lambda sc, p: sc.write(sc.sql("SELECT 1 AS a"), CryptoMode.AES_CBC_PKCS5PADDING).parquet(p),
         "AES_GCM_V1"),
        (lambda sc, p: sc.write(sc.sql("SELECT 1 AS a"), CryptoMode.AES_CBC_PKCS5PADDING).mode(
            "append"), "append"),
        (lambda sc, p: sc.write(sc.sql("SELECT 1 AS a"), CryptoMode.AES_CBC_PKCS5PADDING).mode(
            "sometimes"), "Unknown save mode"),
        (lambda sc, p: sc.write(sc.sql("SELECT 1 AS a"), CryptoMode.AES_CBC_PKCS5PADDING).option(
            "compression", "gzip"), "compression"),
        (lambda sc, p: sc.write(sc.sql("SELECT 1 AS a"), CryptoMode.AES_CBC_PKCS5PADDING).option(
            "header", "false").csv(p), "header"),
        (lambda sc, p: sc.read(CryptoMode.PLAIN_TEXT).option("inferSchema", "false"),
         "inferSchema"),
        (lambda sc, p: sc.read(CryptoMode.PLAIN_TEXT).option("sep", ";"), "comma"),
        (lambda sc, p: sc.read(CryptoMode.PLAIN_TEXT).option("multiLine", "true"), "multiLine"),
        (lambda sc, p: sc.read(CryptoMode.PLAIN_TEXT).schema("a INT"), "schema"),
        (lambda sc, p: sc.read(CryptoMode.AES_CBC_PKCS5PADDING).option("header", "false").csv(p),
         "header"),
        (lambda sc, p: sc.read("AES/ECB"), "unknown crypto mode"),
        (lambda sc, p: sc.read(CryptoMode.PLAIN_TEXT, primary_key_name="other"),
         "primary_key_name"),
        (lambda sc, p: sc.textfile(p), "textfile"),
    ],
)
def test_what_ppml_does_not_do_is_refused_clearly(sc, tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(sc, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bigdl_kms_arguments_are_mapped_or_refused(tmp_path, clean_env):
    with pytest.raises(ValueError, match="computed by anyone"):
        PPMLContext("a", {"kms_type": "SimpleKeyManagementService", "app_id": "1",
                          "api_key": "2", "primary_key_material": "k"})
    with pytest.raises(ValueError, match="primary_key_plaintext"):
        PPMLContext("a", {"primary_key_plaintext": "abc"})
    with pytest.raises(ValueError, match="kms_server_port"):
        PPMLContext("a", {"kms_type": "EHSMKeyManagementService", "kms_server_ip": "h"})
    with pytest.raises(ValueError, match="vault"):
        PPMLContext("a", {"kms_type": "EHSMKeyManagementService", "vault": "v"})
    with pytest.raises(ValueError, match="spark_conf"):
        PPMLContext("a", None, object())
