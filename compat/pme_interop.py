#!/usr/bin/env python3
"""pyarrow and ppml's encrypted Parquet, both ways (docs/file-format.md §12), written from the
docs only: a pyarrow KmsClient that wraps and unwraps Parquet data keys with ppml's KMS server
over its eHSM API (docs/kms-api.md), pinned to the server certificate's fingerprint.

  pme_interop.py read  URL FINGERPRINT APPID APIKEY FILE...
      Reads Parquet files ppml wrote (PME) and prints their rows as CSV (header first).
  pme_interop.py write URL FINGERPRINT APPID APIKEY KEYID AAD IN.csv OUT.parquet [COLUMN=KEYID...]
      Writes IN.csv as one PME Parquet file: footer and columns under KEYID, the named columns
      under keys of their own; data keys are 256-bit and single-wrapped, bound to AAD.
"""
import base64
import struct
import sys

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from ehsm_tls import PpmlKms

WRAPPED_KEY_VERSION = 1


class PpmlKmsClient(pe.KmsClient):
    """wrappedDEK = base64(0x01 || u16-BE len(aad) || aad || eHSM ciphertext)."""

    def __init__(self, kms, aad):
        super().__init__()
        self.kms, self.aad = kms, aad

    def wrap_key(self, key_bytes, master_key_identifier):
        ciphertext = self.kms.call("Encrypt", {
            "keyid": master_key_identifier,
            "plaintext": base64.b64encode(key_bytes).decode(),
            "aad": self.aad})["ciphertext"]
        aad = self.aad.encode()
        raw = bytes([WRAPPED_KEY_VERSION]) + struct.pack(">H", len(aad)) + aad + ciphertext.encode()
        return base64.b64encode(raw).decode()

    def unwrap_key(self, wrapped_key, master_key_identifier):
        raw = base64.b64decode(wrapped_key)
        if raw[0] != WRAPPED_KEY_VERSION:
            raise ValueError("not a ppml wrapped key")
        (aad_len,) = struct.unpack(">H", raw[1:3])
        aad, ciphertext = raw[3:3 + aad_len].decode(), raw[3 + aad_len:].decode()
        plaintext = self.kms.call("Decrypt", {
            "keyid": master_key_identifier, "ciphertext": ciphertext, "aad": aad})["plaintext"]
        return base64.b64decode(plaintext)


def crypto_factory(kms, aad=""):
    return pe.CryptoFactory(lambda _config: PpmlKmsClient(kms, aad))


def read(kms, files):
    factory = crypto_factory(kms)
    config = pe.DecryptionConfiguration()
    connection = pe.KmsConnectionConfig()
    tables = []
    for path in files:
        properties = factory.file_decryption_properties(connection, config)
        tables.append(pq.read_table(path, decryption_properties=properties))
    sink = sys.stdout.buffer
    for i, table in enumerate(tables):
        options = pacsv.WriteOptions(include_header=(i == 0))
        pacsv.write_csv(table, sink, write_options=options)


def write(kms, footer_key, aad, csv_path, out, column_keys):
    table = pacsv.read_csv(csv_path)
    columns = {}
    for spec in column_keys:
        column, key = spec.split("=", 1)
        columns.setdefault(key, []).append(column)
    # Every column encrypted: those without a key of their own under the footer key.
    keyed = {c for cs in columns.values() for c in cs}
    rest = [name for name in table.column_names if name not in keyed]
    if rest:
        columns.setdefault(footer_key, []).extend(rest)
    config = pe.EncryptionConfiguration(
        footer_key=footer_key, column_keys=columns, encryption_algorithm="AES_GCM_V1",
        double_wrapping=False, data_key_length_bits=256, plaintext_footer=False)
    properties = crypto_factory(kms, aad).file_encryption_properties(
        pe.KmsConnectionConfig(), config)
    pq.write_table(table, out, encryption_properties=properties)


def main(argv):
    if len(argv) >= 6 and argv[1] == "read":
        read(PpmlKms(*argv[2:6]), argv[6:])
    elif len(argv) >= 10 and argv[1] == "write":
        write(PpmlKms(*argv[2:6]), argv[6], argv[7], argv[8], argv[9], argv[10:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
