#!/usr/bin/env python3
"""A fast fake ``llama-server``: what the node needs from a child, cheap per token.

For the scale bench (:mod:`bench.scale`): the node runs it as its
``llama_server_bin`` (through a small wrapper script), so thousands of
streams go through the node's real code while the "model" costs next to
nothing. Standard library only; one thread, raw sockets and ``selectors``
(epoll), like :mod:`bench.loadgen`.

Command line: llama-server's, as the node gives it (``--host``, ``--port``,
``-m``, ``--alias``, ``-np``, ``-c``; every other flag, e.g. ``--threads`` or
``-ngl``, is accepted and ignored), plus its own:

* ``--fake-tps N``: tokens per second *per stream* (default 50); token *k* of a
  request goes out at *k*/N seconds after it arrived, one token event per
  ``send``; a non-streamed answer comes after max_tokens/N seconds. A request
  may set its own rate with a ``"fake_tps"`` field (a real llama-server
  ignores it);
* ``--version`` / ``--list-devices``: answered like llama-server (stderr / stdout, exit 0).

It answers like llama-server b11434 (the shapes were captured from the real
binary with the tiny model): ``GET /health`` → ``{"status":"ok"}``;
``GET /v1/models`` (and ``/models``) → the listing with ``meta``; ``GET /slots``
→ one entry per slot (the ones generating with ``id_task``,
``n_prompt_tokens_processed`` and ``next_token[0].n_decoded``, which the node's
liveness check reads for progress); ``GET /props``; anything else 404
``File Not Found``. ``POST /v1/chat/completions`` and ``/v1/completions``:

* not streamed: one JSON answer with ``usage`` and ``timings``, keep-alive;
* ``"stream": true``: ``text/event-stream``, chunked, one HTTP chunk per token
  event — a chat stream's first chunk carries the role event and the first
  token, its last event ``finish_reason: "length"`` with ``timings`` (and a
  ``usage`` event after it with ``stream_options.include_usage``); a completion
  stream's last event has ``usage`` and ``timings``; then ``data: [DONE]``, the
  last chunk, and the connection is closed (llama-server closes after every
  streamed answer).

Every answer runs to ``max_tokens`` (``n_predict``; default 16): tokens are
single letters, ``finish_reason`` is always ``"length"``, as with the tiny
model. Unlike llama-server, ``-np`` does not bound the requests generated at
once (it only sizes ``/slots``). A client that closes its connection ends its
stream.
"""

from __future__ import annotations

import heapq
import json
import os
import selectors
import socket
import sys
import time

VERSION = "version: 0 (bench/fakechild.py)\nbuilt with Python for a fake llama-server\n"

#: flags that take a value; every other argument is ignored (llama-server's own flags, their values)
VALUED = {"--host": "host", "--port": "port", "-m": "model", "--model": "model", "-a": "alias",
          "--alias": "alias", "-np": "parallel", "--parallel": "parallel", "-c": "ctx", "--ctx-size": "ctx",
          "--fake-tps": "tps"}

LETTERS = "abcdefghijklmnopqrstuvwxyz"
FINGERPRINT = "b0-unknown"

HEAD_STREAM = (b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\nX-Accel-Buffering: no\r\n"
               b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n"
               b"\r\n")
DONE = b"data: [DONE]\n\n"


def parse_argv(argv: list[str]) -> dict:
    opts = {"host": "127.0.0.1", "port": "8080", "model": "model.gguf", "alias": None, "parallel": "1",
            "ctx": "4096", "tps": "50", "version": False, "list_devices": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in VALUED:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            opts[VALUED[name]] = value
        elif arg == "--version":
            opts["version"] = True
        elif arg == "--list-devices":
            opts["list_devices"] = True
        i += 1
    return opts


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def response(status: int, reason: str, doc: object, close: bool = False) -> bytes:
    body = json.dumps(doc, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "Keep-Alive: timeout=5, max=100\r\n")
            + "\r\n").encode() + body


def error(status: int, reason: str, message: str, kind: str, close: bool = False) -> bytes:
    return response(status, reason, {"error": {"code": status, "message": message, "type": kind}}, close)


