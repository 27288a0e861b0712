"""schemathesis hooks for ppml's KMS (docs/kms-openapi.yaml), loaded with
SCHEMATHESIS_HOOKS=schemathesis_hooks (this directory on PYTHONPATH).

- Most generated bodies of POST /ehsm are signed for a real app (PPML_TEST_APPID and
  PPML_TEST_APIKEY), with a fresh timestamp and nonce and `action` naming `?Action=`, so that
  the random payloads reach the actions' own validation instead of stopping at `sign error`.
  The rest keep their generated (wrong) envelope fields.
- The check `ehsm_no_server_fault` fails on an HTTP 200 answer that is not JSON or whose eHSM
  `code` is 500: the KMS answers /ehsm requests with HTTP 200 and the fault in the body, so
  schemathesis's own `not_a_server_error` sees only transport-level faults.
"""
import itertools
import json
import os
import random
import threading
import time

import schemathesis

from ehsm_sign import sign

APPID = os.environ.get("PPML_TEST_APPID", "")
APIKEY = os.environ.get("PPML_TEST_APIKEY", "")
_counter = itertools.count()
_lock = threading.Lock()
_choice = random.Random(int(os.environ.get("PPML_TEST_SEED", "1")))


@schemathesis.hook
def map_case(context, case):
    if case.method.upper() != "POST" or case.path != "/ehsm" or not APPID:
        return case
    body = case.body
    if not isinstance(body, dict) or "sign" not in body:
        return case
    with _lock:
        n = next(_counter)
        sign_it = _choice.random() < 0.8
    if not sign_it:
        return case
    body = dict(body)
    body["appid"] = APPID
    body["timestamp"] = str(int(time.time() * 1000))
    body["nonce"] = f"{time.time_ns()}-{n}"
    body.pop("owner_sign", None)
    action = (case.query or {}).get("Action")
    if isinstance(action, str):
        body["action"] = action
    else:
        body.pop("action", None)
    body.pop("sign", None)
    body["sign"] = sign(APIKEY, body)
    case.body = body
    return case


@schemathesis.check
def ehsm_no_server_fault(ctx, response, case):
    # Other statuses are HTTP's own answers (405 for a method /ehsm does not serve); 5xx are
    # not_a_server_error's.
    if case.path != "/ehsm" or response.status_code != 200:
        return None
    try:
        answer = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"/ehsm answered something that is not JSON: {response.content[:200]!r}")
    if isinstance(answer, dict) and answer.get("code") == 500:
        raise AssertionError(f"server fault: {answer.get('message')!r}")
    return None
