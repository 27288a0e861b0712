"""Signed eHSM calls to a KMS server over TLS pinned by the certificate's SHA-256 fingerprint
(standard library only, written from docs/kms-api.md), shared by the compat scripts."""
import hashlib
import http.client
import json
import ssl
import time
import urllib.parse

from ehsm_sign import sign


class PpmlKms:
    """Signed eHSM calls to one ppml KMS server, over TLS pinned by certificate fingerprint."""

    def __init__(self, url, fingerprint, appid, apikey):
        parsed = urllib.parse.urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.fingerprint = fingerprint
        self.appid, self.apikey = appid, apikey

    def call(self, action, payload):
        body = {"appid": self.appid, "payload": payload,
                "timestamp": str(int(time.time() * 1000)), "nonce": str(time.monotonic_ns())}
        body["sign"] = sign(self.apikey, body)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the certificate is pinned below instead
        conn = http.client.HTTPSConnection(self.host, self.port, context=context, timeout=10)
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)
        if "sha256:" + hashlib.sha256(der).hexdigest() != self.fingerprint:
            raise RuntimeError("the KMS certificate does not match the pinned fingerprint")
        conn.request("POST", f"/ehsm?Action={action}", json.dumps(body),
                     {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read())
        conn.close()
        if reply.get("code") != 200:
            raise RuntimeError(f"{action}: {reply}")
        return reply["result"]
