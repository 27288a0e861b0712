#!/usr/bin/env python3
"""An independent writer of BigDL PPML encrypted datasets, written from the facts in
docs/migrating-from-bigdl.md §1 (BigDL's own layout), not from ppml's reader. The test suite
uses it to make the BigDL datasets that `ppml import bigdl` must read.

  bigdl_writer.py --variant common|2.2|2.1|nativeaescbc --in FILE.csv --out DIR
                  [--parts N] [KEY SOURCE] [--iv HEX] [--data-key-file PATH]

KEY SOURCE is one of
  --kms URL FINGERPRINT APPID APIKEY KEYID   a data key from an eHSM-API KMS, as BigDL gets it:
                                             GenerateDataKeyWithoutPlaintext {keylen 32,
                                             aad "test"}, then Decrypt; the key string is the
                                             base64 text Decrypt answers
  --primary-key-plaintext BASE64             BigDL's no-KMS mode: a random key string, wrapped
                                             with AES/ECB/PKCS5 under the decoded primary key
  --data-key STRING [--wrapped TEXT]         a given key string (test vectors)

The input is split into N parts on line boundaries, as Spark writes them: CSV parts each start
with the header line; NDJSON input (.json, .jsonl, .ndjson) has none. Parts are named
part-0000i-<uuid>.csv.cbc (or .json.cbc); `common` and `nativeaescbc` datasets
get a .meta file {"encryptedDataKey": ...}; 2.1/2.2 wrote the wrapped key only to BigDL's
dataKey file (--data-key-file). 2.1/2.2 MAC the ciphertext without its final padding bytes, as
those versions did.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import struct
import sys
import time
import uuid

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BIGDL_AAD = "test"


def java_range(key_string, start, end):
    raw = key_string.encode()[start:end]
    return raw + bytes(end - start - len(raw))


def aes_cbc(key, iv, plaintext):
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def encrypt_part(variant, key_string, wrapped, iv, plaintext):
    if variant == "nativeaescbc":
        return iv + aes_cbc(base64.b64decode(key_string), iv, plaintext)
    mac_key = java_range(key_string, 0, 16)
    if variant == "common":
        aes_key = java_range(key_string, 16, 32)
        wrapped_bytes = wrapped.encode()
        header = struct.pack(">ii", len(wrapped_bytes), len(iv)) + wrapped_bytes + iv
        header += b"\x80" * (400 - len(header))
        ciphertext = aes_cbc(aes_key, iv, plaintext)
        return header + ciphertext + hmac.new(mac_key, ciphertext, hashlib.sha256).digest()
    aes_key = java_range(key_string, 16, 48 if variant == "2.1" else 32)
    header = b"\x80" + struct.pack(">q", int(time.time())) + iv
    ciphertext = aes_cbc(aes_key, iv, plaintext)
    mac = hmac.new(mac_key, ciphertext[:len(plaintext)], hashlib.sha256).digest()
    return header + ciphertext + mac


def split_lines(data, parts, header):
    """Splits on line boundaries into `parts` parts; CSV parts all start with the header."""
    first = b""
    if header:
        first, _, data = data.partition(b"\n")
        first += b"\n"
    lines = data.splitlines(keepends=True)
    size = -(-len(lines) // parts) if lines else 0
    chunks = [lines[i * size:(i + 1) * size] for i in range(parts)]
    return [first + b"".join(chunk) for chunk in chunks]


def ecb_wrap(primary_b64, key_string):
    padder = padding.PKCS7(128).padder()
    padded = padder.update(key_string.encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(base64.b64decode(primary_b64)), modes.ECB()).encryptor()
    return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, choices=["common", "2.2", "2.1", "nativeaescbc"])
    parser.add_argument("--in", dest="input", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--kms", nargs=5, metavar=("URL", "FINGERPRINT", "APPID", "APIKEY", "KEYID"))
    parser.add_argument("--primary-key-plaintext")
    parser.add_argument("--data-key")
    parser.add_argument("--wrapped", default="")
    parser.add_argument("--iv", help="hex; random per part when absent")
    parser.add_argument("--data-key-file", help="also write the wrapped data key here")
    args = parser.parse_args()

    if args.kms:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ehsm_tls import PpmlKms
        url, fingerprint, appid, apikey, keyid = args.kms
        kms = PpmlKms(url, fingerprint, appid, apikey)
        wrapped = kms.call("GenerateDataKeyWithoutPlaintext",
                           {"keyid": keyid, "keylen": 32, "aad": BIGDL_AAD})["ciphertext"]
        key_string = kms.call("Decrypt", {"keyid": keyid, "ciphertext": wrapped,
                                          "aad": BIGDL_AAD})["plaintext"]
    elif args.primary_key_plaintext:
        key_string = base64.b64encode(os.urandom(32)).decode()
        wrapped = ecb_wrap(args.primary_key_plaintext, key_string)
    elif args.data_key:
        key_string, wrapped = args.data_key, args.wrapped
    else:
        parser.error("one of --kms, --primary-key-plaintext, --data-key is needed")

    with open(args.input, "rb") as f:
        data = f.read()
    os.makedirs(args.out, exist_ok=True)
    job = uuid.uuid4()
    kind = "json" if args.input.endswith((".json", ".jsonl", ".ndjson")) else "csv"
    for index, plaintext in enumerate(split_lines(data, args.parts, header=kind == "csv")):
        iv = bytes.fromhex(args.iv) if args.iv else os.urandom(16)
        name = f"part-{index:05d}-{job}.{kind}.cbc"
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(encrypt_part(args.variant, key_string, wrapped, iv, plaintext))
    if args.variant in ("common", "nativeaescbc"):
        with open(os.path.join(args.out, ".meta"), "w") as f:
            json.dump({"encryptedDataKey": wrapped}, f)
    with open(os.path.join(args.out, "_SUCCESS"), "w"):
        pass
    if args.data_key_file:
        with open(args.data_key_file, "w") as f:
            f.write(wrapped)


if __name__ == "__main__":
    main()
