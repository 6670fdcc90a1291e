"""Malformed requests, table-driven, against a real node and the real llama-server.

Every request of :data:`CASES` is written byte for byte onto a fresh loopback
socket (from a worker thread: the node runs on this reactor), so that what no
sane client would send — non-UTF-8 paths, conflicting ``Content-Length``s, a
CR inside a header, a chunked body that lies about its size — can be sent too.

Each case says which statuses are acceptable:

* the node's own refusals: one 4xx, and (``code``) the OpenAI error document
  ``{"error": {"message", "type", "code"}}`` with that code;
* HTTP-level garbage answered by Twisted before any resource sees it: a 4xx
  with whatever body Twisted writes (``code=None``);
* requests valid enough to reach the llama-server (``child=True``): the
  node relays the child's answer, which must be 200 or a 4xx — never a 5xx.

After the whole table the node must still serve: ``/health`` answers, a normal
chat completion succeeds, no slot holds a request (``pending == 0``, and the
inventory agrees), no connection is left open on the node's side.

Nothing may be logged at error level meanwhile (the autouse check): a request
that escapes the resource (as a deeply nested body once did, with a
``RecursionError``) would be logged as an unhandled error and answered 500.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.test_supervisor_real import eventually

pytestmark = pytest.mark.llama

BODY_LIMIT = 64 * 1024  # max_request_body_bytes of the node under test
MESSAGES = [{"role": "user", "content": "hi"}]
ERROR_KEYS = {"message", "type", "code"}
NEW_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
ANY_4XX = frozenset(range(400, 500))
CHILD_OK = frozenset({200}) | ANY_4XX


def node_config(tiny_models: dict[str, Path], **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backend": "cpu",
        "llama_server_startup_timeout_s": 20,
        "max_request_body_bytes": BODY_LIMIT,
        "max_pending_requests_per_device": 4,
        "request_timeout_s": 30,
        "models": {
            # small context: max_tokens -1 ("until the context is full") stays short
            "tiny-a": {"path": tiny_models["tiny-a"], "ctx_size": 256, "aliases": ["tiny"]},
            "tiny-embed": {"path": tiny_models["tiny-a"], "ctx_size": 256, "embedding": True},
        },
    }
    config.update(extra)
    return config


# --------------------------------------------------------------------------
# raw HTTP over a socket (blocking: run it in a thread)


@dataclass
class Answer:
    status: int | None  # None: nothing came back before the connection closed or the wait ended
    headers: dict[str, list[str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def raw_exchange(port: int, data: bytes, wait_s: float = 15.0, silent_after_s: float | None = None) -> Answer:
    """Send ``data`` on a fresh connection; read until the server closes it.

    ``silent_after_s``: expect no answer — stop reading after that long and
    close the connection from this side.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait_s)
    chunks: list[bytes] = []
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (and closed): read what it said
        deadline = time.monotonic() + (silent_after_s if silent_after_s is not None else wait_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if silent_after_s is None:
                    raise TimeoutError(f"no end of the answer within {wait_s}s: {b''.join(chunks)[:300]!r}")
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    return parse_answer(b"".join(chunks))


def parse_answer(raw: bytes) -> Answer:
    """The first final (non-1xx) response in ``raw``."""
    rest = raw
    while rest:
        head, sep, after = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower().decode("latin-1"), []).append(value.strip().decode("latin-1"))
        if 100 <= status < 200:
            rest = after
            continue
        if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
            body = dechunk(after)
        elif "content-length" in headers:
            body = after[:int(headers["content-length"][0])]
        else:
            body = after
        return Answer(status, headers, body, raw)
    return Answer(None, {}, b"", raw)


def dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2:]
    return b"".join(out)


# --------------------------------------------------------------------------
# building requests


def request(method: str | bytes = "POST", path: str | bytes = "/v1/chat/completions", body: bytes | None = b"",
            headers: list[tuple[str | bytes, str | bytes]] | None = None, *, content_type: bool = True,
            content_length: bool = True, raw_headers: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    """One HTTP/1.1 request as bytes (``Connection: close``, so the answer ends with EOF)."""

    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else x.encode("latin-1")

    lines = [b(method) + b" " + b(path) + b" " + version, b"Host: 127.0.0.1", b"Connection: close"]
    if content_type:
        lines.append(b"Content-Type: application/json")
    if content_length and body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    for name, value in headers or []:
        lines.append(b(name) + b": " + b(value))
    return b"\r\n".join(lines) + b"\r\n" + raw_headers + b"\r\n" + (body or b"")


def chat(**fields: Any) -> bytes:
    doc: dict[str, Any] = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 2}
    doc.update(fields)
    return json.dumps(doc).encode()


