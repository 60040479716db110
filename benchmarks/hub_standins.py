"""Stand-in Hugging Face hubs on 127.0.0.1, for benchmarks/hub_unreachable.py and tests/test_sources.py.

The real hub is never contacted: HF_ENDPOINT points the client at one of these instead.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager


@contextmanager
def silent_endpoint():
    """A stand-in hub that accepts connections and never answers (a firewall that drops packets)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@contextmanager
def refusing_endpoint():
    """A stand-in hub whose port refuses connections (nothing listens there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"http://127.0.0.1:{port}"
