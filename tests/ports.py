"""Ports for the servers tests start: outside the ranges Ray itself binds, so nothing it starts can take one.

`cluster.transport.free_port` asks the OS for an ephemeral port and lets it go; a server binds it seconds later,
after Ray has started, and Ray's own gRPC servers bind ephemeral ports too (32768-60999 here): once, in CI, Serve's
proxy found its port taken ("Failed to bind to address '127.0.0.1:39005'"). Ray's worker ports are 10002-19999.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32768  # above Ray's worker ports, below the Linux ephemeral range


def free_port() -> int:
    """A port in [LOW, HIGH) that is free now, on every interface and on loopback."""
    for _ in range(200):
        port = random.randrange(LOW, HIGH)
        try:
            for host in ("", "127.0.0.1"):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port in [{LOW}, {HIGH})")
