"""The scale bench's client: many streams or many idle connections (a separate process).

``python -m bench.scaleclient`` reads one JSON job per line on stdin and writes
one JSON result per line on stdout (as :mod:`bench.loadgen`); it keeps idle
connections open *between* jobs, so the orchestrator can measure the node
while they sit there and the client does nothing at all. Raw sockets +
``selectors`` (epoll), non-blocking connects, no HTTP library.

Jobs (``kind``):

* ``streams`` — ``n`` streamed requests at once, each on a connection of its
  own, the connections opened evenly over ``ramp_s``; ``bodies`` are used
  round-robin. Per stream it decodes the chunked body and the SSE events
  in it: token events (a chat ``delta.content`` string or a completion's
  non-empty ``text``), the final event (``timings``/``usage``), ``[DONE]``,
  error events, comments. A stream is *complete* when its status is 200, it
  got ``tokens`` token events, its final event and ``[DONE]``, and the chunked
  body ended. Reports counts, statuses, errors, the peak number of streams in
  flight, token events per 250 ms, connect / first-byte / end times, and the
  client's own CPU.
* ``open`` — ``n`` keep-alive connections, each sends ``GET /health`` (at most
  ``outstanding`` unanswered at once: the node's listen backlog is small) and,
  once answered, is kept open and left alone under ``group``.
* ``close`` — for every kept connection: still open (nothing to read), closed by
  the server, or got unexpected bytes; then closes them all.
* ``quit``.
"""

from __future__ import annotations

import errno
import resource
import selectors
import socket
import time

from bench.loadgen import serve

perf = time.perf_counter
BUCKET_S = 0.25

