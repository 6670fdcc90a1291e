"""A raw client socket for tests of the HTTP edge: what came back, and how the node closed it."""

from __future__ import annotations

import socket


class Peer:
    """A loopback client socket with non-blocking reads, noting what came back and how the node closed it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setblocking(False)
        self.received = b""
        self.how: str | None = None  # "fin" or "rst" once closed

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def closed(self) -> bool:
        """Read what is there; True once the node closed the connection (``how`` says which way)."""
        while self.how is None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                self.how = "rst"
                break
            if not data:
                self.how = "fin"
                break
            self.received += data
        return True

    def close(self) -> None:
        self.sock.close()
