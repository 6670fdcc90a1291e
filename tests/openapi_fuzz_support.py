"""The test-only overlay of docs/openapi.yaml that schemathesis runs against, and its extra check.

Imported by ``tests/test_openapi_fuzz.py`` (which builds the overlay) and loaded by
the schemathesis CLI as its hooks file (``SCHEMATHESIS_HOOKS``), where it
registers :func:`sse_events_match_the_document`.

The overlay changes no promise of the document. It only

* names the test's models where a generator needs real values (``model`` of
  each proxied route, token ids below the tiny models' vocabulary size, the
  device ids of the logs route) — without that, nearly every generated request
  is a 404 and nothing reaches a ``llama-server``;
* drops what the run must not call: the operations that change the node or
  never end (``POST /v1/node/reload``; ``follow`` of the logs route, which
  streams until the node stops), listed in :data:`EXCLUDED`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

#: what the run leaves out, and why (the operations stay in the published document)
EXCLUDED = {
    ("POST", "/v1/node/reload"): "changes the node (reads its config file again)",
    ("GET", "/v1/node/devices/{device}/logs", "follow"): "follow=1 streams until the node stops",
}

#: the overlay's path, for the hooks side (set by the test in the CLI's environment)
OVERLAY_ENV = "ROLEMESH_FUZZ_OVERLAY"
#: where the hooks side notes each answer checked (one JSON line: method, path, status, content type)
SEEN_ENV = "ROLEMESH_FUZZ_SEEN"


def overlay(spec: dict[str, Any], *, generative: list[str], embedding: list[str], devices: list[str],
            n_vocab: int) -> dict[str, Any]:
    """A copy of ``spec`` narrowed to the test's models, devices and vocabulary (see the module docstring)."""
    doc = copy.deepcopy(spec)
    paths = doc["paths"]
    for (method, path, *param) in EXCLUDED:
        operation = paths[path][method.lower()]
        if param:
            operation["parameters"] = [p for p in operation["parameters"] if p["name"] != param[0]]
        else:
            del paths[path][method.lower()]
    schemas = doc["components"]["schemas"]
    for name, models in (("ChatCompletionRequest", generative), ("CompletionRequest", generative),
                         ("EmbeddingRequest", embedding)):
        schemas[name]["properties"]["model"] = {"type": "string", "enum": models}
    schemas["TokenId"]["maximum"] = n_vocab - 1
    for parameter in paths["/v1/node/devices/{device}/logs"]["get"]["parameters"]:
        if parameter["name"] == "device":
            parameter["schema"] = {"type": "string", "enum": devices}
    return doc


# ==========================================================================
# the hooks side: loaded by the schemathesis CLI


def _event_validators(doc: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """(METHOD, path) -> a validator of one SSE event's JSON, for every operation that documents a
    ``text/event-stream`` answer with an ``x-rolemesh-event-schema`` (read from the document, so a
    route added later is covered as it is documented)."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:doc", Resource.from_contents(doc, default_specification=DRAFT202012))
    out = {}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            response = operation["responses"].get("200", {})
            ref = response.get("$ref")
            if ref is not None:
                response = doc["components"]["responses"][ref.rsplit("/", 1)[1]]
            media = response.get("content", {}).get("text/event-stream", {})
            event = media.get("x-rolemesh-event-schema")
            if event is not None:
                out[(method.upper(), path)] = Draft202012Validator(
                    {"$ref": "urn:doc" + event["$ref"]}, registry=registry)
    error = Draft202012Validator({"$ref": "urn:doc#/components/schemas/Error"}, registry=registry)
    out[("error", "")] = error
    return out


def sse_data(body: bytes) -> list[str]:
    """The ``data`` of each event of a ``text/event-stream`` body (comment lines are not events)."""
    events, data = [], []
    for line in body.decode("utf-8").split("\n"):
        line = line.rstrip("\r")
        if not line:
            if data:
                events.append("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        events.append("\n".join(data))
    return events


def check_stream(validators: dict[tuple[str, str], Any], method: str, path: str, body: bytes,
                 complete: bool = True) -> None:
    """Every event is an event of the documented schema, but the last: ``[DONE]`` — or an
    ``Error`` event, which ends the stream. Raises AssertionError otherwise. ``complete=False``:
    the client read only the first events (schemathesis's ``max-stream-events``), so the end
    is not there to check."""
    validator = validators.get((method, path))
    assert validator is not None, f"{method} {path} answered an event stream it does not document"
    events = sse_data(body)
    assert events, "an event stream without events"
    if complete:
        last = events.pop()
        if last != "[DONE]":
            error = json.loads(last)
            assert isinstance(error, dict) and "error" in error, f"the stream ends without [DONE]: {last[:200]}"
            validators[("error", "")].validate(error)
    for data in events:
        assert data != "[DONE]", "[DONE] before the end of the stream"
        validator.validate(json.loads(data))


def whole_numbers_as_integers(value: Any) -> Any:
    """``value`` with every float that is a whole number written as an integer.

    JSON Schema counts ``106.0`` as an integer, and the generator may write it so;
    ``llama-server`` (nlohmann::json) reads it as a float and refuses it where it
    wants a token id. Same value, another spelling: the document says so
    (``TokenId``), and the run sends integers as clients do.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [whole_numbers_as_integers(v) for v in value]
    if isinstance(value, dict):
        return {k: whole_numbers_as_integers(v) for k, v in value.items()}
    return value


def _register() -> None:
    import schemathesis

    @schemathesis.hook
    def map_body(context: Any, body: Any) -> Any:
        return whole_numbers_as_integers(body)

    doc = json.loads(Path(os.environ[OVERLAY_ENV]).read_text(encoding="utf-8"))
    validators = _event_validators(doc)

    seen = open(os.environ[SEEN_ENV], "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life

    @schemathesis.check
    def sse_events_match_the_document(ctx: Any, response: Any, case: Any) -> bool | None:
        content_type = (response.headers.get("content-type") or [""])[0]
        method, path = case.operation.method.upper(), case.operation.path
        seen.write(json.dumps([method, path, response.status_code, content_type.split(";")[0]]) + "\n")
        seen.flush()
        if not content_type.startswith("text/event-stream"):
            return None
        check_stream(validators, method, path, response.content, complete=not response.stream_cut_short)
        return True


if OVERLAY_ENV in os.environ and __name__ != "openapi_fuzz_support":
    _register()
