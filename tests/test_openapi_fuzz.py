"""docs/openapi.yaml, tried the way an integrator would: schemathesis against a real node (issue 18).

A real node (cpu backend, two devices, the real ``llama-server``, the tiny
models) runs in this process, on the reactor. The schemathesis CLI (the
version pinned in pyproject.toml) runs in a child process spawned through the
reactor, so nothing blocks the reactor and what this process holds (fds,
timers, memory) is the node's, not the generator's. It is given

* the test-only overlay of the document (``openapi_fuzz_support.overlay``:
  the test's model names, token ids and devices; reload and log follow left
  out), every operation of it, all checks on, a fixed seed, a bounded
  ``--max-examples``, no example database;
* a hooks file that adds one check, driven by the document: every event of a
  streamed answer matches the operation's ``x-rolemesh-event-schema`` (an
  ``Error`` event may end the stream) — and notes each answer it saw, so the
  test can tell that streams and error answers were covered.

Meanwhile the node's dispatcher link talks to a fake dispatcher (a real
``twisted.web`` ``Site`` on loopback) that answers every documented status and
unexpected ones (4xx, 5xx, 404/410, slower than the node waits). Every call the
node made is validated against the documented webhook body and bearer token.

The node must end with 0 failures, and its open fds, pending delayed calls and
RSS must come back within a small margin of where they were before the run
(children already started), and of where they were before the node started once
it stopped.

``llama-server`` generates at most ``N_PREDICT`` tokens per request (its
``-n``, which caps any ``max_tokens``): a ``max_tokens`` bound in the overlay
would be generated as a negative case (``max_tokens: 5``) that llama-server
rightly accepts. ``ctx_size`` is large (the model is tiny, its cache too) so
that a generated prompt fits: "longer than the context" is a 400 no schema can
foresee.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from openapi_fuzz_support import EXCLUDED, OVERLAY_ENV, SEEN_ENV, overlay
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rolemesh_node.dispatcher import LinkState

pytestmark = [pytest.mark.llama, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "docs" / "openapi.yaml"
HOOKS = Path(__file__).resolve().parent / "openapi_fuzz_support.py"
TOKEN = "fuzz-dispatcher-token-8c1f2e"

SEED = 18
MAX_EXAMPLES = 25
N_PREDICT = 4
#: how long the CLI may take before the test gives up (it takes a few seconds)
CLI_TIMEOUT_S = 45.0

#: margins for "back where it was"
FD_MARGIN = 6  # cached connections to the children may differ by a few
TIMER_MARGIN = 6  # each cached connection holds its idle timeout
RSS_MARGIN_BYTES = 40 * 1024 * 1024


# ==========================================================================
# a fake dispatcher that answers everything, documented or not

SLOW = "slow"
#: per path, the answers in turn: documented statuses first, then what a broken dispatcher does
ANSWERS: dict[str, list[Any]] = {
    "/v1/nodes/register": [500, 200, SLOW, 201, 503, 204, 401, 200],
    "/v1/nodes/heartbeat": [200, 204, 404, 410, 500, 200, 502, SLOW, 403, 400, 204, 200, 503, 301],
    "/v1/nodes/deregister": [SLOW, 404, 500, 200, 204],
}
BODIES = [b'{"ok": true}', b"", b"not json", b'{"node": {"known": false}, "x": [1, 2, 3]}', b"[]"]


class ChaosDispatcher(Resource):
    """Records each call and answers it with the next answer of its path (:data:`ANSWERS`);
    ``slow`` answers after ``slow_s``, unless the node gave up first (then its timer is cancelled)."""

    isLeaf = True

    def __init__(self, reactor: Any, slow_s: float) -> None:
        super().__init__()
        self.reactor = reactor
        self.slow_s = slow_s
        self.calls: list[dict[str, Any]] = []
        self.answered: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        path = request.path.decode()
        n = sum(1 for c in self.calls if c["path"] == path)
        self.calls.append({"path": path, "body": request.content.read(),
                           "authorization": (request.getHeader(b"authorization") or b"").decode(),
                           "content_type": (request.getHeader(b"content-type") or b"").decode()})
        plan = ANSWERS.get(path, [404])
        answer = plan[n % len(plan)]
        self.answered.append(answer)
        if answer == SLOW:
            timer = self.reactor.callLater(self.slow_s, self._answer, request, 200, b'{"ok": true}')
            request.notifyFinish().addBoth(lambda _: timer.cancel() if timer.active() else None)
            return NOT_DONE_YET
        body = b"" if answer == 204 else BODIES[n % len(BODIES)]
        return self._answer(request, answer, body, write=False)

    def _answer(self, request: Any, status: int, body: bytes, write: bool = True) -> Any:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        if status == 301:
            request.setHeader(b"location", b"http://127.0.0.1:9/elsewhere")
        if not write:
            return body
        request.write(body)
        request.finish()
        return None


# ==========================================================================
# what the process holds


def open_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own fd, closed since
            pass
    return out


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def pending_timers(reactor: Any) -> list[Any]:
    return [c for c in reactor.getDelayedCalls() if c.active()]


def holdings(reactor: Any) -> dict[str, Any]:
    import gc

    gc.collect()
    return {"fds": open_fds(), "timers": pending_timers(reactor), "rss": rss_bytes()}


async def settle(reactor: Any, ok: Any, timeout: float = 5.0) -> None:
    """Wait (on the reactor) until ``ok()`` holds or ``timeout`` passed; connections take a moment to close."""
    deadline = time.monotonic() + timeout
    while not ok() and time.monotonic() < deadline:
        await deferLater(reactor, 0.05, lambda: None)


def _timer_name(call: Any) -> str:
    func = getattr(call, "func", None)  # gone once the call was made or cancelled
    return getattr(func, "__qualname__", None) or repr(func)


def describe(before: dict[str, Any], after: dict[str, Any]) -> str:
    fds = sorted((Counter(after["fds"]) - Counter(before["fds"])).elements())
    timers = sorted((Counter(_timer_name(c) for c in after["timers"])
                     - Counter(_timer_name(c) for c in before["timers"])).elements())
    return (f"fds {len(before['fds'])} -> {len(after['fds'])} (new: {fds[:20]}); timers "
            f"{len(before['timers'])} -> {len(after['timers'])} (new: {timers[:20]}); RSS "
            f"{before['rss'] / 2**20:.1f} -> {after['rss'] / 2**20:.1f} MiB")


# ==========================================================================
# the document's webhooks


def webhook_validators(spec: dict[str, Any]) -> dict[str, Any]:
    """x-rolemesh-path -> a validator of the documented request body (read from the document)."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:doc", Resource.from_contents(spec, default_specification=DRAFT202012))
    out = {}
    for hook in spec["webhooks"].values():
        post = hook["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        out[post["x-rolemesh-path"]] = Draft202012Validator({"$ref": "urn:doc" + ref}, registry=registry)
    return out


# ==========================================================================
# the run


def node_config(tiny_models: dict[str, Path], llama_server_bin: str, dispatcher_port: int) -> dict[str, Any]:
    model = {"ctx_size": 4096, "args": ["-n", str(N_PREDICT)]}
    return {
        "backend": "cpu", "cpu_devices": 2, "listen_host": "127.0.0.1", "node_id": "fuzz-node",
        "llama_server_bin": llama_server_bin,
        "models": {
            "tiny-a": {**model, "path": str(tiny_models["tiny-a"]), "aliases": ["a"]},
            "tiny-b": {**model, "path": str(tiny_models["tiny-b"]), "embedding": True},
        },
        "dispatcher_base_url": f"http://127.0.0.1:{dispatcher_port}", "dispatcher_token": TOKEN,
        "heartbeat_interval_s": 0.05, "dispatcher_timeout_s": 0.3,
    }


async def warm_up(base: str) -> None:
    """One answer from each child, so that both are loaded before the baseline is taken."""
    import treq

    for path, body in [("/v1/chat/completions", {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/embeddings", {"model": "tiny-b", "input": "hi"})]:
        response = await treq.post(base + path, json=body, persistent=False)
        assert response.code == 200, (path, await response.text())
        await response.content()


async def run_schemathesis(tmp_path: Path, base: str, overlay_path: Path, seen_path: Path) -> tuple[int, str]:
    from twisted.internet import reactor

    args = ["-m", "schemathesis.cli", "run", str(overlay_path), "--url", base, "--checks", "all",
            "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--generation-database", "none",
            "--workers", "1", "--request-timeout", "10", "--no-color", "--output-truncate", "true"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), OVERLAY_ENV: str(overlay_path),
           SEEN_ENV: str(seen_path), "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis"),
           "NO_COLOR": "1", "COLUMNS": "120"}
    d = getProcessOutputAndValue(sys.executable, args, env=env, path=str(tmp_path), reactor=reactor)
    out, err, code = await d.addTimeout(CLI_TIMEOUT_S, reactor)
    return code, (out + err).decode("utf-8", "replace")


@pytest_twisted.ensureDeferred
async def test_the_node_answers_what_the_document_says(node_service, tiny_models, llama_server_bin,
                                                       tmp_path: Path) -> None:
    from twisted.internet import reactor

    spec = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    at_start = holdings(reactor)
    dispatcher = ChaosDispatcher(reactor, slow_s=1.0)
    site = Site(dispatcher)
    site.noisy = False
    dispatcher_port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        service = await node_service(node_config(tiny_models, llama_server_bin, dispatcher_port.getHost().port))
        base = f"http://127.0.0.1:{service.port}"
        await warm_up(base)
        devices = [d.id for d in service.node.devices]
        from rolemesh_node.tinymodel import build_vocab

        doc = overlay(spec, generative=["tiny-a", "a"], embedding=["tiny-b"], devices=devices,
                      n_vocab=len(build_vocab()[0]))
        overlay_path = tmp_path / "openapi-overlay.json"
        overlay_path.write_text(json.dumps(doc), encoding="utf-8")
        seen_path = tmp_path / "seen.jsonl"

        before = holdings(reactor)
        started = time.monotonic()
        code, output = await run_schemathesis(tmp_path, base, overlay_path, seen_path)
        took = time.monotonic() - started
        assert code == 0, f"schemathesis found failures (exit {code}, {took:.1f}s):\n{output[-12000:]}"
        print(f"schemathesis: {took:.1f}s\n{output[-1500:]}")

        # ------------------------------------------- what the run covered
        seen = [json.loads(line) for line in seen_path.read_text(encoding="utf-8").splitlines()]
        operations = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
        assert operations == {(m, p) for m, p, *_ in seen} & operations, "operations the run never called"
        assert not {(m, p) for m, p, *rest in EXCLUDED if not rest} & {(m, p) for m, p, *_ in seen}
        for path in ("/v1/chat/completions", "/v1/completions"):
            statuses = {(s, t) for m, p, s, t in seen if p == path}
            assert (200, "text/event-stream") in statuses, f"no streamed answer checked on {path}"
            assert (200, "application/json") in statuses, f"no plain answer checked on {path}"
        errors = {s for m, p, s, t in seen if p.startswith("/v1/") and t == "application/json" and s >= 400}
        assert {400, 404, 405} <= errors, f"error answers checked: {sorted(errors)}"

        # ------------------------------------ back where it was, still running
        await settle(reactor, lambda: len(open_fds()) <= len(before["fds"]) + FD_MARGIN
                     and len(pending_timers(reactor)) <= len(before["timers"]) + TIMER_MARGIN)
        after = holdings(reactor)
        report = describe(before, after)
        print("while running:", report)
        assert len(after["fds"]) <= len(before["fds"]) + FD_MARGIN, report
        assert len(after["timers"]) <= len(before["timers"]) + TIMER_MARGIN, report
        assert after["rss"] <= before["rss"] + RSS_MARGIN_BYTES, report

        # stop while registered, so that the deregistration is sent (and answered as planned)
        await settle(reactor, lambda: service.dispatcher.state is LinkState.REGISTERED, timeout=10.0)
        await service.stopService()
    finally:
        await dispatcher_port.stopListening()

    # ----------------------------------------- the dispatcher's side
    validators = webhook_validators(spec)
    paths = [c["path"] for c in dispatcher.calls]
    assert set(paths) == set(validators), f"calls made: {sorted(set(paths))}"
    assert paths.count("/v1/nodes/register") >= 2 and paths.count("/v1/nodes/heartbeat") >= 10, paths
    for call in dispatcher.calls:
        validators[call["path"]].validate(json.loads(call["body"]))
        assert call["authorization"] == f"Bearer {TOKEN}" and call["content_type"].startswith("application/json")
    assert {404, 410, 500, SLOW} <= set(dispatcher.answered), dispatcher.answered

    # ------------------------------ back where it was before the node started
    await settle(reactor, lambda: len(open_fds()) <= len(at_start["fds"]) + 2
                 and len(pending_timers(reactor)) <= len(at_start["timers"]))
    at_end = holdings(reactor)
    report = describe(at_start, at_end)
    print("after stop:", report)
    assert len(at_end["fds"]) <= len(at_start["fds"]) + 2, report
    assert len(at_end["timers"]) <= len(at_start["timers"]), report
