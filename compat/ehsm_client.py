#!/usr/bin/env python3
"""Independent eHSM client (standard library only), written from docs/kms-api.md: runs
Enroll -> CreateKey -> GenerateDataKeyWithoutPlaintext -> Decrypt against a server and checks
every answer. Usage: ehsm_client.py http://127.0.0.1:PORT    (exit 0 on success)
"""
import json
import sys
import time
import urllib.request

from ehsm_sign import sign


def call(base, action, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{base}/ehsm?Action={action}", data=data,
        headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200, resp.status
        reply = json.loads(resp.read())
    assert reply["code"] == 200, f"{action}: {reply}"
    return reply["result"]


def signed(app, payload):
    body = {"appid": app["appid"], "payload": payload, "timestamp": str(int(time.time() * 1000)),
            "nonce": str(time.monotonic_ns())}
    body["sign"] = sign(app["apikey"], body)
    return body


def main(base):
    app = call(base, "Enroll")
    keyid = call(base, "CreateKey", signed(app, {"keyspec": "EH_AES_GCM_256", "origin": "EH_INTERNAL_KEY"}))["keyid"]
    wrapped = call(base, "GenerateDataKeyWithoutPlaintext", signed(app, {"keyid": keyid, "keylen": 32, "aad": "compat"}))["ciphertext"]
    plaintext = call(base, "Decrypt", signed(app, {"keyid": keyid, "ciphertext": wrapped, "aad": "compat"}))["plaintext"]
    import base64
    assert len(base64.b64decode(plaintext)) == 32
    print("compat OK")


if __name__ == "__main__":
    main(sys.argv[1])