class Conn:
    __slots__ = ("sock", "rbuf", "wbuf", "close_when_flushed", "gen", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rbuf = b""
        self.wbuf = b""
        self.close_when_flushed = False
        self.gen: Generation | None = None  # the answer being generated on this connection
        self.writing = False


class Generation:
    """One request being answered: its tokens go out on a schedule."""

    __slots__ = ("server", "conn", "chat", "stream", "n", "sent", "t0", "id", "created", "pre", "post", "size",
                 "prompt_tokens", "usage_event", "slot", "task", "tps")

    def __init__(self, server: "FakeServer", conn: Conn, chat: bool, stream: bool, n: int, prompt_tokens: int,
                 include_usage: bool, t0: float, tps: float) -> None:
        self.server = server
        self.tps = tps
        self.conn = conn
        self.chat = chat
        self.stream = stream
        self.n = n
        self.sent = 0
        self.t0 = t0
        server.tasks += 1
        self.task = server.tasks
        self.id = "chatcmpl-fake%027d" % self.task
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.usage_event = include_usage
        model = server.model_id
        tail = (f',"created":{self.created},"id":"{self.id}","model":"{model}",'
                f'"system_fingerprint":"{FINGERPRINT}","object":"chat.completion.chunk"}}\n\n')
        if chat:
            self.pre = b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"'
            self.post = ('"}}]' + tail).encode()
        else:
            self.pre = b'data: {"choices":[{"text":"'
            self.post = (f'","index":0,"logprobs":null,"finish_reason":null}}],"created":{self.created},'
                         f'"model":"{model}","system_fingerprint":"{FINGERPRINT}","object":"text_completion",'
                         f'"id":"{self.id}"}}\n\n').encode()
        self.size = b"%x\r\n" % (len(self.pre) + 1 + len(self.post))
        self.slot = server.take_slot()

    def due(self) -> float:
        return self.t0 + (self.sent + 1) / self.tps if self.stream else self.t0 + self.n / self.tps

    def timings(self, now: float) -> dict:
        ms = max(1e-3, (now - self.t0) * 1000.0)
        n = max(1, self.n)
        return {"cache_n": 0, "prompt_n": self.prompt_tokens, "prompt_ms": 0.5,
                "prompt_per_token_ms": 0.5 / self.prompt_tokens, "prompt_per_second": self.prompt_tokens / 0.0005,
                "predicted_n": self.n, "predicted_ms": ms, "predicted_per_token_ms": ms / n,
                "predicted_per_second": n * 1000.0 / ms}

    def usage(self) -> dict:
        return {"completion_tokens": self.n, "prompt_tokens": self.prompt_tokens,
                "total_tokens": self.n + self.prompt_tokens, "prompt_tokens_details": {"cached_tokens": 0}}

    def step(self, now: float) -> bool:
        """Send what is due; True while more is to come."""
        server = self.server
        if not self.stream:
            server.send(self.conn, response(200, "OK", self.whole(now)))
            return False
        if self.sent < self.n:
            token = LETTERS[self.sent % 26].encode()
            data = self.size + self.pre + token + self.post + b"\r\n"
            if self.sent == 0:
                data = HEAD_STREAM + (chunk(self.role_event() + self.pre + token + self.post) if self.chat else data)
            self.sent += 1
            server.tokens += 1
            server.send(self.conn, data)
            if self.sent < self.n:
                return True
        if self.sent == 0:  # max_tokens 0: headers, then the end at once
            server.send(self.conn, HEAD_STREAM)
        server.send(self.conn, chunk(self.final_events(now)) + chunk(DONE) + b"0\r\n\r\n", close=True)
        return False

    def role_event(self) -> bytes:
        doc = {"choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}],
               "created": self.created, "id": self.id, "model": self.server.model_id,
               "system_fingerprint": FINGERPRINT, "object": "chat.completion.chunk"}
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    def final_events(self, now: float) -> bytes:
        model = self.server.model_id
        if self.chat:
            doc: dict = {"choices": [{"finish_reason": "length", "index": 0, "delta": {}}], "created": self.created,
                         "id": self.id, "model": model, "system_fingerprint": FINGERPRINT,
                         "object": "chat.completion.chunk"}
            if not self.usage_event:
                doc["timings"] = self.timings(now)
                return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
            usage = {"choices": [], "created": self.created, "id": self.id, "model": model,
                     "system_fingerprint": FINGERPRINT, "object": "chat.completion.chunk", "usage": self.usage(),
                     "timings": self.timings(now)}
            return b"".join(b"data: " + json.dumps(d, separators=(",", ":")).encode() + b"\n\n" for d in (doc, usage))
        doc = {"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}],
               "created": self.created, "model": model, "system_fingerprint": FINGERPRINT,
               "object": "text_completion", "usage": self.usage(), "id": self.id, "timings": self.timings(now)}
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    def whole(self, now: float) -> dict:
        text = "".join(LETTERS[i % 26] for i in range(self.n))
        model = self.server.model_id
        if self.chat:
            return {"choices": [{"finish_reason": "length", "index": 0,
                                 "message": {"role": "assistant", "content": text}}],
                    "created": self.created, "model": model, "system_fingerprint": FINGERPRINT,
                    "object": "chat.completion", "usage": self.usage(), "id": self.id,
                    "timings": self.timings(now)}
        return {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "length"}],
                "created": self.created, "model": model, "system_fingerprint": FINGERPRINT,
                "object": "text_completion", "usage": self.usage(), "id": self.id, "timings": self.timings(now)}

    def slot_entry(self) -> dict:
        return {"id": self.slot, "n_ctx": self.server.slot_ctx, "speculative": False, "is_processing": True,
                "id_task": self.task, "n_prompt_tokens": self.prompt_tokens,
                "n_prompt_tokens_processed": self.prompt_tokens,
                "next_token": [{"has_next_token": True, "has_new_line": False, "n_remain": self.n - self.sent,
                                "n_decoded": self.sent}]}


