"""A small, lean HTTP/1.1 keep-alive load generator (a separate process).

It runs as ``python -m bench.loadgen``: it reads one JSON job per line on
stdin and writes one JSON result per line on stdout, so the orchestrator keeps
one warm generator process for the whole run and every target (direct
llama-server, router mode, rolemesh-node) is driven by the very same code.

A job is a closed loop: ``conns`` keep-alive connections, each sending its next
request as soon as the previous answer is complete, until ``max_requests``
answers or ``max_seconds`` have passed (whichever first). Per request it
records, in microseconds since the request was sent: the first response byte,
the first body byte (for SSE: the first event) and the end of the answer, plus
the status code. Raw sockets + ``selectors`` (epoll), no HTTP library: per
request the generator spends a few tens of microseconds of CPU, the same for
every target.

Jobs (``kind``: ``closed``, or ``quit``): ``bodies`` (list of str) are sent
round-robin per connection (two bodies alternating = model swaps). With
``slow_body`` (overload), one long request first goes out on its own
connection (and again whenever it ends) to keep the device busy; after
``settle_s`` the loop runs, and with ``expect_status`` only answers with that
status are timed (the others are only counted in ``statuses``). With
``count_events`` every answer's SSE events are counted (``data:`` lines of the
de-chunked body, ``data: [DONE]`` included): ``events`` per timed answer, in
completion order like ``lat_us``, and ``events_total``. The relay phase sends
each of ``conns`` connections one ``ignore_eos`` stream (``max_requests`` =
``conns``), so ``lat_us`` is each stream's completion.

A server that closes a keep-alive connection before answering the next request
(llama-server does after every streamed answer) gets that request again on a
new connection; its clock restarts after the connect (``reconnects`` counts
them).
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time
from typing import Callable

perf_ns = time.perf_counter_ns


class Conn:
    """One keep-alive connection with an incremental response parser."""

    __slots__ = ("sock", "host", "port", "reqs", "i", "buf", "t0", "t_first", "t_body", "status",
                 "state", "clen", "chunk_left", "close_after", "count", "events", "tail")

    def __init__(self, host: str, port: int, reqs: list[bytes], offset: int = 0, count: bool = False) -> None:
        self.host = host
        self.port = port
        self.reqs = reqs
        self.i = offset
        self.count = count  # count the answer's SSE events (``data:`` lines)
        self.events = 0
        self.tail = b"\n"
        self.sock: socket.socket | None = None
        self.connect()

    def sse(self, payload: bytes) -> None:
        """Count the ``data:`` lines in the next piece of the (de-chunked) body."""
        text = self.tail + payload
        self.events += text.count(b"\ndata:")
        self.tail = text[-5:]  # shorter than b"\ndata:": no line is counted twice

    def connect(self) -> None:
        s = socket.create_connection((self.host, self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        self.sock = s

    def send(self, again: bool = False) -> None:
        if again:  # the same request once more, on a fresh connection
            self.i -= 1
        req = self.reqs[self.i % len(self.reqs)]
        self.i += 1
        self.buf = b""
        self.state = 0  # 0 headers, 1 content-length body, 2 chunked, 3 until close
        self.t_first = self.t_body = 0
        self.status = 0
        self.close_after = False
        self.events = 0
        self.tail = b"\n"  # the body's first line is a line start
        self.t0 = perf_ns()
        self.sock.sendall(req)

    def feed(self, data: bytes, now: int) -> bool:
        """Feed received bytes; True when the answer is complete."""
        if not self.t_first:
            self.t_first = now
        buf = self.buf + data
        if self.state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return False
            head = buf[:end].split(b"\r\n")
            self.status = int(head[0].split(b" ", 2)[1])
            clen = None
            chunked = False
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    clen = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    self.close_after = True
            buf = buf[end + 4:]
            if chunked:
                self.state = 2
                self.chunk_left = -1
            elif clen is not None:
                self.state = 1
                self.clen = clen
            else:
                self.state = 3
                self.close_after = True
            if buf and not self.t_body:
                self.t_body = now
            if self.state == 1 and clen == 0:
                self.buf = b""
                return True
        elif buf and not self.t_body:
            self.t_body = now
        if self.state == 1:
            if len(buf) >= self.clen:
                if self.count:
                    self.sse(buf[:self.clen])
                self.buf = b""
                return True
            self.buf = buf
            return False
        if self.state == 2:
            return self._chunks(buf)
        self.buf = buf  # state 3: until the connection closes
        return False

    def _chunks(self, buf: bytes) -> bool:
        """chunk_left: -1 = a size line is next, -2 = the final CRLF is next, >0 = bytes of data+CRLF."""
        pos = 0
        n = len(buf)
        while pos < n or self.chunk_left == -2:
            left = self.chunk_left
            if left == -2:
                if n - pos >= 2:
                    self.buf = b""
                    return True
                break
            if left == -1:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                self.chunk_left = -2 if size == 0 else size + 2  # (these servers send no trailers)
            else:
                take = min(left, n - pos)
                if self.count and left > 2:  # the chunk's data, not its closing CRLF
                    self.sse(buf[pos:pos + min(take, left - 2)])
                pos += take
                self.chunk_left = -1 if take == left else left - take
        self.buf = buf[pos:]
        return False


def build_request(host: str, port: int, path: str, body: str) -> bytes:
    raw = body.encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: */*\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw


def closed_loop(job: dict) -> dict:
    """Run one closed-loop job (see the module docstring); return raw timings."""
    host, port = job.get("host", "127.0.0.1"), job["port"]
    reqs = [build_request(host, port, job["path"], b) for b in job["bodies"]]
    conns_n = job.get("conns", 1)
    max_requests = job.get("max_requests", 1000)
    expect = job.get("expect_status")  # only answers with this status are timed
    deadline = perf_ns() + int(job.get("max_seconds", 5.0) * 1e9)
    sel = selectors.DefaultSelector()
    slow: Conn | None = None
    slow_sent = 0
    if job.get("slow_body"):
        # overload: one request that keeps the device busy, sent again whenever it ends
        slow = Conn(host, port, [build_request(host, port, job["slow_path"], job["slow_body"])])
        sel.register(slow.sock, selectors.EVENT_READ, slow)
        slow.send()
        slow_sent = 1
        time.sleep(job.get("settle_s", 0.2))
    count = bool(job.get("count_events"))
    conns = [Conn(host, port, reqs, offset=k, count=count) for k in range(conns_n)]
    events: list[int] = []
    lat: list[int] = []
    first: list[int] = []
    body: list[int] = []
    statuses: dict[int, int] = {}
    sent = errors = reconnects = 0

    def reopen(c: Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()
        c.connect()
        sel.register(c.sock, selectors.EVENT_READ, c)

    started = perf_ns()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
        c.send()
        sent += 1
    active = conns_n
    while active:
        for key, _ in sel.select(timeout=1.0):
            c: Conn = key.data
            try:
                data = c.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            now = perf_ns()
            if not data and not c.t_first:
                # Closed before any byte of this answer: the server ended the
                # keep-alive connection after the previous answer (llama-server
                # does so after every streamed answer). Reconnect and send the
                # same request again; its clock restarts after the connect.
                reopen(c)
                c.send(again=True)
                reconnects += 1
                continue
            if data:
                if not c.feed(data, now):
                    continue
                complete = True
            else:  # closed mid-answer: complete only when the length was "until close"
                complete = c.state == 3 and c.status != 0
                if complete and c.count:
                    c.sse(c.buf)
                if not complete:
                    errors += 1
                c.close_after = True
            if c is slow:
                reopen(slow)
                slow.send()
                slow_sent += 1
                continue
            if complete:
                statuses[c.status] = statuses.get(c.status, 0) + 1
                if expect is None or c.status == expect:
                    lat.append(now - c.t0)
                    first.append(c.t_first - c.t0)
                    body.append((c.t_body or now) - c.t0)
                    if count:
                        events.append(c.events)
            if sent >= max_requests or now >= deadline:
                sel.unregister(c.sock)
                c.sock.close()
                active -= 1
                continue
            if c.close_after:
                reopen(c)
            c.send()
            sent += 1
        if perf_ns() > deadline + 30_000_000_000:  # a stuck server: give up 30 s past the bound
            errors += active
            break
    elapsed = perf_ns() - started
    for c in ([slow] if slow else []) + conns:
        try:
            c.sock.close()
        except OSError:
            pass
    sel.close()
    out = {
        "n": len(lat), "elapsed_s": elapsed / 1e9, "errors": errors, "reconnects": reconnects,
        "statuses": {str(k): v for k, v in statuses.items()}, "slow_sent": slow_sent,
        # whole microseconds, in completion order
        "lat_us": [x // 1000 for x in lat], "first_byte_us": [x // 1000 for x in first],
        "first_body_us": [x // 1000 for x in body],
    }
    if count:  # per answer (completion order, as lat_us): its SSE events; and their sum
        out.update(events=events, events_total=sum(events))
    return out


def serve(jobs: dict[str, Callable[[dict], dict]]) -> None:
    """One JSON job per line on stdin, one JSON result per line on stdout, until ``{"kind": "quit"}``
    (or the end of stdin); ``jobs`` maps a job's ``kind`` to what runs it. A job that fails is
    answered ``{"error": ...}`` and the next one is served."""
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        job = json.loads(line)
        try:
            kind = job["kind"]
            if kind == "quit":
                return
            run = jobs.get(kind)
            out = run(job) if run is not None else {"error": f"unknown job kind {kind!r}"}
        except Exception as exc:  # report, keep serving
            out = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def main() -> None:
    serve({"closed": closed_loop})


if __name__ == "__main__":
    main()
