"""Two ways to run, one service — in real subprocesses.

``rolemesh-node-agent --config C`` and ``twistd [-n] rolemesh-node --config C``
(foreground and daemonized, with a pidfile) serve the same node and stop
cleanly. These are plain synchronous tests (subprocess + urllib): the configs
use ``backend: cpu`` and a model whose file does not exist, so no
``llama-server`` is started — except the ``--demo`` test, which needs the real
binary. Every wait is a bounded poll; every process is killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.subprocs import REPO, assert_clean_log, env, wait_until

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
AGENT = str(BIN / "rolemesh-node-agent")
TWISTD = str(BIN / "twistd")

START_S = 20.0  # bound on a node coming up (Twisted's import is most of it)
STOP_S = 10.0  # bound on a clean stop ("within a few seconds"; generous for loaded CI machines)


# --------------------------------------------------------------------------
# helpers


def write_node_config(directory: Path, port: int) -> Path:
    path = directory / "node.yaml"
    path.write_text(
        "listen_host: 127.0.0.1\n"
        f"listen_port: {port}\n"
        "backend: cpu\n"
        f"state_dir: {directory / 'state'}\n"
        "models:\n"
        "  ghost:\n"
        "    path: ghost.gguf  # never there: no llama-server is needed\n")
    return path


def http_json(url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def health(port: int) -> Any:
    """The /health document, or None while nothing answers."""
    try:
        status, doc = http_json(f"http://127.0.0.1:{port}/health", timeout=2.0)
    except (OSError, ValueError):
        return None
    return doc if status == 200 else None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return not re.search(r"^State:\s+Z", status, re.MULTILINE)


def start(argv: list[str], cwd: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a foreground process; its stdout and stderr go to one file (no pipe to fill)."""
    out = cwd / "output.txt"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(argv, cwd=cwd, env=env(), stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, out


def wait_healthy(port: int, proc: subprocess.Popen[bytes] | None, out: Path | None) -> Any:
    def check() -> Any:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before serving:\n{out.read_text() if out else ''}")
        return health(port)

    return wait_until(check, START_S, f"/health on port {port}")


def wait_exit(proc: subprocess.Popen[bytes], out: Path) -> int:
    try:
        return proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {STOP_S}s after the signal:\n{out.read_text()}") from None


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def kill_pid(pid: int | None) -> None:
    if pid is not None and alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# (a) the plugin is found


def test_twistd_help_lists_rolemesh_node(tmp_path: Path) -> None:
    result = subprocess.run([TWISTD, "--help"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+rolemesh-node\s+\S", result.stdout, re.MULTILINE), result.stdout
    assert_clean_log(result.stderr)


def test_twistd_subcommand_help(tmp_path: Path) -> None:
    result = subprocess.run([TWISTD, "rolemesh-node", "--help"], cwd=tmp_path, env=env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_get_plugins_finds_the_service_maker() -> None:
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    from rolemesh_node import tap

    makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "rolemesh-node"]
    assert len(makers) == 1
    maker = makers[0]
    assert maker.module == "rolemesh_node.tap"  # ServiceMaker imports it lazily
    assert maker.options is tap.Options
    assert maker.description


def test_plugin_found_from_a_normal_install_layout(tmp_path: Path) -> None:
    """A wheel puts the plugin file into Twisted's own ``twisted/plugins``,
    next to Twisted's ``dropin.cache`` (which does not list it yet). Built
    here by hand: a copy of Twisted with the plugin file dropped in, run with
    ``python -S`` so the editable install's path (this checkout) is not seen."""
    import shutil

    import twisted

    site = tmp_path / "site"
    shutil.copytree(Path(twisted.__file__).parent, site / "twisted", symlinks=True)
    plugins = site / "twisted" / "plugins"
    stale = (plugins / "dropin.cache").read_bytes() if (plugins / "dropin.cache").exists() else b""
    assert b"rolemesh_node_plugin" not in stale
    shutil.copy(REPO / "twisted" / "plugins" / "rolemesh_node_plugin.py", plugins)
    (site / "rolemesh_node").symlink_to(REPO / "rolemesh_node")
    deps = [p for p in sys.path if p.endswith("site-packages")]  # zope.interface, klein, ... (after ours)
    code = (
        "import sys, twisted, twisted.plugin, twisted.plugins\n"
        "from twisted.application.service import IServiceMaker\n"
        f"assert twisted.__file__.startswith({str(site)!r}), twisted.__file__\n"
        f"assert not any(p.startswith({str(REPO)!r}) for p in twisted.plugins.__path__), twisted.plugins.__path__\n"
        "names = [p.tapname for p in twisted.plugin.getPlugins(IServiceMaker)]\n"
        "assert 'rolemesh-node' in names, names\n"
        "from twisted.scripts.twistd import run\n"
        "sys.argv = ['twistd', '--help']\n"
        "run()\n")
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env=env() | {"PYTHONPATH": os.pathsep.join([str(site), *deps])})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\s+rolemesh-node\s+\S", result.stdout, re.MULTILINE), result.stdout
    assert_clean_log(result.stderr)
    # the stale cache was rewritten, now listing the plugin
    assert b"rolemesh_node_plugin" in (plugins / "dropin.cache").read_bytes()


def test_plugin_module_imports_nothing_heavy(tmp_path: Path) -> None:
    # An import error in the plugin file only hides the subcommand, so it must
    # stay trivial: no service, no HTTP stack, no config parsing at import time.
    code = ("import sys, twisted.plugins.rolemesh_node_plugin as p; "
            "heavy = [m for m in ('rolemesh_node.service', 'rolemesh_node.tap', 'treq', 'klein', 'yaml') "
            "if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_plugin_packaging() -> None:
    # twisted/plugins is merged into Twisted's own package: it must not be a
    # package of ours, and the wheel must ship the plugin file itself.
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"twisted/plugins/rolemesh_node_plugin.py"' in pyproject


# --------------------------------------------------------------------------
# (b) rolemesh-node-agent in the foreground


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_agent_foreground_serves_and_stops(tmp_path: Path, free_port: Any, signum: int) -> None:
    port = free_port()
    config = write_node_config(tmp_path, port)
    proc, out = start([AGENT, "--config", str(config)], tmp_path)
    try:
        doc = wait_healthy(port, proc, out)
        assert doc["status"] == "ok" and doc["devices"] == 1
        status, models = http_json(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200 and models["data"][0]["state"] == "unavailable"
        proc.send_signal(signum)
        assert wait_exit(proc, out) == 0
    finally:
        kill_group(proc)
    text = out.read_text()
    assert f"rolemesh-node listening on http://127.0.0.1:{port}" in text
    assert re.search(rf"received {signal.Signals(signum).name}, stopping", text), text
    assert_clean_log(text)
    assert health(port) is None


def test_agent_port_in_use_exits_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_node_config(tmp_path, port)
        result = subprocess.run([AGENT, "--config", str(config)], cwd=tmp_path, env=env(), capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert_clean_log(result.stdout + result.stderr)


# --------------------------------------------------------------------------
# (c) twistd -n: the same service through the plugin, in the foreground


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_twistd_foreground_serves_and_stops(tmp_path: Path, free_port: Any, signum: int) -> None:
    port = free_port()
    config = write_node_config(tmp_path, port)
    pidfile = tmp_path / "fg.pid"
    proc, out = start([TWISTD, "-n", "--pidfile", str(pidfile), "rolemesh-node", "--config", str(config)],
                      tmp_path)
    try:
        doc = wait_healthy(port, proc, out)
        assert doc["status"] == "ok"
        status, inventory = http_json(f"http://127.0.0.1:{port}/v1/node/inventory")
        assert status == 200 and inventory["backend"] == "cpu"
        proc.send_signal(signum)
        assert wait_exit(proc, out) == 0
    finally:
        kill_group(proc)
    text = out.read_text()
    assert f"rolemesh-node listening on http://127.0.0.1:{port}" in text  # logged to stdout
    assert_clean_log(text)
    assert not pidfile.exists()


# --------------------------------------------------------------------------
# log_level applies to both ways of running


@pytest.mark.parametrize("runner", [
    pytest.param([AGENT], id="rolemesh-node-agent"),
    pytest.param([TWISTD, "-n", "--pidfile", "", "rolemesh-node"], id="twistd-n"),
])
def test_log_level_is_honoured(tmp_path: Path, free_port: Any, runner: list[str]) -> None:
    port = free_port()
    config = write_node_config(tmp_path, port)
    config.write_text(config.read_text() + "log_level: warn\n")
    proc, out = start([*runner, "--config", str(config)], tmp_path)
    try:
        wait_healthy(port, proc, out)
        proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, out) == 0
    finally:
        kill_group(proc)
    text = out.read_text()
    assert not re.search(r"\[rolemesh_node[.\w]*#(info|debug)\]", text), text


# --------------------------------------------------------------------------
# (d) twistd daemonized, with a pidfile and a logfile


# Runs a command as a child subreaper (Linux): the daemon that twistd forks
# off is re-parented to this launcher instead of init, so the launcher can
# report the daemon's own exit status — "exit 0" is checkable, not assumed.
SUBREAPER = r"""
import ctypes, json, os, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    print(json.dumps({"subreaper": False}), flush=True)
print(json.dumps({"launcher": subprocess.call(sys.argv[1:])}), flush=True)
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def reaped(out: Path) -> dict[str, Any]:
    """What the subreaper launcher printed: launcher's exit and {pid: exit}."""
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    result: dict[str, Any] = {"exits": {}}
    for item in lines:
        if "pid" in item:
            result["exits"][item["pid"]] = item["exit"]
        else:
            result.update(item)
    return result


def daemon_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def run_daemon_and_kill(tmp_path: Path, port: int, config: Path, while_up: Callable[[], Any]) -> dict[int, int]:
    """``twistd --logfile F --pidfile P rolemesh-node --config C``; check the
    launch, the pidfile, /health and the logfile; call ``while_up()``; then
    ``kill $(cat P)`` and check the daemon exited 0 and removed its pidfile.
    Returns ``{pid: exit}`` of every process the launcher reaped: the daemon's
    intermediate fork, the daemon, and any orphan the daemon left behind."""
    logfile, pidfile = tmp_path / "node.log", tmp_path / "node.pid"
    proc, out = start([sys.executable, "-c", SUBREAPER, TWISTD, "--logfile", str(logfile), "--pidfile",
                       str(pidfile), "rolemesh-node", "--config", str(config)], tmp_path)
    pid: int | None = None
    try:
        # the command itself returns 0 at once, leaving the daemon behind
        launched = wait_until(lambda: "launcher" in reaped(out) and reaped(out), START_S, "twistd to return")
        assert launched.get("subreaper", True), "prctl(PR_SET_CHILD_SUBREAPER) failed"
        assert launched["launcher"] == 0, out.read_text()
        pid = wait_until(lambda: daemon_pid(pidfile), START_S, "the pidfile")
        assert alive(pid)
        doc = wait_healthy(port, None, None)
        assert doc["status"] == "ok"
        wait_until(lambda: f"rolemesh-node listening on http://127.0.0.1:{port}" in logfile.read_text(),
                   START_S, "the listening line in the logfile")
        while_up()

        os.kill(pid, signal.SIGTERM)  # kill $(cat P)
        wait_until(lambda: not alive(pid), STOP_S, f"daemon {pid} to exit")
        assert not pidfile.exists()
        assert proc.wait(timeout=STOP_S) == 0  # the launcher ends once it reaped the daemon
    finally:
        kill_pid(pid)
        kill_group(proc)
    exits = reaped(out)["exits"]
    assert exits.get(pid) == 0, out.read_text()  # exit 0, not "killed by SIGTERM"
    text = logfile.read_text()
    assert "received SIGTERM, stopping" in text
    assert "Server Shut Down." in text  # twistd's last line after a clean stop
    assert_clean_log(text)
    assert health(port) is None
    return exits


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the daemon's exit status is read through a Linux child subreaper")


@linux_only
def test_twistd_daemon_pidfile_logfile_and_kill(tmp_path: Path, free_port: Any) -> None:
    port = free_port()
    run_daemon_and_kill(tmp_path, port, write_node_config(tmp_path, port), lambda: None)


@linux_only
@pytest.mark.llama
def test_twistd_daemon_stops_its_llama_server(tmp_path: Path, free_port: Any, llama_server_bin: str,
                                               tiny_models: dict[str, Path]) -> None:
    # twistd's daemon mode has had trouble reaping children (twisted#9562):
    # the stop path is checked here with a real child, not only in the foreground.
    port = free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        f"listen_port: {port}\nbackend: cpu\nstate_dir: {tmp_path / 'state'}\n"
        f"llama_server_bin: {llama_server_bin}\n"
        f"models:\n  tiny-a:\n    path: {tiny_models['tiny-a']}\n    ctx_size: 256\n")
    children: list[int] = []

    def while_up() -> None:
        status, completion = http_json(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
        assert status == 200, completion
        _, inventory = http_json(f"http://127.0.0.1:{port}/v1/node/inventory")
        children.extend(d["child"]["pid"] for d in inventory["devices"] if d["child"]["pid"])
        assert len(children) == 1 and alive(children[0])

    try:
        exits = run_daemon_and_kill(tmp_path, port, config, while_up)
        assert not alive(children[0]), "llama-server outlived the daemon"
        # reaped by the daemon itself: had it exited first, the orphan would
        # have been re-parented to (and reaped by) the launcher
        assert children[0] not in exits, exits
    finally:
        for child in children:
            kill_pid(child)


# --------------------------------------------------------------------------
# (e) --demo: a working node with the real llama-server


@pytest.mark.llama
def test_demo_answers_its_printed_curl(tmp_path: Path, free_port: Any, llama_server_bin: str) -> None:
    port = free_port()
    demo_dir = tmp_path / "demo"
    proc, out = start([AGENT, "--demo", "--demo-dir", str(demo_dir), "--port", str(port)], tmp_path)
    child_pid: int | None = None
    try:
        wait_healthy(port, proc, out)
        banner = out.read_text()
        # the printed curl, replayed with urllib
        match = re.search(r"curl -s (\S+/v1/chat/completions) -H 'Content-Type: application/json' \\\n"
                          r"\s+-d '([^']+)'", banner)
        assert match, banner
        url, body = match.group(1), json.loads(match.group(2))
        assert url == f"http://127.0.0.1:{port}/v1/chat/completions"
        status, completion = http_json(url, body, timeout=60)
        assert status == 200, completion
        assert completion["object"] == "chat.completion"
        assert completion["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(completion["choices"][0]["message"]["content"], str)

        status, inventory = http_json(f"http://127.0.0.1:{port}/v1/node/inventory")
        assert status == 200
        children = [d["child"] for d in inventory["devices"] if d["child"] and d["child"]["pid"]]
        assert len(children) == 1 and children[0]["state"] == "ready", inventory["devices"]
        child_pid = children[0]["pid"]
        assert alive(child_pid)
        assert inventory["llama_server_bin"]

        proc.send_signal(signal.SIGINT)
        assert wait_exit(proc, out) == 0
        wait_until(lambda: not alive(child_pid), STOP_S, f"llama-server {child_pid} to be gone")
    finally:
        kill_group(proc)
        kill_pid(child_pid)
    assert_clean_log(out.read_text())