def chat_with(raw_field: bytes) -> bytes:
    """A chat body with ``raw_field`` (``"name": value`` as raw JSON text) added."""
    return b'{"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], ' + raw_field + b"}"


def chunked(body: bytes, size: int = 1000) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    status: frozenset[int]
    code: str | None = None  # the node's own error: check the OpenAI document and this code
    child: bool = False  # reaches the llama-server (status is the child's, relayed)
    silent: bool = False  # no answer expected (incomplete request): the client gives up
    check: Any = None  # extra assertion on the Answer


def node_error(id: str, data: bytes, status: int, code: str, check: Any = None) -> Case:
    return Case(id, data, frozenset({status}), code, check=check)


def reaches_child(id: str, data: bytes, status: frozenset[int] = CHILD_OK, check: Any = None) -> Case:
    return Case(id, data, status, child=True, check=check)


def protocol_error(id: str, data: bytes) -> Case:
    """Refused by the HTTP layer before the node's resources see it."""
    return Case(id, data, ANY_4XX)


def no_evil_header(answer: Answer) -> None:
    assert "x-evil" not in answer.headers, answer.headers


def fresh_request_id(answer: Answer) -> None:
    no_evil_header(answer)
    rid = answer.header("x-request-id")
    assert rid is not None and NEW_REQUEST_ID.match(rid), f"x-request-id {rid!r} was not replaced"


def echoed_request_id(answer: Answer) -> None:
    assert answer.header("x-request-id") == "abc-123.X:9"


def short_message(answer: Answer) -> None:
    assert len(answer.body) < 2000, f"the error echoes too much: {len(answer.body)} bytes"


def post(body: bytes, path: str = "/v1/chat/completions", **kwargs: Any) -> bytes:
    return request("POST", path, body, **kwargs)