CONNECTING, HEADERS, CHUNKED, PLAIN, FINISHED = range(5)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def connect(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = s.connect_ex((host, port))
    if err not in (0, errno.EINPROGRESS):
        s.close()
        raise OSError(err, errno.errorcode.get(err, str(err)))
    return s


def pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    xs = sorted(values)
    return {"p50": xs[len(xs) // 2], "p99": xs[min(len(xs) - 1, int(len(xs) * 0.99))], "max": xs[-1]}


class Stream:
    __slots__ = ("sock", "req", "state", "buf", "status", "chunk_left", "clen", "sse", "events", "tokens",
                 "comments", "done_event", "final", "error", "t_start", "t_conn", "t_first", "t_end", "chunks",
                 "ended")

    def __init__(self, sock: socket.socket, req: bytes, now: float) -> None:
        self.sock = sock
        self.req = req
        self.state = CONNECTING
        self.buf = b""
        self.status = 0
        self.chunk_left = -1  # -1: a size line next, -2: the CRLF after a chunk, >0: data left in this chunk
        self.clen = 0
        self.sse = b""
        self.events = self.tokens = self.comments = self.chunks = 0
        self.done_event = self.final = self.ended = False
        self.error: str | None = None
        self.t_start = now
        self.t_conn = self.t_first = self.t_end = 0.0

    def complete(self, tokens: int) -> bool:
        return (self.status == 200 and self.ended and self.done_event and self.final and self.tokens == tokens
                and self.error is None)

    def feed(self, data: bytes) -> bool:
        """Bytes of the answer; True when it has ended."""
        if self.state == HEADERS:
            buf = self.buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return False
            head = buf[:end].split(b"\r\n")
            self.status = int(head[0].split(b" ", 2)[1])
            chunked = False
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"content-length":
                    self.clen = int(value)
            self.buf = b""
            data = buf[end + 4:]
            self.state = CHUNKED if chunked else PLAIN
            if not data and not (self.state == PLAIN and self.clen == 0):
                return False
        if self.state == PLAIN:  # an error answer
            self.buf += data
            if len(self.buf) >= self.clen:
                self.error = f"status {self.status}: {self.buf[:200].decode('utf-8', 'replace')}"
                self.ended = True
                return True
            return False
        return self._chunks(data)

    def _chunks(self, data: bytes) -> bool:
        buf = self.buf + data if self.buf else data
        pos = 0
        n = len(buf)
        while True:
            left = self.chunk_left
            if left > 0:
                take = min(left, n - pos)
                if take:
                    self._payload(buf[pos:pos + take])
                    pos += take
                left -= take
                if left:
                    self.chunk_left = left
                    break
                self.chunk_left = -2
            elif left == -2:
                if n - pos < 2:
                    break
                pos += 2
                self.chunk_left = -1
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self.ended = True
                    self.buf = b""
                    return True
                self.chunks += 1
                self.chunk_left = size
        self.buf = buf[pos:]
        return False

    def _payload(self, data: bytes) -> None:
        parts = (self.sse + data).split(b"\n\n")
        self.sse = parts.pop()
        for ev in parts:
            if ev.startswith(b"data: "):
                if ev.startswith(b"data: [DONE]"):
                    self.done_event = True
                    continue
                self.events += 1
                if b'"error"' in ev[:40] or ev.startswith(b'data: {"error"'):
                    self.error = ev[6:300].decode("utf-8", "replace")
                elif b'{"content":"' in ev or (b'"text":"' in ev and b'"text":""' not in ev):
                    self.tokens += 1
                if b'"timings"' in ev or b'"usage"' in ev:
                    self.final = True
            elif ev.startswith(b":"):
                self.comments += 1


def build_request(host: str, port: int, path: str, body: str) -> bytes:
    raw = body.encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw


def streams(job: dict) -> dict:
    host, port = job.get("host", "127.0.0.1"), job["port"]
    reqs = [build_request(host, port, job["path"], b) for b in job["bodies"]]
    n = job["n"]
    tokens = job["tokens"]
    ramp = float(job.get("ramp_s", 0.0))
    cpu0 = cpu_s()
    sel = selectors.DefaultSelector()
    all_streams: list[Stream] = []
    buckets: list[int] = []
    t0 = perf()
    deadline = t0 + float(job.get("timeout_s", 60.0))
    opened = finished = in_flight = peak = streaming = peak_streaming = 0
    connect_errors: list[str] = []

    def end(s: Stream, now: float) -> None:
        nonlocal finished, in_flight, streaming
        try:
            sel.unregister(s.sock)
        except (KeyError, ValueError):
            pass
        s.sock.close()
        if s.state in (CHUNKED, PLAIN):
            streaming -= 1
        s.state = FINISHED
        s.t_end = now
        finished += 1
        in_flight -= 1

    while finished < n:
        now = perf()
        while opened < n and (ramp <= 0 or now >= t0 + ramp * opened / n):
            try:
                sock = connect(host, port)
            except OSError as exc:
                connect_errors.append(str(exc))
                opened += 1
                finished += 1
                continue
            s = Stream(sock, reqs[opened % len(reqs)], now)
            all_streams.append(s)
            sel.register(sock, selectors.EVENT_WRITE, s)
            opened += 1
            in_flight += 1
            peak = max(peak, in_flight)
        if now > deadline:
            for s in all_streams:
                if s.state != FINISHED:
                    s.error = s.error or "timed out"
                    end(s, now)
            break
        wait = 0.05 if opened >= n else max(0.0, min(0.05, t0 + ramp * opened / n - now))
        for key, _mask in sel.select(wait):
            s = key.data
            now = perf()
            if s.state == CONNECTING:
                err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    s.error = f"connect: {errno.errorcode.get(err, err)}"
                    end(s, now)
                    continue
                s.t_conn = now
                try:
                    s.sock.send(s.req)  # a few hundred bytes into an empty socket buffer
                except OSError as exc:
                    s.error = f"send: {exc}"
                    end(s, now)
                    continue
                s.state = HEADERS
                sel.modify(s.sock, selectors.EVENT_READ, s)
                continue
            try:
                data = s.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                s.error = f"recv: {exc}"
                end(s, now)
                continue
            if not data:
                if not s.ended:
                    s.error = s.error or f"closed by the server after {s.tokens} token events"
                end(s, now)
                continue
            if not s.t_first:
                s.t_first = now
            before = s.tokens
            was = s.state
            ended = s.feed(data)
            if was == HEADERS and s.state != HEADERS:
                streaming += 1
                peak_streaming = max(peak_streaming, streaming)
            got = s.tokens - before
            if got:
                b = int((now - t0) / BUCKET_S)
                while len(buckets) <= b:
                    buckets.append(0)
                buckets[b] += got
            if ended:
                end(s, now)
    elapsed = perf() - t0
    sel.close()
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for s in all_streams:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
        if s.error:
            key = s.error[:120]
            errors[key] = errors.get(key, 0) + 1
    for e in connect_errors:
        errors[f"connect: {e}"[:120]] = errors.get(f"connect: {e}"[:120], 0) + 1
    complete = sum(1 for s in all_streams if s.complete(tokens))
    done = [s for s in all_streams if s.t_end]
    ms = 1000.0
    return {
        "n": n, "complete": complete, "incomplete": n - complete,
        "statuses": statuses, "errors": errors, "error_count": sum(errors.values()),
        "tokens_expected": n * tokens, "token_events": sum(s.tokens for s in all_streams),
        "events": sum(s.events for s in all_streams), "chunks": sum(s.chunks for s in all_streams),
        "comments": sum(s.comments for s in all_streams),
        "short_streams": sum(1 for s in all_streams if s.tokens != tokens),
        "peak_in_flight": peak, "peak_streaming": peak_streaming,
        "elapsed_s": elapsed, "client_cpu_s": cpu_s() - cpu0,
        "connect_ms": pcts([(s.t_conn - s.t_start) * ms for s in all_streams if s.t_conn]),
        # a connect that took a SYN retransmission (1 s): the node's listen backlog overflowed
        "slow_connects": sum(1 for s in all_streams if s.t_conn and s.t_conn - s.t_start > 0.5),
        "first_byte_ms": pcts([(s.t_first - s.t_conn) * ms for s in all_streams if s.t_first]),
        "stream_ms": pcts([(s.t_end - s.t_conn) * ms for s in done if s.t_conn]),
        "last_first_byte_s": max((s.t_first - t0 for s in all_streams if s.t_first), default=0.0),
        "first_end_s": min((s.t_end - t0 for s in done), default=0.0),
        "tokens_per_bucket": buckets, "bucket_s": BUCKET_S,
    }


class Held:
    """Connections kept open between jobs, by group."""

    groups: dict[str, list[socket.socket]] = {}


def open_idle(job: dict) -> dict:
    host, port = job.get("host", "127.0.0.1"), job["port"]
    n = job["n"]
    outstanding = max(1, int(job.get("outstanding", 32)))
    req = f"GET {job.get('path', '/health')} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    kept = Held.groups.setdefault(job.get("group", "idle"), [])
    cpu0 = cpu_s()
    sel = selectors.DefaultSelector()
    t0 = perf()
    deadline = t0 + float(job.get("timeout_s", 120.0))
    started = ok = failed = 0
    inflight = 0
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    lat: list[float] = []
    state: dict[socket.socket, list] = {}

    def fail(sock: socket.socket, why: str) -> None:
        nonlocal failed, inflight
        sel.unregister(sock)
        sock.close()
        state.pop(sock, None)
        failed += 1
        inflight -= 1
        errors[why] = errors.get(why, 0) + 1

    while ok + failed < n:
        while started < n and inflight < outstanding:
            try:
                sock = connect(host, port)
            except OSError as exc:
                started += 1
                failed += 1
                errors[f"connect: {exc}"] = errors.get(f"connect: {exc}", 0) + 1
                continue
            state[sock] = [perf(), b""]
            sel.register(sock, selectors.EVENT_WRITE, sock)
            started += 1
            inflight += 1
        if perf() > deadline:
            for sock in list(state):
                fail(sock, "timed out")
            break
        for key, mask in sel.select(0.5):
            sock = key.data
            st = state[sock]
            if mask & selectors.EVENT_WRITE:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(sock, f"connect: {errno.errorcode.get(err, err)}")
                    continue
                sock.send(req)
                sel.modify(sock, selectors.EVENT_READ, sock)
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                fail(sock, f"recv: {exc}")
                continue
            if not data:
                fail(sock, "closed by the server before answering")
                continue
            buf = st[1] + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                st[1] = buf
                continue
            head = buf[:end].split(b"\r\n")
            clen = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    clen = int(value)
            if len(buf) < end + 4 + clen:
                st[1] = buf
                continue
            status = head[0].split(b" ", 2)[1].decode()
            statuses[status] = statuses.get(status, 0) + 1
            lat.append((perf() - st[0]) * 1000.0)
            sel.unregister(sock)
            del state[sock]
            inflight -= 1
            if status == "200":
                kept.append(sock)
                ok += 1
            else:
                sock.close()
                failed += 1
                errors[f"status {status}"] = errors.get(f"status {status}", 0) + 1
    sel.close()
    return {"n": n, "opened": ok, "failed": failed, "statuses": statuses, "errors": errors,
            "elapsed_s": perf() - t0, "latency_ms": pcts(lat), "client_cpu_s": cpu_s() - cpu0,
            "held": {g: len(v) for g, v in Held.groups.items()}}


def close_all(job: dict) -> dict:
    out = {}
    for group, socks in Held.groups.items():
        still = closed = other = 0
        for sock in socks:
            try:
                data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                still += 1
            except OSError:
                closed += 1
            else:
                if data:
                    other += 1
                else:
                    closed += 1
            sock.close()
        out[group] = {"still_open": still, "closed_by_server": closed, "unexpected_data": other}
    Held.groups = {}
    return out


def main() -> None:
    serve({"streams": streams, "open": open_idle, "close": close_all})


if __name__ == "__main__":
    main()
