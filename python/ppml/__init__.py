"""ppml: privacy-preserving analytics over encrypted data, from Python.

Data owners encrypt their data under keys held by a key management service (KMS); queries run
with Apache DataFusion directly on the encrypted datasets, inside attested runtimes when the
keys demand it; results are written as new encrypted datasets that only their owner can read.

    import ppml, pyarrow as pa

    ctx = ppml.Context()                        # the KMS and keys of the environment
    ctx.encrypt("people.csv", "people.enc")     # a file becomes an encrypted dataset
    ctx.register("people", "people.enc")
    developers = ctx.sql("SELECT name, age FROM people WHERE job = 'Developer'")
    table = pa.table(developers)                # or polars.DataFrame(frame), duckdb, ...
    ctx.write(developers, "developers.enc")     # encrypted under the output key

The KMS and keys come from the same environment variables, ``ppml.toml`` and ``$PPML_HOME``
as the ``ppml`` command (``docs/python.md``). Every call that waits releases the GIL, and
Ctrl-C cancels it. Errors are ``PpmlError``: bad input raises ``InvalidInput`` (tampered data
its subclass ``TamperedData``), refused keys ``AccessDenied`` (failed attestation its subclass
``AttestationFailed``). BigDL PPML scripts run with ``from ppml.bigdl import *``.
"""

from ._ppml import (
    AccessDenied,
    AttestationFailed,
    Context,
    Frame,
    InvalidInput,
    PpmlError,
    TamperedData,
    __version__,
    generate_people,
    sim_measurement,
)

__all__ = [
    "AccessDenied",
    "AttestationFailed",
    "Context",
    "Frame",
    "InvalidInput",
    "PpmlError",
    "TamperedData",
    "__version__",
    "generate_people",
    "sim_measurement",
]