def build_cases(model_file: Path) -> list[Case]:
    huge_padding = json.dumps({"model": "tiny-a", "messages": MESSAGES, "pad": "x" * (4 * BODY_LIMIT)}).encode()
    valid = chat()
    return [
        # ------------------------------------------------ not JSON / not an object
        node_error("not-json", post(b"{not json"), 400, "invalid_json"),
        node_error("empty-body", post(b""), 400, "invalid_json"),
        node_error("truncated-json", post(b'{"model": "tiny-a", "messages": ['), 400, "invalid_json"),
        node_error("trailing-garbage", post(b'{"model": "tiny-a"} xyz'), 400, "invalid_json"),
        node_error("non-utf8-body", post(b'{"model": "tiny-a\xff\xfe", "messages": []}'), 400, "invalid_json"),
        node_error("non-utf8-in-content", post(b'{"model": "tiny-a", "messages": [{"role": "user", '
                                                b'"content": "h\xc3("}]}'), 400, "invalid_json"),
        node_error("gzip-body-not-decoded", post(gzip.compress(valid), headers=[("Content-Encoding", "gzip")]),
                   400, "invalid_json"),
        # nested beyond Python's recursion limit (json raises RecursionError, not ValueError)
        node_error("deeply-nested-array", post(b"[" * 50000), 400, "invalid_json"),
        node_error("deeply-nested-object", post(b'{"a": ' * 10000), 400, "invalid_json"),
        node_error("deeply-nested-inside-a-valid-request",
                   post(chat_with(b'"x": ' + b"[" * 5000 + b"]" * 5000)), 400, "invalid_json"),
        node_error("top-level-array", post(b"[1, 2]"), 400, "invalid_request"),
        node_error("top-level-string", post(b'"tiny-a"'), 400, "invalid_request"),
        node_error("top-level-number", post(b"5"), 400, "invalid_request"),
        node_error("top-level-null", post(b"null"), 400, "invalid_request"),
        # ------------------------------------------------ the model field
        node_error("model-missing", post(b'{"messages": []}'), 400, "missing_model"),
        node_error("model-empty", post(chat(model="")), 400, "missing_model"),
        node_error("model-int", post(chat(model=5)), 400, "missing_model"),
        node_error("model-null", post(chat(model=None)), 400, "missing_model"),
        node_error("model-bool", post(chat(model=True)), 400, "missing_model"),
        node_error("model-list", post(chat(model=["tiny-a"])), 400, "missing_model"),
        node_error("model-object", post(chat(model={"name": "tiny-a"})), 400, "missing_model"),
        node_error("model-path-traversal", post(chat(model="../../etc/passwd")), 404, "model_not_found"),
        node_error("model-absolute-file-path", post(chat(model=str(model_file))), 404, "model_not_found"),
        node_error("model-crlf-injection", post(chat(model="tiny-a\r\nX-Evil: 1")), 404, "model_not_found",
                   check=no_evil_header),
        node_error("model-nul", post(chat(model="tiny-a\u0000")), 404, "model_not_found"),
        node_error("model-10kb", post(chat(model="m" * 10240)), 404, "model_not_found", check=short_message),
        node_error("model-case", post(chat(model="TINY-A")), 404, "model_not_found"),
        node_error("model-whitespace", post(chat(model=" tiny-a")), 404, "model_not_found"),
        node_error("embedding-model-on-chat", post(chat(model="tiny-embed")), 400, "wrong_model_kind"),
        node_error("chat-model-on-embeddings", post(json.dumps({"model": "tiny-a", "input": "x"}).encode(),
                                                    "/v1/embeddings"), 400, "wrong_model_kind"),
        # ------------------------------------------------ size
        node_error("body-over-limit", post(huge_padding), 413, "request_too_large"),
        node_error("chunked-body-over-limit",
                   request(body=chunked(huge_padding, 8192), content_length=False,
                           headers=[("Transfer-Encoding", "chunked")]), 413, "request_too_large"),
        # ------------------------------------------------ valid enough to reach the child
        reaches_child("unknown-fields", post(chat(frobnicate={"a": [1, 2]}, x_evil="\r\nX-Evil: 1")),
                      frozenset({200}), check=no_evil_header),
        reaches_child("nested-300-deep-unknown-field", post(chat_with(b'"deep": ' + b"[" * 300 + b"]" * 300))),
        reaches_child("duplicate-model-key", post(b'{"model": "nope", "model": "tiny-a", '
                                                  b'"messages": [{"role": "user", "content": "hi"}], '
                                                  b'"max_tokens": 2}')),
        reaches_child("max-tokens-minus-1", post(chat(max_tokens=-1))),
        reaches_child("max-tokens-1e12", post(chat(max_tokens=10**12)), ANY_4XX),
        reaches_child("max-tokens-10e30", post(chat(max_tokens=10**30)), ANY_4XX),
        reaches_child("max-tokens-string", post(chat(max_tokens="x")), ANY_4XX),
        reaches_child("max-tokens-1e400", post(chat_with(b'"max_tokens": 1e400')), ANY_4XX),
        reaches_child("max-tokens-nan", post(chat_with(b'"max_tokens": NaN')), ANY_4XX),
        reaches_child("lone-surrogate-escape", post(chat(messages=[{"role": "user", "content": "\ud800"}]))),
        reaches_child("messages-string", post(chat(messages="hello")), ANY_4XX),
        reaches_child("messages-missing", post(b'{"model": "tiny-a", "max_tokens": 2}'), ANY_4XX),
        reaches_child("stream-not-boolean", post(chat(stream="yes")), ANY_4XX),
        reaches_child("temperature-string", post(chat(temperature="hot")), ANY_4XX),
        reaches_child("n-5", post(chat(n=5)), ANY_4XX),
        reaches_child("utf8-bom-body", post(b"\xef\xbb\xbf" + valid)),
        reaches_child("utf16-body", post(valid.decode().encode("utf-16"))),
        reaches_child("missing-content-type", post(valid, content_type=False)),
        reaches_child("text-plain-content-type", post(valid, content_type=False,
                                                      headers=[("Content-Type", "text/plain")])),
        reaches_child("chunked-valid-body", request(body=chunked(valid, 7), content_length=False,
                                                    headers=[("Transfer-Encoding", "chunked")])),
        reaches_child("expect-100-continue", post(valid, headers=[("Expect", "100-continue")])),
        reaches_child("query-string-ignored", post(valid, "/v1/chat/completions?model=nope&x=%00")),
        reaches_child("valid-request-id-echoed", post(valid, headers=[("X-Request-Id", "abc-123.X:9")]),
                      frozenset({200}), check=echoed_request_id),
        # ------------------------------------------------ X-Request-Id that must not be echoed
        # a bare CR or LF inside a header value: Twisted refuses the request outright
        Case("request-id-bare-cr", post(b"{not json", raw_headers=b"X-Request-Id: abc\rX-Evil: 1\r\n"),
             ANY_4XX, check=no_evil_header),
        Case("request-id-bare-lf", post(b"{not json", raw_headers=b"X-Request-Id: abc\nX-Evil: 1\r\n"),
             ANY_4XX, check=no_evil_header),
        node_error("request-id-too-long", post(b"{not json", headers=[("X-Request-Id", "r" * 300)]),
                   400, "invalid_json", check=fresh_request_id),
        node_error("request-id-non-ascii", post(b"{not json", headers=[("X-Request-Id", b"id-\xff\xfe")]),
                   400, "invalid_json", check=fresh_request_id),
        node_error("request-id-spaces-and-quotes", post(b"{not json", headers=[("X-Request-Id", 'a b"<x>')]),
                   400, "invalid_json", check=fresh_request_id),
        # ------------------------------------------------ methods, paths
        node_error("get-with-body", request("GET", body=valid), 405, "method_not_allowed"),
        node_error("put", request("PUT", body=valid), 405, "method_not_allowed"),
        node_error("delete", request("DELETE", body=b""), 405, "method_not_allowed"),
        node_error("patch-embeddings", request("PATCH", "/v1/embeddings", body=valid), 405, "method_not_allowed"),
        node_error("options", request("OPTIONS", body=b""), 405, "method_not_allowed"),
        Case("head", request("HEAD", body=None, content_type=False), frozenset({405})),
        node_error("path-dotdot", post(valid, "/v1/chat/completions/../../../etc/passwd"), 404, "not_found"),
        node_error("path-trailing-slash", post(valid, "/v1/chat/completions/"), 404, "not_found"),
        node_error("path-double-slash", post(valid, "/v1//chat/completions"), 404, "not_found"),
        node_error("path-encoded-slash", post(valid, "/v1/chat%2Fcompletions"), 404, "not_found"),
        node_error("path-upper-case", post(valid, "/V1/CHAT/COMPLETIONS"), 404, "not_found"),
        protocol_error("path-non-utf8", post(valid, b"/v1/\xff\xfe/completions")),
        protocol_error("path-with-space", post(valid, b"/v1/chat /completions")),
        # the absolute form (RFC 9112 3.2.2) is routed as the path it names; the host in it is not used
        reaches_child("path-absolute-uri", post(valid, "http://evil.example/v1/chat/completions")),
        node_error("path-absolute-uri-unknown", post(valid, "http://evil.example/v1/nothing"), 404, "not_found"),
        node_error("no-host-header", post(b"{not json").replace(b"Host: 127.0.0.1\r\n", b""), 400, "invalid_json"),
        # ------------------------------------------------ HTTP framing refused by Twisted
        protocol_error("garbage-request-line", b"GARBAGE\r\n\r\n"),
        protocol_error("content-length-not-a-number", post(valid, content_length=False,
                                                           headers=[("Content-Length", "abc")])),
        protocol_error("content-length-negative", post(b"", content_length=False,
                                                       headers=[("Content-Length", "-5")])),
        protocol_error("content-length-conflicting", post(valid, headers=[("Content-Length", "3")])),
        protocol_error("content-length-and-chunked", post(valid, headers=[("Transfer-Encoding", "chunked")])),
        protocol_error("chunk-size-not-hex", request(body=b"zz\r\n{}\r\n0\r\n\r\n", content_length=False,
                                                     headers=[("Transfer-Encoding", "chunked")])),
        # Twisted answers 400 and closes while part of the request is unread: the kernel may then
        # reset the connection and the 400 never reaches the client — a clean close all the same
        Case("header-line-20kb", post(valid, headers=[("X-Pad", "p" * 20000)]), ANY_4XX | {None}),
        Case("headers-over-16kb-in-total", post(valid, headers=[(f"X-H{i}", "v" * 100) for i in range(200)]),
             ANY_4XX | {None}),
        Case("600-headers", post(valid, headers=[(f"X-H{i}", "v") for i in range(600)]), ANY_4XX | {None}),
        protocol_error("header-without-colon", post(valid, raw_headers=b"NoColonHere\r\n")),
        # ------------------------------------------------ a body that never completes
        Case("content-length-longer-than-body", post(b'{"model": "tiny-a"}', content_length=False,
                                                     headers=[("Content-Length", "1000")]),
             frozenset({None}), silent=True),  # type: ignore[arg-type]
    ]


