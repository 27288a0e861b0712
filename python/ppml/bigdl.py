"""BigDL PPML's Python API (``bigdl.ppml.ppml_context``) on ppml.

A BigDL PPML script that uses ``PPMLContext``, ``CryptoMode``, ``sc.read(...)``,
``sc.write(...)`` and ``sc.sql(...)`` runs on ppml after one change, its import line::

    from ppml.bigdl import *          # was: from bigdl.ppml.ppml_context import *

    sc = PPMLContext("MyApp", ppml_args)
    df = sc.read(CryptoMode.AES_CBC_PKCS5PADDING).option("header", "true").csv(path)
    df.createOrReplaceTempView("people")
    sc.write(sc.sql("SELECT ..."), CryptoMode.AES_CBC_PKCS5PADDING) \\
        .mode("overwrite").option("header", True).csv(out)

What each BigDL argument becomes is in ``docs/python.md``. What is written is ppml's, not
BigDL's: an "encrypted" write is a ppml dataset, authenticated (AES-256-GCM segments, or
Parquet Modular Encryption ``AES_GCM_V1``), under keys from an eHSM-API KMS (ppml's server or
eHSM). An encrypted read takes a ppml dataset, or a dataset BigDL encrypted (CSV or JSON parts
and a ``.meta``), which is imported as ``ppml import bigdl`` imports it, every part's MAC
verified (``docs/migrating-from-bigdl.md``). What ppml cannot do as BigDL does it is refused
with ``ValueError``, never ignored: the simple KMS (its keys can be computed by anyone),
``AES_GCM_CTR_V1``, append mode, reader and writer options other than those listed in
``docs/python.md``.
"""

import json
import os
import shutil
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

from . import Context, Frame, PpmlError

__all__ = ["CryptoMode", "DataFrame", "PPMLContext"]


class CryptoMode(Enum):
    """BigDL's crypto modes, with BigDL's values."""

    #: Plaintext files.
    PLAIN_TEXT = "plain_text"
    #: BigDL's CSV and JSON encryption; in ppml, a ppml dataset of CSV or NDJSON.
    AES_CBC_PKCS5PADDING = "AES/CBC/PKCS5Padding"
    #: Parquet Modular Encryption, AES-GCM over every module (Parquet only).
    AES_GCM_V1 = "AES_GCM_V1"
    #: Parquet Modular Encryption with AES-CTR pages (Parquet only; not available in ppml).
    AES_GCM_CTR_V1 = "AES_GCM_CTR_V1"


def _mode(crypto_mode: Union[CryptoMode, str]) -> CryptoMode:
    if isinstance(crypto_mode, CryptoMode):
        return crypto_mode
    for mode in CryptoMode:
        if mode.value.lower() == str(crypto_mode).lower():
            return mode
    raise ValueError(
        f"unknown crypto mode {crypto_mode!r}: one of "
        + ", ".join(repr(m.value) for m in CryptoMode)
    )


