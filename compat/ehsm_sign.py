#!/usr/bin/env python3
"""Independent implementation of eHSM request signing (standard library only), written from
docs/kms-api.md, used to cross-check ppml's implementation.

Usage: ehsm_sign.py APIKEY < body.json   -> prints the base64 signature
"""
import base64
import hashlib
import hmac
import json
import sys


def js_string(value):
    """The text eHSM's JavaScript server uses for a value, or None to skip it (value != '')."""
    if value is None or value is False:
        return None
    if value is True:
        return "true"
    if isinstance(value, (int, float)):
        if value == 0:
            return None
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        return canonical({str(i): v for i, v in enumerate(value)})
    if isinstance(value, dict):
        return canonical(value)
    raise TypeError(type(value))


def canonical(obj):
    parts = []
    for key in sorted(obj, key=lambda k: k.encode()):
        if key == "sign" and obj is TOP[0]:
            continue
        text = js_string(obj[key])
        if text is not None:
            parts.append(f"{key}={text}")
    return "&".join(parts)


TOP = [None]


def sign(apikey, body):
    TOP[0] = body
    message = canonical(body).encode()
    return base64.b64encode(hmac.new(apikey.encode(), message, hashlib.sha256).digest()).decode()


if __name__ == "__main__":
    print(sign(sys.argv[1], json.load(sys.stdin)))