def check_case(case: Case, answer: Answer) -> list[str]:
    """What is wrong with ``answer`` for ``case`` (empty: nothing)."""
    problems: list[str] = []
    if case.silent:
        if answer.status is not None:
            problems.append(f"expected no answer to an incomplete request, got {answer.status}")
        return problems
    if answer.status not in case.status:
        problems.append(f"status {answer.status} not in {sorted(case.status)[:6]}: {answer.raw[:300]!r}")
        return problems
    if answer.status is not None and answer.status >= 500:
        problems.append(f"5xx: {answer.raw[:300]!r}")
    if case.code is not None:
        try:
            doc = json.loads(answer.body)
            assert set(doc) == {"error"} and set(doc["error"]) == ERROR_KEYS, doc
            assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
            assert doc["error"]["code"] == case.code, doc["error"]
            assert answer.header("content-type") == "application/json"
        except Exception as exc:  # noqa: BLE001 - report every case, not just the first
            problems.append(f"not the node's error document with code {case.code}: {exc!r} "
                            f"in {answer.raw[:300]!r}")
    if answer.status is not None and answer.status < 500 and case.code is not None or case.child:
        rid = answer.header("x-request-id")
        if rid is None:
            problems.append("no X-Request-Id on the answer")
    if case.child and answer.header("x-rolemesh-device") != "cpu:0":
        problems.append(f"reached no device: {answer.headers}")
    if case.check is not None:
        try:
            case.check(answer)
        except AssertionError as exc:
            problems.append(f"check {case.check.__name__}: {exc}")
    return problems


