"""Type stubs of ppml's native module (crates/python)."""

from os import PathLike
from typing import Any, List, Literal, Optional, TypedDict, Union

import pyarrow

__version__: str

_Path = Union[str, PathLike[str]]

class PpmlError(Exception):
    """Base class of every error ppml raises."""

class InvalidInput(PpmlError):
    """Bad input: not a ppml file, malformed CSV, a dataset read as the wrong format, a quote
    that does not verify; and, as TamperedData, data that fails its authentication."""

class TamperedData(InvalidInput):
    """Data that fails its authentication: a modified, truncated or reordered file, a dataset
    whose parts were removed, added, swapped or changed, an edited manifest."""

class AccessDenied(PpmlError):
    """Wrong credentials, an unknown or foreign key, a key released only to attested
    runtimes, a job or output the owner's grant does not name; and, as AttestationFailed,
    evidence the KMS's policy refuses."""

class AttestationFailed(AccessDenied):
    """This context's evidence was refused by the KMS's policy or could not be made, or the
    KMS's own evidence did not satisfy this side's policy."""

class WriteSummary(TypedDict):
    rows: int
    parts: int
    plaintext_bytes: int

class EncryptSummary(TypedDict):
    parts: int
    plaintext_bytes: int

class Frame:
    """The rows of a query, not yet run; an Arrow PyCapsule stream (``pyarrow.table(frame)``,
    ``polars.DataFrame(frame)``, DuckDB) that runs the query as it is read."""

    @property
    def schema(self) -> pyarrow.Schema: ...
    def __arrow_c_stream__(self, requested_schema: Optional[object] = None) -> object: ...
    def to_arrow(self) -> pyarrow.Table: ...
    def to_pandas(self) -> Any: ...
    def collect(self) -> List[pyarrow.RecordBatch]: ...
    def count(self) -> int: ...
    def show(self, n: int = 20) -> None: ...
    def filter(self, condition: str) -> Frame: ...
    def select(self, *columns: str) -> Frame: ...
    def limit(self, n: int) -> Frame: ...
    def create_view(self, name: str) -> None: ...

class Context:
    """The KMS and keys of the environment and a DataFusion session over encrypted datasets;
    with ``tee`` and ``policy``, attested before it is returned."""

    def __init__(
        self,
        *,
        tee: Optional[Literal["sim", "sgx", "tdx"]] = None,
        policy: Optional[str] = None,
        grant: Optional[_Path] = None,
        sim_platform_key: Optional[_Path] = None,
        kms_url: Optional[str] = None,
        appid: Optional[str] = None,
        apikey: Optional[str] = None,
        home: Optional[_Path] = None,
        config: Optional[_Path] = None,
        primary_key: Optional[str] = None,
        output_key: Optional[str] = None,
        master: Optional[str] = None,
        tls_dir: Optional[_Path] = None,
        target_partitions: Optional[int] = None,
    ) -> None: ...
    @property
    def attested(self) -> bool: ...
    def read(self, path: str) -> Frame: ...
    def read_csv(self, path: str, *, plaintext: bool = False, header: bool = True) -> Frame: ...
    def read_parquet(self, path: str, *, plaintext: bool = False) -> Frame: ...
    def read_json(self, path: str, *, plaintext: bool = False) -> Frame: ...
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
    def import_bigdl(
        self,
        input: _Path,
        output: str,
        *,
        bigdl_key: Optional[str] = None,
        header: bool = True,
        overwrite: bool = False,
    ) -> EncryptSummary: ...
    def decrypt(
        self, dataset: str, output: _Path, *, directory: bool = False, overwrite: bool = False
    ) -> int: ...

def generate_people(path: _Path, rows: int, *, seed: int = 0, overwrite: bool = False) -> int: ...
def sim_measurement() -> str: ...
