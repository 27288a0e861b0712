"""Type stubs of ppml's native module (crates/python)."""

from os import PathLike
from typing import Any, Literal, Optional, TypedDict, Union

import pyarrow

__version__: str

_Path = Union[str, PathLike[str]]

class PpmlError(Exception):
    """Base class of every error ppml raises."""

class InvalidInput(PpmlError):
    """Bad input data: tampered, truncated or reordered files, a dataset whose parts were
    removed, added or swapped, not a ppml file, malformed CSV, a quote that does not verify."""

class AccessDenied(PpmlError):
    """Wrong credentials, an unknown or foreign key, a key released only to attested
    runtimes, an attestation policy refusing the evidence."""

class WriteSummary(TypedDict):
    rows: int
    parts: int
    plaintext_bytes: int

class EncryptSummary(TypedDict):
    parts: int
    plaintext_bytes: int

class Frame:
    """The rows of a query, not yet run; an Arrow PyCapsule stream (``pyarrow.table(frame)``,
    ``polars.from_arrow(frame)``, DuckDB) that runs the query as it is read."""

    @property
    def schema(self) -> pyarrow.Schema: ...
    def __arrow_c_stream__(self, requested_schema: Optional[object] = None) -> object: ...
    def to_arrow(self) -> pyarrow.Table: ...
    def count(self) -> int: ...

class Context:
    """The KMS and keys of the environment and a DataFusion session over encrypted datasets;
    with ``tee`` and ``policy``, attested before it is returned."""

    def __init__(
        self,
        *,
        tee: Optional[Literal["sim", "sgx", "tdx"]] = None,
        policy: Optional[str] = None,
        primary_key: Optional[str] = None,
        output_key: Optional[str] = None,
        master: Optional[str] = None,
        tls_dir: Optional[_Path] = None,
        target_partitions: Optional[int] = None,
    ) -> None: ...
    @property
    def attested(self) -> bool: ...
    def read(self, path: str) -> Frame: ...
    def read_plaintext(self, path: _Path) -> Frame: ...
    def register(self, name: str, path: str) -> None: ...
    def register_plaintext(self, name: str, path: _Path) -> None: ...
    def sql(self, query: str) -> Frame: ...
    def write(
        self,
        data: Any,
        path: str,
        *,
        format: Literal["csv", "json", "parquet"] = "csv",
        key: Optional[str] = None,
        partitions: Optional[int] = None,
        overwrite: bool = False,
    ) -> WriteSummary: ...
    def encrypt(
        self, input: _Path, output: str, *, partitions: int = 1, overwrite: bool = False
    ) -> EncryptSummary: ...
    def decrypt(
        self, dataset: str, output: _Path, *, directory: bool = False, overwrite: bool = False
    ) -> int: ...

def generate_people(path: _Path, rows: int, *, seed: int = 0, overwrite: bool = False) -> int: ...