class FakeServer:
    def __init__(self, opts: dict) -> None:
        self.host = opts["host"]
        self.port = int(opts["port"])
        self.model_path = opts["model"]
        name = os.path.basename(self.model_path)
        self.model_id = opts["alias"] or (name[:-5] if name.endswith(".gguf") else name)
        self.parallel = max(1, int(opts["parallel"]))
        self.ctx = int(opts["ctx"])
        self.slot_ctx = max(1, self.ctx // self.parallel)
        self.tps = float(opts["tps"])
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Generation]] = []
        self.seq = 0
        self.tasks = 0
        self.tokens = 0
        self.live: set[Generation] = set()
        self.free_slots = list(range(self.parallel - 1, -1, -1))
        self.extra_slot = self.parallel

    # ------------------------------------------------------------ slots

    def take_slot(self) -> int:
        if self.free_slots:
            return self.free_slots.pop()
        self.extra_slot += 1  # more at once than -np: llama-server would queue them; this one does not
        return self.extra_slot - 1

    def give_slot(self, slot: int) -> None:
        if slot < self.parallel:
            self.free_slots.append(slot)

    # ------------------------------------------------------------ I/O

    def listen(self) -> None:
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.lsock.bind((self.host, self.port))
        except OSError as exc:
            sys.stderr.write(f"main: couldn't bind HTTP server socket, hostname: {self.host}, port: {self.port}: "
                             f"{exc}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        sys.stderr.write(f"main: model loaded\nmain: server is listening on http://{self.host}:{self.port} - "
                         "starting the main loop\nsrv  update_slots: all slots are idle\n")
        sys.stderr.flush()

    def accept(self) -> None:
        for _ in range(256):
            try:
                sock, _addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock)
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def close(self, conn: Conn) -> None:
        if conn.sock is None:
            return
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.sock = None  # type: ignore[assignment]
        gen = conn.gen
        if gen is not None:
            self.end(gen)

    def end(self, gen: Generation) -> None:
        if gen in self.live:
            self.live.discard(gen)
            self.give_slot(gen.slot)
        if gen.conn.gen is gen:
            gen.conn.gen = None

    def send(self, conn: Conn, data: bytes, close: bool = False) -> None:
        if conn.sock is None:
            return
        if close:
            conn.close_when_flushed = True
        if conn.wbuf:
            conn.wbuf += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(conn)
            return
        if sent < len(data):
            conn.wbuf = data[sent:]
            if not conn.writing:
                conn.writing = True
                self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        elif conn.close_when_flushed:
            self.close(conn)

    def flush(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        conn.wbuf = conn.wbuf[sent:]
        if not conn.wbuf:
            conn.writing = False
            self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
            if conn.close_when_flushed:
                self.close(conn)

    def readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        conn.rbuf += data
        while conn.sock is not None and conn.gen is None and not conn.close_when_flushed:
            if not self.request(conn):
                break

    # ------------------------------------------------------------ HTTP

    def request(self, conn: Conn) -> bool:
        """Parse one complete request off the buffer and answer it; False when incomplete."""
        buf = conn.rbuf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self.send(conn, error(400, "Bad Request", "request headers too large", "invalid_request_error",
                                      True), close=True)
            return False
        lines = buf[:end].split(b"\r\n")
        try:
            method, target, version = lines[0].split(b" ", 2)
        except ValueError:
            self.send(conn, error(400, "Bad Request", "bad request line", "invalid_request_error", True), close=True)
            return False
        length = 0
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip() or 0)
            elif name == b"connection":
                v = value.strip().lower()
                close = v == b"close" or (close and v != b"keep-alive")
        if len(buf) < end + 4 + length:
            return False
        body = buf[end + 4:end + 4 + length]
        conn.rbuf = buf[end + 4 + length:]
        path = target.split(b"?", 1)[0]
        self.answer(conn, method, path, body, close)
        return True

    def answer(self, conn: Conn, method: bytes, path: bytes, body: bytes, close: bool) -> None:
        if method in (b"GET", b"HEAD"):
            if path == b"/health":
                out = response(200, "OK", {"status": "ok"}, close)
            elif path in (b"/v1/models", b"/models"):
                out = response(200, "OK", self.models(), close)
            elif path == b"/slots":
                out = response(200, "OK", self.slots(), close)
            elif path == b"/props":
                out = response(200, "OK", self.props(), close)
            else:
                out = error(404, "Not Found", "File Not Found", "not_found_error", close)
            self.send(conn, out, close=close)
            return
        if method != b"POST" or path not in (b"/v1/chat/completions", b"/chat/completions", b"/v1/completions",
                                             b"/completions", b"/completion"):
            self.send(conn, error(404, "Not Found", "File Not Found", "not_found_error", close), close=close)
            return
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self.send(conn, error(400, "Bad Request", f"[json.exception.parse_error.101] parse error: {exc}",
                                  "invalid_request_error", True), close=True)
            return
        chat = b"chat" in path
        n = doc.get("max_tokens", doc.get("n_predict", doc.get("max_completion_tokens", 16)))
        n = n if isinstance(n, int) and n >= 0 else 16
        stream = doc.get("stream") is True
        options = doc.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        prompt = doc.get("messages") if chat else doc.get("prompt")
        prompt_tokens = max(1, len(json.dumps(prompt)) // 4)
        tps = doc.get("fake_tps")  # this fake's own field: the rate of this request (llama-server ignores it)
        tps = float(tps) if isinstance(tps, (int, float)) and not isinstance(tps, bool) and tps > 0 else self.tps
        gen = Generation(self, conn, chat, stream, n, prompt_tokens, include_usage, time.monotonic(), tps)
        conn.gen = gen
        if close and not stream:
            conn.close_when_flushed = True
        self.live.add(gen)
        self.schedule(gen)

    def schedule(self, gen: Generation) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (gen.due(), self.seq, gen))

    def models(self) -> dict:
        size = 0
        try:
            size = os.path.getsize(self.model_path)
        except OSError:
            pass
        meta = {"vocab_type": 1, "n_vocab": 314, "n_ctx": self.slot_ctx, "n_ctx_train": 2048, "n_embd": 64,
                "n_params": 122432, "size": size, "ftype": "all F32"}
        return {"models": [{"name": self.model_id, "model": self.model_id, "modified_at": "", "size": "",
                            "digest": "", "type": "model", "description": "", "tags": [""],
                            "capabilities": ["completion"], "parameters": "", "details": {}}],
                "object": "list",
                "data": [{"id": self.model_id, "aliases": [self.model_id], "tags": [], "object": "model",
                          "created": int(time.time()), "owned_by": "llamacpp", "meta": meta}]}

    def slots(self) -> list:
        busy = {g.slot: g.slot_entry() for g in self.live}
        out = [busy.pop(i, None) or {"id": i, "n_ctx": self.slot_ctx, "speculative": False, "is_processing": False}
               for i in range(self.parallel)]
        return out + [busy[k] for k in sorted(busy)]

    def props(self) -> dict:
        return {"default_generation_settings": {"n_ctx": self.slot_ctx, "params": {"n_predict": -1}},
                "total_slots": self.parallel, "model_alias": self.model_id, "model_path": self.model_path,
                "modalities": {"vision": False, "audio": False}, "chat_template": "", "bos_token": "",
                "eos_token": "", "build_info": "b0-fakechild", "webui": False}

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        self.listen()
        sel = self.sel
        timers = self.timers
        clock = time.monotonic
        quantum = 0.001  # tokens due within a millisecond go out in the same pass
        while True:
            timeout = None if not timers else max(0.0, timers[0][0] - clock())
            for key, mask in sel.select(timeout):
                conn = key.data
                if conn is None:
                    self.accept()
                    continue
                if mask & selectors.EVENT_WRITE and conn.sock is not None:
                    self.flush(conn)
                if mask & selectors.EVENT_READ and conn.sock is not None:
                    self.readable(conn)
            if not timers:
                continue
            limit = clock() + quantum
            while timers and timers[0][0] <= limit:
                gen = heapq.heappop(timers)[2]
                if gen.conn.gen is not gen or gen.conn.sock is None:
                    continue  # its client left
                if gen.step(clock()):
                    self.schedule(gen)
                else:
                    conn = gen.conn
                    self.end(gen)
                    if conn.sock is not None and conn.rbuf and not conn.close_when_flushed:
                        self.readable_buffered(conn)

    def readable_buffered(self, conn: Conn) -> None:
        """A pipelined request that came in while the previous one was answered."""
        while conn.sock is not None and conn.gen is None and not conn.close_when_flushed:
            if not self.request(conn):
                break


def main(argv: list[str] | None = None) -> int:
    opts = parse_argv(sys.argv[1:] if argv is None else argv)
    if opts["version"]:
        sys.stderr.write(VERSION)
        return 0
    if opts["list_devices"]:
        sys.stdout.write("Available devices:\n")
        return 0
    try:
        FakeServer(opts).run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