async def send(service: Any, case: Case) -> Answer:
    return await deferToThread(raw_exchange, service.port, case.data,
                               silent_after_s=0.5 if case.silent else None)


def open_server_connections(service: Any) -> int:
    """Connections the node's HTTP site holds open right now."""
    from twisted.internet import reactor

    site = service.listener.site
    count = 0
    for reader in reactor.getReaders() + reactor.getWriters():
        factory = getattr(getattr(reader, "protocol", None), "factory", None)
        if factory is site:
            count += 1
    return count


async def assert_still_serving(service: Any) -> None:
    health = await deferToThread(raw_exchange, service.port, request("GET", "/health", None, content_type=False))
    assert health.status == 200 and json.loads(health.body)["status"] == "ok"
    ok = await deferToThread(raw_exchange, service.port, post(chat(max_tokens=3)))
    assert ok.status == 200, ok.raw[:300]
    assert json.loads(ok.body)["choices"][0]["message"]["content"] is not None
    for slot in service.node.slots.values():
        await eventually(lambda slot=slot: slot.inflight == 0, timeout=5, what=f"{slot.id} to hold nothing")
    inventory = await deferToThread(raw_exchange, service.port,
                                    request("GET", "/v1/node/inventory", None, content_type=False))
    for device in json.loads(inventory.body)["devices"]:
        assert device["child"]["in_flight"] == 0 and device["child"]["waiting"] == 0, device["child"]
    await eventually(lambda: open_server_connections(service) == 0, timeout=5,
                     what="the node to close every client connection")


@pytest_twisted.ensureDeferred
async def test_malformed_requests_get_a_clean_4xx_and_the_node_keeps_serving(
        node_service, tiny_models, llama_server_bin):
    service = await node_service(node_config(tiny_models))
    cases = build_cases(tiny_models["tiny-a"])
    assert len(cases) >= 30
    assert len({c.id for c in cases}) == len(cases)
    slot = service.node.slots["cpu:0"]
    failures: dict[str, list[str]] = {}
    reached_child = 0
    for case in cases:
        try:
            answer = await send(service, case)
        except Exception as exc:  # noqa: BLE001 - report every case
            failures[case.id] = [f"exchange failed: {exc!r}"]
            continue
        problems = check_case(case, answer)
        if problems:
            failures[case.id] = problems
        if case.child and answer.header("x-rolemesh-device"):
            reached_child += 1
        # the node survives each case: nothing held between cases
        await eventually(lambda: slot.inflight == 0, timeout=5, what=f"the slot to be free after {case.id}")
    assert not failures, "\n".join(f"{cid}: {'; '.join(p)}" for cid, p in failures.items())
    assert reached_child >= 15  # the child-side cases really went through the llama-server
    assert service.node.slots["cpu:0"].crash_count == 0
    await assert_still_serving(service)

