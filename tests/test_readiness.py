"""The readiness rule over every behaviour of llama-server builds we know."""

import json

import pytest

from rolemesh_node.readiness import readiness_verdict

LOADING = json.dumps({"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}).encode()
OK = b'{"status":"ok"}'


def models(*entries):
    return json.dumps({"object": "list", "data": list(entries)}).encode()


CASES = [
    ("b11434 while loading: 503 everywhere", 503, LOADING, 503, LOADING, False, "Loading model"),
    ("older build: /health 200 'loading model'", 200, b'{"status":"loading model"}', 200,
     models({"id": "m", "meta": None}), False, "loading model"),
    ("some builds: /v1/models 200 with meta null", 200, OK, 200, models({"id": "m", "meta": None}), False,
     "without meta"),
    ("ready", 200, OK, 200, models({"id": "m", "meta": {"n_vocab": 314}}), True, "ready"),
    ("another model listed", 200, OK, 200, models({"id": "other", "meta": {"n_vocab": 1}}), False,
     "does not list"),
    ("models not JSON", 200, OK, 200, b"<html>", False, "without a data list"),
    ("models 500", 200, OK, 500, b"{}", False, "answered 500"),
]


@pytest.mark.parametrize("why, hs, hb, ms, mb, ready, text", CASES, ids=[c[0] for c in CASES])
def test_verdict(why, hs, hb, ms, mb, ready, text):
    got, reason = readiness_verdict(hs, hb, ms, mb, "m")
    assert got is ready
    assert text in reason
