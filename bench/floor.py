"""The floor: the least a relay built on twisted.web + Twisted's ``Agent`` can cost.

A measurement baseline for the bench, not product code: nothing of rolemesh_node is
imported. It forwards every request (POSTs with their body; the bench's readiness
check is a GET) to ``http://127.0.0.1:UPSTREAM<same path>`` and relays
the answer — no JSON parsing, no queue, no metrics, no access log, no timeouts of its
own, no error handling beyond a bare 502::

    python -m bench.floor --port P --upstream-port U

What it does (and the node does too, with more around it): the epoll reactor (the
default on Linux, as the node gets it); a ``Site`` with the plain ``Request`` and
``HTTPChannel``, ``parsePOSTFormSubmission=False``, no request logging; one
``Agent`` over a persistent ``HTTPConnectionPool`` with ``TCP4ClientEndpoint``\\ s
(the node's choice too: ``Agent``'s default ``HostnameEndpoint`` resolves even
127.0.0.1), and for streams (``"stream": true`` in the body) a second one that
keeps no connections (the node's way too: llama-server closes the connection after a
streamed answer without announcing it, so a kept one can fail the next request);
status and headers copied minus the hop-by-hop ones; the body relayed by
``deliverBody`` into a protocol that writes each chunk as it comes, registered as
the request's streaming producer (the client's back-pressure pauses the upstream
socket), and the upstream stopped when the client leaves. Like the node, it does
not load the TLS stack (pyOpenSSL, ~12 MB of RSS), which it never uses.
"""

from __future__ import annotations

import argparse
import sys

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"trailers", b"transfer-encoding", b"upgrade"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    a = p.parse_args(argv)
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # no TLS stack (as the node without https)

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.defer import succeed
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Protocol
    from twisted.logger import globalLogBeginner
    from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
    from twisted.web.http import PotentialDataLoss
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import UNKNOWN_LENGTH
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)  # no log buffered either

    class Body:  # IBodyProducer for bytes in memory (Twisted has only FileBodyProducer)
        def __init__(self, data: bytes) -> None:
            self.data, self.length = data, len(data)

        def startProducing(self, consumer):
            consumer.write(self.data)
            return succeed(None)

        def pauseProducing(self) -> None: ...
        def resumeProducing(self) -> None: ...
        def stopProducing(self) -> None: ...

    class Endpoints:  # IAgentEndpointFactory
        def endpointForURI(self, uri):
            return TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port)

    class Pipe(Protocol):
        """The upstream body, written to the client per chunk; the request's push producer."""

        def __init__(self, request) -> None:
            self.request = request

        def connectionMade(self) -> None:
            self.request.registerProducer(self, True)

        def dataReceived(self, data: bytes) -> None:
            self.request.write(data)

        def connectionLost(self, reason=None) -> None:
            request = self.request
            if request._disconnected:
                return
            request.unregisterProducer()
            if reason.check(ResponseDone, PotentialDataLoss):
                request.finish()
            else:
                request.loseConnection()

        def pauseProducing(self) -> None:
            self.transport.pauseProducing()

        def resumeProducing(self) -> None:
            self.transport.resumeProducing()

        def stopProducing(self) -> None:
            self.transport.stopProducing()

    class QuietFactory(HTTPConnectionPool._factory):  # type: ignore[name-defined,misc]
        noisy = False

    def make_agent(persistent: bool) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=persistent)
        pool._factory = QuietFactory
        pool.maxPersistentPerHost = 64
        pool.cachedConnectionTimeout = 2.0  # llama-server drops idle connections after 5 s
        pool.retryAutomatically = False  # POSTs are never retried anyway
        return Agent.usingEndpointFactory(reactor, Endpoints(), pool=pool)

    agent, stream_agent = make_agent(True), make_agent(False)
    base = b"http://127.0.0.1:%d" % a.upstream_port

    class Relay(Resource):
        isLeaf = True

        def render(self, request):
            ctype = request.requestHeaders.getRawHeaders(b"content-type", [b"application/json"])
            body = request.content.read()
            # llama-server closes the connection after a streamed answer without saying so: a
            # stream on a kept-alive connection could make the next request fail (a byte search, no JSON)
            streamed = b'"stream": true' in body or b'"stream":true' in body
            d = (stream_agent if streamed else agent).request(
                request.method, base + request.uri, Headers({b"content-type": ctype}), Body(body))
            pipe: list[Pipe] = []

            def respond(response) -> None:
                if request._disconnected:
                    response.deliverBody(Protocol())  # read and dropped
                    return
                request.setResponseCode(response.code, response.phrase)
                out = request.responseHeaders
                for name, values in response.headers.getAllRawHeaders():
                    if name.lower() not in HOP_BY_HOP:
                        out.setRawHeaders(name, values)
                if response.length is not UNKNOWN_LENGTH:  # Agent keeps it out of response.headers
                    out.setRawHeaders(b"content-length", [b"%d" % response.length])
                pipe.append(Pipe(request))
                response.deliverBody(pipe[0])

            def failed(failure) -> None:
                if not request._disconnected:
                    request.setResponseCode(502)
                    request.finish()

            def client_gone(failure) -> None:
                if pipe:
                    pipe[0].transport.stopProducing()
                else:
                    d.cancel()

            d.addCallbacks(respond, failed)
            request.notifyFinish().addErrback(client_gone)
            return NOT_DONE_YET

    class QuietSite(Site):
        noisy = False

        def log(self, request) -> None:
            pass

    site = QuietSite(Relay(), parsePOSTFormSubmission=False)
    reactor.listenTCP(a.port, site, interface=a.host, backlog=128)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
