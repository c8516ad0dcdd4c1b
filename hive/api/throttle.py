"""Failed log-ins and refused tokens, limited per peer: guessing the token is not free.

Each peer address (an IPv6 peer by its /64, which one host usually holds whole) has a bucket of
:data:`BURST` failures that refills at :data:`RATE` a second. A failed log-in or a token hive
does not know takes one; a peer whose bucket is empty is answered 429 with ``Retry-After``
before its credentials are even looked at, so a flood gets one guess a second. A request with
no credentials costs nothing, a good one is never counted, and the unix socket is never limited:
the local operator always gets in. The first refusal of a burst is logged, once, with the peer.

What the limit holds back is what could be a guess of the API token: that token (or a log-in)
from a limited peer, right or wrong, since answering a right one would answer a guess. The
middleware lets through, before asking here, what cannot be one: a worker's own token on its
heartbeat and a page's session (random, unguessable), and the API token on a connection that
already carried it (the guard's ``proven``), whose client knows it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("hive.api")

#: Failures a peer may make in a row before it waits.
BURST = 10
#: Failures a second a peer regains.
RATE = 1.0
#: Peers remembered at most; past that the ones that have failed least lately are forgotten.
MAX_PEERS = 4096


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float
    refused: int = 0  # requests refused in the current burst (0: not limited)


class PeerLimiter:
    """The buckets, and the counters they feed (``on_failure(kind)``, ``on_refused()``)."""

    def __init__(
        self,
        burst: int = BURST,
        rate: float = RATE,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._on_failure = on_failure
        self._on_refused = on_refused
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently failed first

    def retry_after(self, address: str | None) -> int:
        """0 when ``address`` may present credentials now, else the seconds it must wait
        (counted as a refusal: the first of a burst is logged)."""
        bucket = self._bucket(address, create=False)
        if bucket is None or bucket.level >= 1.0:
            if bucket is not None:
                bucket.refused = 0
            return 0
        if bucket.refused == 0:
            log.warning(
                "%s: %d failed log-ins or unknown tokens in a burst; answering 429 to its "
                "credentials until it slows to %g a second",
                address,
                self.burst,
                self.rate,
            )
        bucket.refused += 1
        if self._on_refused is not None:
            self._on_refused()
        return max(1, math.ceil((1.0 - bucket.level) / self.rate))

    def failed(self, address: str | None, kind: str) -> None:
        """``address`` presented a credential that was wrong: ``login`` or ``token``."""
        if self._on_failure is not None:
            self._on_failure(kind)
        bucket = self._bucket(address, create=True)
        if bucket is not None:
            bucket.level = max(0.0, bucket.level - 1.0)
            self._buckets.move_to_end(_key(address))

    def _bucket(self, address: str | None, create: bool) -> _Bucket | None:
        if address is None:
            return None
        key = _key(address)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if not create:
                return None
            while len(self._buckets) >= MAX_PEERS:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            return bucket
        bucket.level = min(float(self.burst), bucket.level + (now - bucket.at) * self.rate)
        bucket.at = now
        return bucket


def _key(address: str | None) -> str:
    """The address a bucket is kept by: an IPv6 address's /64, anything else as it is."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or ""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
