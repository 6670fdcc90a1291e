"""LlamaServerChild's lifecycle, driven by a Clock and a scripted HTTP client."""

import pytest

from rolemesh_node.llama_server import ChildStartError, ChildState, LlamaServerChild
from tests.fakes import ProcessClock, ScriptedHTTP, exited


def make_child(reactor, http, **overrides):
    kwargs = dict(reactor=reactor, http=http, device_id="cpu:0", model="m", argv=["/bin/llama-server", "-m", "x"],
                  env={"A": "1"}, port=5555, probe_interval_s=0.5, startup_timeout_s=30.0)
    kwargs.update(overrides)
    return LlamaServerChild(**kwargs)


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def test_probes_every_interval_until_ready():
    reactor, http = ProcessClock(), ScriptedHTTP()
    http.loading()
    child = make_child(reactor, http)
    got = results(child.start())
    assert reactor.spawned[0][1] == ["/bin/llama-server", "-m", "x"]
    assert http.calls == []
    reactor.advance(0.5)
    assert http.calls == ["/health"]  # 503: /v1/models not even asked
    reactor.advance(0.5)
    assert http.calls == ["/health", "/health"]
    http.ready("m")
    reactor.advance(0.5)
    assert got == [child] and child.state is ChildState.READY
    assert http.calls[-2:] == ["/health", "/v1/models"]
    assert reactor.getDelayedCalls() == []  # probe and timeout timers gone


def test_log_line_triggers_an_immediate_probe():
    reactor, http = ProcessClock(), ScriptedHTTP()
    http.ready("m")
    child = make_child(reactor, http)
    got = results(child.start())
    child.errReceived(b"0.00.008 I srv  llama_server: model lo")
    assert got == []  # half a line is not a line
    child.errReceived(b"aded\n")
    assert got == [child]  # no clock advance needed
    assert list(child.tail) == ["0.00.008 I srv  llama_server: model loaded"]


def test_hint_during_a_probe_in_flight_probes_again_after_it():
    reactor, http = ProcessClock(), ScriptedHTTP()
    child = make_child(reactor, http)
    got = results(child.start())
    reactor.advance(0.5)  # /health hangs
    assert len(http.hanging) == 1
    http.ready("m")
    child.errReceived(b"llama_server: listening on http://127.0.0.1:5555\n")
    assert len(http.calls) == 1  # never two probes at once
    from tests.fakes import FakeResponse
    http.hanging[0].callback(FakeResponse(503, {"error": {"message": "Loading model"}}))
    assert got == [child]  # the remembered hint probed again at once


def test_meta_null_is_not_ready():
    reactor, http = ProcessClock(), ScriptedHTTP()
    from tests.fakes import FakeResponse
    http.routes = {"/health": FakeResponse(200, {"status": "ok"}),
                   "/v1/models": FakeResponse(200, {"data": [{"id": "m", "meta": None}]})}
    child = make_child(reactor, http)
    got = results(child.start())
    reactor.advance(0.5)
    assert got == [] and "without meta" in child.last_probe


def test_startup_timeout_kills_and_fails_with_a_typed_error():
    reactor, http = ProcessClock(), ScriptedHTTP()
    http.loading()
    child = make_child(reactor, http, startup_timeout_s=3.0)
    got = results(child.start())
    reactor.advance(3.0)
    assert len(got) == 1 and got[0].check(ChildStartError)
    error = got[0].value
    assert error.device == "cpu:0" and error.model == "m"
    assert "not ready within" in error.reason and "Loading model" in error.reason
    assert child.transport.signals == ["KILL"]
    child.processExited(exited(None, 9))
    assert child.state is ChildState.EXITED and child.exit.expected


@pytest.mark.allow_errors
def test_exit_during_startup_fails_fast_with_stderr_tail():
    reactor, http = ProcessClock(), ScriptedHTTP()
    http.loading()
    exits = []
    child = make_child(reactor, http, on_exit=lambda c, info: exits.append(info))
    got = results(child.start())
    child.errReceived(b"E gguf_init_from_file: failed to open GGUF file 'x'\n"
                      b"E srv  llama_server: exiting due to model loading error\n")
    child.processExited(exited(1))
    assert got[0].check(ChildStartError)
    assert "exited during startup (exit code 1)" in got[0].value.reason
    assert any("failed to open GGUF" in line for line in got[0].value.stderr_tail)
    assert not got[0].value.port_in_use
    assert exits[0].exit_code == 1 and not exits[0].expected
    assert reactor.getDelayedCalls() == []


@pytest.mark.allow_errors
def test_port_in_use_is_recognised():
    reactor, http = ProcessClock(), ScriptedHTTP()
    child = make_child(reactor, http)
    got = results(child.start())
    child.errReceived(b"E srv start: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 5555\n")
    child.processExited(exited(1))
    assert got[0].value.port_in_use


def test_stop_sends_term_then_kill_after_grace():
    reactor, http = ProcessClock(), ScriptedHTTP()
    http.ready("m")
    child = make_child(reactor, http)
    child.start()
    reactor.advance(0.5)
    stopped = results(child.stop(grace_s=5.0))
    assert child.transport.signals == ["TERM"] and stopped == []
    reactor.advance(5.0)
    assert child.transport.signals == ["TERM", "KILL"]
    child.processExited(exited(None, 9))
    assert stopped[0].signal == 9 and stopped[0].expected
    assert results(child.stop(1.0))[0] is stopped[0]  # stopping an exited child is immediate


def test_stop_while_starting_fails_the_start():
    reactor, http = ProcessClock(), ScriptedHTTP()
    http.loading()
    child = make_child(reactor, http)
    got = results(child.start())
    stopped = results(child.stop(grace_s=5.0))
    assert got[0].check(ChildStartError) and "stopped before" in got[0].value.reason
    child.processExited(exited(0))
    assert stopped and reactor.getDelayedCalls() == []


@pytest.mark.parametrize("line", [b"model loaded", b"main: server is listening on http://127.0.0.1:1",
                                  b"all slots are idle"])
def test_ready_hints_of_several_builds(line):
    reactor, http = ProcessClock(), ScriptedHTTP()
    http.ready("m")
    child = make_child(reactor, http)
    got = results(child.start())
    child.errReceived(line + b"\n")
    assert got == [child]
