#!/usr/bin/env python3
"""An emulation of eHSM-KMS's REST API, written from the facts in docs/migrating-from-bigdl.md
§2 (eHSM's validation and signing rules), to test ppml as a client of a real eHSM. Two
versions differ where clients notice:

  0.3.2  (what BigDL deploys) signs {appid, timestamp, payload}: a request that also carries a
         nonce fails with "sign error"; aad is bound as text; payloads are not validated.
  main   signs {appid, nonce, timestamp, payload}; keyid must be a lowercase UUID; aad must be
         base64 and its decoded bytes are bound; keylen 1..1024; CreateKey needs keyusage.

Usage: ehsm_emulator.py --version 0.3.2|main     (plain HTTP on 127.0.0.1; prints the URL)
Keys live in memory only. This is a test double, not a KMS.
"""
import argparse
import base64
import binascii
import json
import os
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ehsm_sign import sign  # noqa: E402

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
WINDOW_MS = 10 * 60 * 1000


class Refused(Exception):
    def __init__(self, message, code=400):
        super().__init__(message)
        self.message, self.code = message, code


class Ehsm:
    def __init__(self, version):
        self.version = version
        self.apps = {}            # appid -> apikey
        self.keys = {}            # keyid -> (appid, key bytes, enabled)
        self.seen = {}            # replay id -> time
        self.lock = threading.Lock()

    def main(self):
        return self.version != "0.3.2"

    # --- envelope --------------------------------------------------------------------------
    def check_envelope(self, body):
        for field in ("appid", "timestamp", "sign"):
            if not body.get(field):
                raise Refused(f"Missing required parameters, The {field} cannot be empty.")
        appid, timestamp = body["appid"], body["timestamp"]
        if appid not in self.apps:
            raise Refused("appid error")
        if len(timestamp) != 13:
            raise Refused("Timestamp length error")
        if not timestamp.isdigit() or abs(int(timestamp) - int(time.time() * 1000)) > WINDOW_MS:
            raise Refused("Timestamp error")
        signed = ("appid", "nonce", "timestamp", "payload") if self.main() else \
            ("appid", "timestamp", "payload")
        expected = sign(self.apps[appid], {k: body[k] for k in signed if k in body})
        if expected != body["sign"]:
            raise Refused("sign error")
        replay = (appid, timestamp, body.get("nonce") if self.main() else None)
        now = time.time()
        with self.lock:
            self.seen = {k: t for k, t in self.seen.items() if now - t < 2 * WINDOW_MS / 1000}
            if replay in self.seen:
                raise Refused("Timestamp can't be repeated in 20 minutes")
            self.seen[replay] = now
        return appid, body.get("payload") or {}

    # --- payload rules ---------------------------------------------------------------------
    def key_of(self, appid, payload):
        keyid = payload.get("keyid")
        if not keyid:
            raise Refused("Missing required parameters, The keyid cannot be empty.")
        if self.main() and not UUID.match(keyid):
            raise Refused("Parameter invalid, The keyid must be a lowercase uuid.")
        entry = self.keys.get(keyid)
        if entry is None or entry[0] != appid:
            raise Refused("keyid error")
        if not entry[2]:
            raise Refused("keyid is disabled")
        return keyid, entry[1]

    def aad_of(self, payload):
        aad = payload.get("aad", "")
        if not self.main():
            return aad.encode()
        try:
            return base64.b64decode(aad, validate=True)
        except binascii.Error:
            raise Refused("Parameter invalid, The aad not a vailed base64 string.")

    def keylen_of(self, payload):
        keylen = payload.get("keylen")
        try:
            keylen = int(keylen)
        except (TypeError, ValueError):
            raise Refused("Missing required parameters, The keylen cannot be empty.")
        if self.main() and not 1 <= keylen <= 1024:
            raise Refused("Parameter invalid, The keylen must be between 1 and 1024.")
        return keylen

    @staticmethod
    def seal(key, aad, plaintext):
        nonce = os.urandom(12)
        return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, plaintext, aad)).decode()

    @staticmethod
    def open(key, aad, ciphertext):
        try:
            raw = base64.b64decode(ciphertext, validate=True)
            return AESGCM(key).decrypt(raw[:12], raw[12:], aad)
        except Exception:
            raise Refused("Decryption failed, Please confirm that your parameters are correct.")

    # --- actions ---------------------------------------------------------------------------
    def unsigned(self, action):
        if action == "GetVersion":
            return "success!", {"version": "0.3.2" if not self.main() else "1.1.0",
                                "git_sha": "emulated"}
        if action == "Enroll":
            appid, apikey = str(uuid.uuid4()), base64.b64encode(os.urandom(24)).decode()
            self.apps[appid] = apikey
            return "successful", {"appid": appid, "apikey": apikey}
        raise Refused("API Not Found", 404)

    def signed(self, action, body):
        appid, payload = self.check_envelope(body)
        if action == "CreateKey":
            for field in ("keyspec", "origin") + (("keyusage",) if self.main() else ()):
                if not payload.get(field):
                    raise Refused(f"Missing required parameters, The {field} cannot be empty.")
            keyid = str(uuid.uuid4())
            self.keys[keyid] = (appid, os.urandom(32), True)
            return "success!", {"keyid": keyid}
        if action in ("GenerateDataKey", "GenerateDataKeyWithoutPlaintext"):
            _, key = self.key_of(appid, payload)
            aad, keylen = self.aad_of(payload), self.keylen_of(payload)
            data_key = os.urandom(keylen)
            result = {"ciphertext": self.seal(key, aad, data_key)}
            if action == "GenerateDataKey":
                result["plaintext"] = base64.b64encode(data_key).decode()
            return "success!", result
        if action == "Encrypt":
            _, key = self.key_of(appid, payload)
            plaintext = base64.b64decode(payload.get("plaintext", ""))
            return "success!", {"ciphertext": self.seal(key, self.aad_of(payload), plaintext)}
        if action == "Decrypt":
            _, key = self.key_of(appid, payload)
            plaintext = self.open(key, self.aad_of(payload), payload.get("ciphertext", ""))
            return "success!", {"plaintext": base64.b64encode(plaintext).decode()}
        if action == "ListKey":
            return "successful", {"list": [
                {"keyid": k, "creationDate": 0, "expireTime": 0, "alias": "",
                 "keyspec": "EH_AES_GCM_256", "keyState": int(v[2])}
                for k, v in self.keys.items() if v[0] == appid]}
        raise Refused("API Not Found", 404)


def handler(ehsm):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, code, message, result):
            data = json.dumps({"code": code, "message": message, "result": result}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def action(self):
            return parse_qs(urlparse(self.path).query).get("Action", [""])[0]

        def do_GET(self):
            try:
                message, result = ehsm.unsigned(self.action())
                self.answer(200, message, result)
            except Refused as e:
                self.answer(e.code, e.message, {})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            try:
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    raise Refused("Invalid JSON")
                if not isinstance(body, dict):
                    raise Refused("Invalid JSON")
                message, result = ehsm.signed(self.action(), body)
                self.answer(200, message, result)
            except Refused as e:
                self.answer(e.code, e.message, {})
            except Exception:
                self.answer(500, "Server exception.", {})
    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, choices=["0.3.2", "main"])
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(Ehsm(args.version)))
    print(f"listening http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
