"""Where to connect for an address that a server listens on.

A server bound to a wildcard (``0.0.0.0``, ``::``, or ``""``: every address) is reached on this
machine through the loopback address of the same family, and an IPv6 address needs brackets in
a URL. Both rules live here once.
"""

from __future__ import annotations

#: Wildcard listen address -> the loopback address that reaches it.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def connect_host(host: str) -> str:
    """The host part of a URL that reaches a server listening on ``host`` from this machine.

    ``0.0.0.0`` and ``""`` become ``127.0.0.1``, ``::`` becomes ``[::1]``, any other IPv6
    address is bracketed (``::1`` -> ``[::1]``; one already in brackets stays as it is), and
    names and IPv4 addresses come back unchanged.
    """
    host = host.strip("[]")
    host = _LOOPBACK.get(host, host)
    return f"[{host}]" if ":" in host else host


def http_url(host: str, port: int) -> str:
    """``http://HOST:PORT`` for a server listening on ``host`` and ``port``, reached locally."""
    return f"http://{connect_host(host)}:{port}"
