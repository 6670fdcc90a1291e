"""Operating the daemon, through real processes: reload (SIGHUP, ``POST /v1/node/reload``), SIGUSR1 and the
log file with logrotate's two recipes, and the graceful drain on SIGTERM.

Plain synchronous tests (subprocess + http.client), like ``test_run_modes.py``. The subprocesses get this
checkout on ``PYTHONPATH`` so they run the code under test wherever the package is installed from. Every
wait is a bounded poll; every process is killed in ``finally``. The logrotate recipes are played step by
step (copy + truncate; rename + create + ``kill -USR1``), which is what logrotate does, so the test needs no
``logrotate`` binary.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.subprocs import assert_clean_log, env, wait_until

pytestmark = pytest.mark.slow

TWISTD = str(Path(sys.executable).parent / "twistd")
AGENT = [sys.executable, "-m", "rolemesh_node.cli"]
START_S = 30.0
STOP_S = 20.0


# --------------------------------------------------------------------------- helpers


def request(port: int, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None, response.headers
    finally:
        conn.close()


def up(port: int) -> bool:
    try:
        return request(port, "GET", "/health", timeout=2.0)[0] == 200
    except OSError:
        return False


class Node:
    """A node process: ``rolemesh-node-agent`` or ``twistd -n``, logging to ``output.txt`` (or a log file)."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], runner: str = "agent",
                 logfile: Path | None = None) -> None:
        self.dir = tmp_path
        self.port = config["listen_port"]
        self.config_path = tmp_path / "node.yaml"
        self.write(config)
        if runner == "agent":
            argv = [*AGENT, "--config", str(self.config_path)]
            if logfile is not None:
                argv += ["--logfile", str(logfile)]
        else:
            argv = [TWISTD, "-n", "--pidfile", ""]
            if logfile is not None:
                argv += ["--logfile", str(logfile)]
            argv += ["rolemesh-node", "--config", str(self.config_path)]
        self.out = tmp_path / "output.txt"
        with open(self.out, "wb") as sink:
            self.proc = subprocess.Popen(argv, cwd=tmp_path, env=env(), stdout=sink, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.log = logfile or self.out
        wait_until(lambda: self._alive_and_up(), START_S, f"the node on port {self.port}")

    def _alive_and_up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited {self.proc.returncode}:\n{self.text()}")
        return up(self.port)

    def write(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)

    def text(self) -> str:
        return self.out.read_text(errors="replace") + ("" if self.log == self.out else self.log.read_text(
            errors="replace"))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_log(self, pattern: str, what: str, timeout: float = 15.0) -> re.Match[str]:
        return wait_until(lambda: re.search(pattern, self.text()), timeout, what)

    def devices(self) -> dict[str, Any]:
        return {d["id"]: d["child"] for d in request(self.port, "GET", "/v1/node/inventory")[1]["devices"]}

    def pid_of(self, model: str) -> int | None:
        for child in self.devices().values():
            if child["model"] == model and child["state"] == "ready":
                return child["pid"]
        return None

    def stop(self) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {STOP_S}s after SIGTERM:\n{self.text()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def base_config(tmp_path: Path, port: int, **extra: Any) -> dict[str, Any]:
    return {"listen_host": "127.0.0.1", "listen_port": port, "backend": "cpu", "state_dir": str(tmp_path / "st"),
            "metrics_interval_s": 0.5, **extra}


def chat(model: str, tokens: int = 2, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, **extra}


# --------------------------------------------------------------------------- reload


@pytest.mark.llama
def test_sighup_adds_removes_and_changes_models(tmp_path: Path, free_port: Any, tiny_models: dict[str, Path],
                                                 llama_server_bin: str) -> None:
    a, b = str(tiny_models["tiny-a"]), str(tiny_models["tiny-b"])
    config = base_config(tmp_path, free_port(), cpu_devices=3,
                         models={"keep": {"path": a}, "drop": {"path": b}, "change": {"path": a}})
    node = Node(tmp_path, config)
    try:
        for model in ("keep", "drop", "change"):
            status, doc, _ = request(node.port, "POST", "/v1/chat/completions", chat(model))
            assert status == 200, doc
        before = {model: node.pid_of(model) for model in ("keep", "drop", "change")}
        assert all(before.values()) and len(set(before.values())) == 3, node.devices()

        config["models"] = {"keep": {"path": a}, "change": {"path": a, "ctx_size": 512}, "new": {"path": b}}
        node.write(config)
        node.signal(signal.SIGHUP)
        node.wait_log(r"config reloaded from .*node\.yaml: applied", "the reload's log line")

        # a new model is served at once; a removed one is no longer offered
        status, doc, _ = request(node.port, "POST", "/v1/chat/completions", chat("new"))
        assert status == 200, doc
        status, doc, _ = request(node.port, "POST", "/v1/chat/completions", chat("drop"))
        assert status == 404 and doc["error"]["code"] == "model_not_found"
        assert [m["id"] for m in request(node.port, "GET", "/v1/models")[1]["data"]] == ["keep", "change", "new"]
        # the changed one restarted (a new pid); the removed one's child is gone; the untouched one kept its pid
        changed = wait_until(lambda: (pid := node.pid_of("change")) not in (None, before["change"]) and pid,
                             START_S, "the changed model's child to restart")
        assert changed != before["change"]
        assert not any(c["model"] == "drop" and c["pid"] for c in node.devices().values()), node.devices()
        assert node.pid_of("keep") == before["keep"]
        with pytest.raises(ProcessLookupError):
            os.kill(before["drop"], 0)
        status, doc, _ = request(node.port, "POST", "/v1/chat/completions", chat("change"))
        assert status == 200, doc

        # the same file again: nothing to do; counted in /metrics
        status, result, _ = request(node.port, "POST", "/v1/node/reload")
        assert status == 200 and result["result"] == "unchanged", result
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=5)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.close()
        assert 'rolemesh_config_reloads_total{result="applied"} 1.0' in metrics
        assert 'rolemesh_config_reloads_total{result="unchanged"} 1.0' in metrics
        assert node.stop() == 0
    finally:
        node.kill()
    assert_clean_log(node.text())


@pytest.mark.parametrize("runner", ["agent", "twistd"])
def test_invalid_reload_and_sigusr1_keep_the_node_serving(tmp_path: Path, free_port: Any, runner: str) -> None:
    config = base_config(tmp_path, free_port(), models={"ghost": {"path": "ghost.gguf"}})
    node = Node(tmp_path, config, runner)
    try:
        node.write("listen_port: 8088\nmodels:\n  ghost:\n    path: ghost.gguf\n    ctx_size: 8\n")
        node.signal(signal.SIGHUP)
        line = node.wait_log(r"config reload rejected: (\S+): models\.ghost\.ctx_size: must be at least 16, got 8",
                             "the one rejection line")
        assert Path(line.group(1)).name == "node.yaml"
        assert up(node.port) and request(node.port, "GET", "/ready")[0] == 200
        status, result, _ = request(node.port, "POST", "/v1/node/reload")
        assert status == 422 and result["result"] == "rejected"
        assert result["error"].startswith("config error: ") and "models.ghost.ctx_size" in result["error"]

        node.signal(signal.SIGUSR1)
        node.wait_log(r"received SIGUSR1", "SIGUSR1 to be handled")
        assert node.proc.poll() is None and up(node.port)
        assert node.stop() == 0
    finally:
        node.kill()
    assert_clean_log(node.text())


# --------------------------------------------------------------------------- logs


@pytest.mark.parametrize("runner", ["agent", "twistd"])
def test_logrotate_copytruncate_and_create_with_usr1(tmp_path: Path, free_port: Any, runner: str) -> None:
    logfile = tmp_path / "logs" / "node.log"
    logfile.parent.mkdir()
    config = base_config(tmp_path, free_port(), models={"ghost": {"path": "ghost.gguf"}})
    node = Node(tmp_path, config, runner, logfile=logfile)

    def marker(tag: str) -> None:  # an access-log line that names the tag, written within 0.2 s
        request(node.port, "GET", f"/health?{tag}")
        wait_until(lambda: tag in logfile.read_text(errors="replace"), 10, f"{tag} in the log")

    try:
        marker("before-rotation")
        # copytruncate: copy, then truncate the file in place while the node keeps it open
        shutil.copy(logfile, logfile.with_suffix(".log.1"))
        with open(logfile, "r+b") as f:
            f.truncate(0)
        marker("after-copytruncate")
        data = logfile.read_bytes()
        assert b"\0" not in data, "a NUL-filled hole: the log is not written in append mode"
        assert data.lstrip().startswith(b"20")  # the first line is a new one, at offset 0
        assert b"before-rotation" in logfile.with_suffix(".log.1").read_bytes()

        # create + postrotate kill -USR1: move the file away, create a new one, signal
        os.rename(logfile, logfile.with_suffix(".log.2"))
        logfile.touch()
        node.signal(signal.SIGUSR1)
        marker("after-create-and-usr1")
        assert b"after-create-and-usr1" not in logfile.with_suffix(".log.2").read_bytes()
        assert b"\0" not in logfile.read_bytes()

        # kill -USR1 alone rotates: node.log -> node.log.1 (the older ones move up), a new node.log
        node.signal(signal.SIGUSR1)
        wait_until(lambda: logfile.with_suffix(".log.3").exists(), 10, "node.log.3 after the rotation")
        marker("after-usr1-rotation")
        assert b"after-create-and-usr1" in logfile.with_suffix(".log.1").read_bytes()
        assert node.proc.poll() is None
        assert node.stop() == 0
    finally:
        node.kill()
    assert_clean_log(node.text())


# --------------------------------------------------------------------------- drain


def stream_in_thread(port: int, body: dict[str, Any], out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            out["status"] = response.status
            chunks = []
            while True:
                chunk = response.read1(65536) if body.get("stream") else response.read()
                if not chunk:
                    break
                chunks.append(chunk)
                out["started"] = True
                if not body.get("stream"):
                    break
            out["body"] = b"".join(chunks)
            conn.close()
        except Exception as exc:  # reported by the test
            out["error"] = repr(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


#: a long answer: the tiny model's context (2048) holds about this many tokens, one to two seconds of work
LONG = 2000


def drain_config(tmp_path: Path, port: int, model: Path, **extra: Any) -> dict[str, Any]:
    # two slots with room for long answers: a stream and a non-streamed request run side by side
    return base_config(tmp_path, port, llama_server_parallel=2,
                       models={"tiny": {"path": str(model), "ctx_size": 4096}}, **extra)


@pytest.mark.llama
def test_sigterm_drains_a_stream_and_a_long_request(tmp_path: Path, free_port: Any, tiny_models: dict[str, Path],
                                                    llama_server_bin: str) -> None:
    node = Node(tmp_path, drain_config(tmp_path, free_port(), tiny_models["tiny-a"]))
    try:
        assert request(node.port, "POST", "/v1/chat/completions", chat("tiny"))[0] == 200  # loaded
        plain: dict[str, Any] = {}
        streamed: dict[str, Any] = {}
        threads = [stream_in_thread(node.port, chat("tiny", LONG, ignore_eos=True), plain),
                   stream_in_thread(node.port, chat("tiny", LONG, ignore_eos=True, stream=True), streamed)]
        wait_until(lambda: streamed.get("started") and sum(c["in_flight"] for c in node.devices().values()) == 2,
                   10, "both requests in flight")
        node.signal(signal.SIGTERM)
        node.wait_log(r"draining: 2 request\(s\) in flight", "the drain to begin")
        status, doc, headers = request(node.port, "POST", "/v1/chat/completions", chat("tiny"))
        assert status == 503 and doc["error"]["code"] == "node_draining" and int(headers["Retry-After"]) >= 1
        status, doc, _ = request(node.port, "GET", "/ready")
        assert status == 503 and doc["status"] == "draining"
        for thread in threads:
            thread.join(timeout=STOP_S)
        assert node.proc.wait(timeout=STOP_S) == 0
    finally:
        node.kill()
    assert plain.get("status") == 200, plain
    answer = json.loads(plain["body"])
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == LONG
    assert streamed.get("status") == 200, streamed
    assert streamed["body"].rstrip().endswith(b"data: [DONE]"), streamed["body"][-300:]
    assert b'"error"' not in streamed["body"]
    text = node.text()
    assert "drained in" in text
    assert_clean_log(text)


@pytest.mark.llama
def test_a_drain_out_of_time_ends_the_stream_with_an_error_event(tmp_path: Path, free_port: Any,
                                                                 tiny_models: dict[str, Path],
                                                                 llama_server_bin: str) -> None:
    node = Node(tmp_path, drain_config(tmp_path, free_port(), tiny_models["tiny-a"], drain_timeout_s=0.2,
                                       llama_server_stop_grace_s=2.0))
    try:
        streamed: dict[str, Any] = {}
        thread = stream_in_thread(node.port, chat("tiny", LONG, ignore_eos=True, stream=True), streamed)
        wait_until(lambda: streamed.get("started"), START_S, "the stream to begin")
        node.signal(signal.SIGTERM)
        thread.join(timeout=STOP_S)
        assert node.proc.wait(timeout=STOP_S) == 0
    finally:
        node.kill()
    assert streamed.get("status") == 200, streamed
    events = [line for line in streamed["body"].split(b"\n") if line.startswith(b"data: ")]
    last = json.loads(events[-1][len(b"data: "):])
    assert last["error"]["code"] == "node_stopping", events[-3:]
    assert b"[DONE]" not in streamed["body"]
    text = node.text()
    assert "drain_timeout_s ran out with 1 request(s) left" in text
    assert_clean_log(text)


@pytest.mark.llama
def test_a_model_file_replaced_on_disk_restarts_its_child(tmp_path: Path, free_port: Any,
                                                          tiny_models: dict[str, Path], llama_server_bin: str) -> None:
    model = tmp_path / "m.gguf"
    shutil.copy(tiny_models["tiny-a"], model)
    node = Node(tmp_path, base_config(tmp_path, free_port(), metrics_interval_s=0.2,
                                      models={"m": {"path": str(model)}}))
    try:
        assert request(node.port, "POST", "/v1/chat/completions", chat("m"))[0] == 200
        before = node.pid_of("m")
        assert before
        staged = tmp_path / "m.gguf.new"
        shutil.copy(tiny_models["tiny-b"], staged)
        os.replace(staged, model)  # a new inode under the same name, as a deploy would do it
        after = wait_until(lambda: (pid := node.pid_of("m")) not in (None, before) and pid, START_S,
                           "the child to restart on the new file")
        assert after != before
        node.wait_log(r"model file\(s\) of m changed on disk", "the log line")
        assert request(node.port, "POST", "/v1/chat/completions", chat("m"))[0] == 200
        assert node.stop() == 0
    finally:
        node.kill()
    assert_clean_log(node.text())
