#!/usr/bin/env python3
"""A client that behaves as BigDL PPML's default attestation client, EHSMAttestationService,
does (docs/migrating-from-bigdl.md §3): VerifyQuote with the nonce "test" in an eHSM envelope
without a top-level nonce, TLS without certificate checks (as BigDL does), `sign` read as a
string and `result` as an int. Standard library only.

  bigdl_attestation_client.py URL APPID APIKEY QUOTE_B64 [POLICY_ID]

Prints "Attestation Success!" and exits 0 when the result is 0x0000 or 0xA000 (with a warning
for 0xA001/2/3/7/8, which pass too); prints "Attestation Fail! Application killed!" and exits 1
otherwise.
"""
import http.client
import json
import os
import ssl
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ehsm_sign import sign  # noqa: E402

PASS = {0x0000, 0xA000}
PASS_WITH_WARNING = {0xA001, 0xA002, 0xA003, 0xA007, 0xA008}


def post(url, action, body):
    parsed = urllib.parse.urlparse(url)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # BigDL's client trusts every certificate
    conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=context, timeout=10)
    conn.request("POST", f"/ehsm?Action={action}", json.dumps(body),
                 {"Content-Type": "application/json"})
    reply = json.loads(conn.getresponse().read())
    conn.close()
    return reply


def main(url, appid, apikey, quote, policy_id=None):
    payload = {"quote": quote, "nonce": "test"}
    if policy_id:
        payload["policyId"] = policy_id
    body = {"appid": appid, "payload": payload, "timestamp": str(int(time.time() * 1000))}
    body["sign"] = sign(apikey, body)
    reply = post(url, "VerifyQuote", body)
    result = reply["result"]
    signature = result["sign"]        # BigDL reads it as a string
    verdict = int(result["result"])   # and the result as an int
    assert isinstance(signature, str) and signature, reply
    if verdict in PASS:
        ok = True
    elif verdict in PASS_WITH_WARNING:
        print(f"warning: Attestation pass but BIOS or the software is out of date. Result={verdict}")
        ok = True
    else:
        ok = False
    print("Attestation Success!" if ok else "Attestation Fail! Application killed!")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