def _truth(key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise ValueError(f"option {key!r}: {value!r} is not true or false")


# Spark's KMS settings of ppml_args, by kms_type, and the ones ppml has no use for.
_EHSM = "EHSMKeyManagementService"
_REFUSED_KMS = {
    "SimpleKeyManagementService": "its keys can be computed by anyone from the app id",
    "AzureKeyManagementService": "ppml speaks the eHSM API (ppml's KMS server or eHSM)",
    "BigDLKeyManagementService": "ppml speaks the eHSM API (ppml's KMS server or eHSM)",
}


def _context_arguments(ppml_args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """ppml.Context's keyword arguments for BigDL's ppml_args."""
    if not ppml_args:
        return {}
    args = dict(ppml_args)
    kms_type = args.pop("kms_type", "")
    if kms_type in _REFUSED_KMS:
        raise ValueError(f"kms_type {kms_type}: not supported: {_REFUSED_KMS[kms_type]}")
    if kms_type == "":
        raise ValueError(
            "ppml_args without kms_type (primary_key_plaintext, BigDL's no-KMS mode): ppml "
            "keeps primary keys in a KMS; give kms_type EHSMKeyManagementService, or no "
            "ppml_args to use the KMS of the environment"
        )
    if kms_type != _EHSM:
        raise ValueError(f"kms_type {kms_type!r}: unknown; ppml uses {_EHSM}")
    context: Dict[str, Any] = {}
    ip, port = args.pop("kms_server_ip", None), args.pop("kms_server_port", None)
    if (ip is None) != (port is None):
        raise ValueError("kms_server_ip and kms_server_port go together")
    if ip is not None:
        context["kms_url"] = f"https://{ip}:{port}"
    if "app_id" in args:
        context["appid"] = str(args.pop("app_id"))
    if "api_key" in args:
        context["apikey"] = str(args.pop("api_key"))
    material = args.pop("primary_key_material", None)
    if material is not None:
        # BigDL's eHSM primary key file: the key id on its first line. Data read and
        # written goes under that key, as in BigDL.
        with open(material, encoding="utf-8") as f:
            keyid = f.readline().strip()
        if not keyid:
            raise ValueError(f"primary_key_material {material}: no key id on its first line")
        context["primary_key"] = keyid
        context["output_key"] = keyid
    if args:
        raise ValueError(
            "ppml_args: not supported: " + ", ".join(sorted(args)) + " (docs/python.md)"
        )
    return context


class DataFrame:
    """A lazy query result, with the part of Spark's DataFrame API a BigDL script uses on
    what ``sc.read`` and ``sc.sql`` return. It is also an Arrow stream
    (``pyarrow.table(df)``)."""

    def __init__(self, frame: Frame, context: "PPMLContext"):
        self._frame = frame
        self._context = context

    @property
    def frame(self) -> Frame:
        """The ppml Frame behind it."""
        return self._frame

    def __arrow_c_stream__(self, requested_schema: Optional[object] = None) -> object:
        return self._frame.__arrow_c_stream__(requested_schema)

    @property
    def columns(self) -> List[str]:
        return list(self._frame.schema.names)

    @property
    def schema(self):
        """The pyarrow schema of the rows."""
        return self._frame.schema

    def createOrReplaceTempView(self, name: str) -> None:
        """Makes these rows the table ``name`` of ``sc.sql``."""
        self._frame.create_view(name)

    def filter(self, condition: str) -> "DataFrame":
        """Rows where the SQL condition holds (a string, as Spark takes it)."""
        if not isinstance(condition, str):
            raise ValueError("filter takes a SQL condition as a string in ppml")
        return DataFrame(self._frame.filter(condition), self._context)

    where = filter

    def select(self, *columns: str) -> "DataFrame":
        """The named columns (names, as strings)."""
        if not all(isinstance(c, str) for c in columns):
            raise ValueError("select takes column names as strings in ppml")
        return DataFrame(self._frame.select(*columns), self._context)

    def limit(self, n: int) -> "DataFrame":
        return DataFrame(self._frame.limit(n), self._context)

    def count(self) -> int:
        return self._frame.count()

    def show(self, n: int = 20) -> None:
        self._frame.show(n)

    def collect(self) -> List[Dict[str, Any]]:
        """The rows, as dicts (in memory)."""
        return self._frame.to_arrow().to_pylist()

    def toPandas(self):
        return self._frame.to_pandas()

    def toArrow(self):
        return self._frame.to_arrow()


class EncryptedDataFrameReader:
    """``sc.read(crypto_mode)``: options, then ``csv``, ``parquet`` or ``json``."""

    def __init__(self, context: "PPMLContext", mode: CryptoMode):
        self._context = context
        self._mode = mode
        self._header: Optional[bool] = None

    def option(self, key: str, value: Any) -> "EncryptedDataFrameReader":
        if key == "header":
            self._header = _truth(key, value)
        elif key == "inferSchema":
            if not _truth(key, value):
                raise ValueError(
                    "option inferSchema false: ppml always gives columns the types it infers"
                )
        elif key in ("sep", "delimiter"):
            if value != ",":
                raise ValueError(f"option {key} {value!r}: ppml reads comma-separated CSV")
        else:
            raise ValueError(f"option {key!r}: not supported by ppml's reader (docs/python.md)")
        return self

    def schema(self, value: Any) -> "EncryptedDataFrameReader":
        raise ValueError("schema(...): ppml infers the schema; cast columns in SQL instead")

    def _plaintext(self) -> bool:
        return self._mode is CryptoMode.PLAIN_TEXT

    def _encrypted(self, path: str, header: bool = True) -> str:
        """The ppml dataset to read for ``path``: ``path`` itself, or, for a dataset BigDL
        encrypted, its import (every part's MAC verified) into the context's directory of
        imports."""
        if self._mode is CryptoMode.AES_GCM_CTR_V1:
            raise ValueError(
                "AES_GCM_CTR_V1: not available (the Parquet library ppml uses has only "
                "AES_GCM_V1); ppml's Parquet datasets are AES_GCM_V1"
            )
        if os.path.isfile(os.path.join(path, ".meta")) and not os.path.isfile(
            os.path.join(path, "_manifest.ppml.json")
        ):
            return self._context._imported(path, header)
        return path

    def csv(self, path: str) -> DataFrame:
        if self._mode in (CryptoMode.AES_GCM_V1, CryptoMode.AES_GCM_CTR_V1):
            raise ValueError(f"{self._mode.value} is for Parquet only (as in BigDL)")
        if self._plaintext():
            frame = self._context.context.read_csv(
                path, plaintext=True, header=self._header is not False
            )
        else:
            dataset = self._encrypted(path, header=self._header is not False)
            if self._header is False and dataset == path:
                raise ValueError(
                    "option header false: a ppml dataset's manifest says whether its parts "
                    "have header lines"
                )
            frame = self._context.context.read_csv(dataset)
        return DataFrame(frame, self._context)

    def json(self, path: str) -> DataFrame:
        if self._mode in (CryptoMode.AES_GCM_V1, CryptoMode.AES_GCM_CTR_V1):
            raise ValueError(f"{self._mode.value} is for Parquet only (as in BigDL)")
        self._no_header("json")
        if not self._plaintext():
            path = self._encrypted(path)
        frame = self._context.context.read_json(path, plaintext=self._plaintext())
        return DataFrame(frame, self._context)

    def parquet(self, path: str) -> DataFrame:
        if self._mode is CryptoMode.AES_CBC_PKCS5PADDING:
            raise ValueError(
                "AES/CBC/PKCS5Padding is for CSV and JSON; encrypted Parquet is AES_GCM_V1"
            )
        self._no_header("parquet")
        if not self._plaintext():
            if self._encrypted(path) != path:
                raise ValueError(f"{path} holds BigDL CSV or JSON parts, not Parquet")
        frame = self._context.context.read_parquet(path, plaintext=self._plaintext())
        return DataFrame(frame, self._context)

    def _no_header(self, what: str) -> None:
        if self._header is not None:
            raise ValueError(f"option header: not an option of {what}")


class EncryptedDataFrameWriter:
    """``sc.write(df, crypto_mode)``: ``mode``, options, then ``csv``, ``parquet`` or
    ``json``."""

    support_mode = {"overwrite", "append", "ignore", "error", "errorifexists"}

    def __init__(self, context: "PPMLContext", data: Any, mode: CryptoMode):
        self._context = context
        self._data = data.frame if isinstance(data, DataFrame) else data
        self._mode = mode
        self._save_mode = "errorifexists"
        self._header = True
        self._partitions: Optional[int] = None

    def mode(self, mode: str) -> "EncryptedDataFrameWriter":
        if mode not in self.support_mode:
            raise ValueError(
                f"Unknown save mode: {mode}. Accepted save modes are 'overwrite', 'append', "
                "'ignore', 'error', 'errorifexists'."
            )
        if mode == "append":
            raise ValueError(
                "save mode append: a ppml dataset is written once, whole (its manifest "
                "names every part); write a new dataset, or overwrite"
            )
        self._save_mode = mode
        return self

    def option(self, key: str, value: Any) -> "EncryptedDataFrameWriter":
        if key == "header":
            self._header = _truth(key, value)
        elif key == "numPartitions":
            self._partitions = int(value)
        else:
            raise ValueError(f"option {key!r}: not supported by ppml's writer (docs/python.md)")
        return self

    def csv(self, path: str) -> Optional[Dict[str, int]]:
        return self._write(path, "csv")

    def json(self, path: str) -> Optional[Dict[str, int]]:
        return self._write(path, "json")

    def parquet(self, path: str) -> Optional[Dict[str, int]]:
        return self._write(path, "parquet")

    def _write(self, path: str, form: str) -> Optional[Dict[str, int]]:
        mode = self._mode
        if mode is CryptoMode.AES_GCM_CTR_V1:
            raise ValueError(
                "AES_GCM_CTR_V1: not available (the Parquet library ppml uses has only "
                "AES_GCM_V1); write AES_GCM_V1"
            )
        if mode is CryptoMode.AES_GCM_V1 and form != "parquet":
            raise ValueError("AES_GCM_V1 is for Parquet only (as in BigDL)")
        if mode is CryptoMode.AES_CBC_PKCS5PADDING and form == "parquet":
            raise ValueError(
                "AES/CBC/PKCS5Padding is for CSV and JSON; encrypted Parquet is AES_GCM_V1"
            )
        if form != "csv" and not self._header:
            raise ValueError(f"option header: not an option of {form}")
        if os.path.lexists(path) and self._save_mode == "ignore":
            return None
        overwrite = self._save_mode == "overwrite"
        if mode is CryptoMode.PLAIN_TEXT:
            return self._write_plaintext(path, form, overwrite)
        if not self._header:
            raise ValueError(
                "option header false: ppml's encrypted CSV parts always start with the header "
                "line (its manifest records the columns)"
            )
        return self._context.context.write(
            self._data, path, format=form, partitions=self._partitions, overwrite=overwrite
        )

    def _write_plaintext(self, path: str, form: str, overwrite: bool) -> Dict[str, int]:
        """Plaintext output, as BigDL's ``plain_text`` writes it: a directory with one part,
        streamed from the query, which appears (or replaces the old one) only when complete."""
        context = self._context.context
        if context.attested:
            raise ValueError(
                "plain_text output from an attested context: the rows would leave the TEE "
                "as plaintext; write them encrypted (the owner decrypts them)"
            )
        import pyarrow as pa

        if os.path.lexists(path) and not overwrite:
            raise PpmlError(f"{path} already exists: give mode('overwrite') to replace it")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            reader = pa.RecordBatchReader.from_stream(self._data)
            rows = _write_part(reader, staging / f"part-00000.{form}", form, self._header)
            if os.path.lexists(path):
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                os.replace(path, old / "x")
                os.replace(staging, path)
                shutil.rmtree(old)
            else:
                os.replace(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"rows": rows, "parts": 1}


def _write_part(reader, path: Path, form: str, header: bool) -> int:
    """Writes the batches of ``reader`` to one plaintext file, one batch at a time."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = 0
    if form == "csv":
        options = pacsv.WriteOptions(include_header=header)
        with pacsv.CSVWriter(str(path), reader.schema, write_options=options) as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
    elif form == "parquet":
        with pq.ParquetWriter(str(path), reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
    else:
        with open(path, "w", encoding="utf-8") as out:
            for batch in reader:
                for row in batch.to_pylist():
                    out.write(json.dumps(row, default=str))
                    out.write("\n")
                rows += batch.num_rows
    return rows


class PPMLContext:
    """BigDL's ``PPMLContext(app_name, ppml_args=None, spark_conf=None)`` on a
    ``ppml.Context``.

    ``ppml_args`` with ``kms_type`` ``EHSMKeyManagementService`` names the KMS
    (``kms_server_ip``, ``kms_server_port``, ``app_id``, ``api_key``) and the primary key
    (``primary_key_material``: the file whose first line is the key id); without
    ``ppml_args``, the KMS and keys of the environment, as ``ppml.Context()``. Keyword
    arguments go to ``ppml.Context`` (``tee``, ``policy``, ``master``, ...)."""

    def __init__(
        self,
        app_name: str,
        ppml_args: Optional[Mapping[str, Any]] = None,
        spark_conf: Any = None,
        **context_args: Any,
    ):
        if spark_conf is not None:
            raise ValueError(
                "spark_conf: ppml runs no Spark; give ppml.Context's arguments as keywords "
                "(target_partitions, master, tee, policy)"
            )
        self.app_name = app_name
        arguments = _context_arguments(ppml_args)
        arguments.update(context_args)
        self.context = Context(**arguments)
        self._imports: Optional[tempfile.TemporaryDirectory] = None
        self._imported_paths: Dict[Any, str] = {}

    def _imported(self, path: str, header: bool) -> str:
        """The ppml dataset imported from the BigDL dataset ``path`` (once per context). The
        import is ciphertext under the primary key, kept in a temporary directory that lives
        as long as this context."""
        key = (os.path.realpath(path), header)
        if key not in self._imported_paths:
            if self._imports is None:
                self._imports = tempfile.TemporaryDirectory(prefix="ppml-bigdl-imports-")
            target = os.path.join(self._imports.name, f"import-{len(self._imported_paths)}")
            self.context.import_bigdl(path, target, header=header)
            self._imported_paths[key] = target
        return self._imported_paths[key]

    def read(self, crypto_mode: Union[CryptoMode, str], primary_key_name: str = "defaultKey"):
        _default_key_only(primary_key_name)
        return EncryptedDataFrameReader(self, _mode(crypto_mode))

    def write(
        self,
        dataframe: Any,
        crypto_mode: Union[CryptoMode, str],
        primary_key_name: str = "defaultKey",
    ) -> EncryptedDataFrameWriter:
        _default_key_only(primary_key_name)
        return EncryptedDataFrameWriter(self, dataframe, _mode(crypto_mode))

    def sql(self, sqlText: str) -> DataFrame:
        return DataFrame(self.context.sql(sqlText), self)

    def textfile(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        raise ValueError(
            "textfile: ppml has no RDDs; read the file with sc.read(mode).csv/json/parquet"
        )


def _default_key_only(name: str) -> None:
    if name != "defaultKey":
        raise ValueError(
            f"primary_key_name {name!r}: ppml's PPMLContext has one primary key (the "
            "defaultKey of ppml_args); use ppml.Context's write(key=...) for others"
        )
