"""The status page's sessions: random, revocable, expiring, and never a cookie.

A browser sends a host's cookies to every port of that host, a worker's included, so a cookie
must not grant anything: the page keeps its session in ``sessionStorage`` and sends it as
``Authorization: Bearer <session>`` itself, which a browser never does on its own. A session is
a random value that ``POST /login`` hands out for the API token; it can read (``GET`` and
``HEAD``) and nothing else, ends at ``POST /logout`` (deleted here, so the value is dead even if
it was copied), and expires :data:`LIFETIME` seconds after the log-in. Sessions live in hive's
memory only: a restart of hive logs every page out.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

#: The cookie that hive's earlier status page set. It grants nothing now; a log-in expires it.
SESSION_COOKIE = "hive_session"
#: How long a page's session lasts from its log-in, in seconds (12 hours).
LIFETIME = 12 * 3600.0
#: Sessions held at most; a log-in past that ends the oldest one.
MAX_SESSIONS = 1000


class Sessions:
    """The live sessions, by the SHA-256 of their value (a lookup reveals nothing of a value
    that timing could guess)."""

    def __init__(
        self,
        lifetime: float = LIFETIME,
        limit: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lifetime = lifetime
        self.limit = limit
        self._clock = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # oldest log-in first

    def __len__(self) -> int:
        self._expire()
        return len(self._expiry)

    def create(self) -> str:
        """A new session's value (43 characters, 256 random bits)."""
        self._expire()
        while len(self._expiry) >= self.limit:
            self._expiry.popitem(last=False)
        value = secrets.token_urlsafe(32)
        self._expiry[_digest(value)] = self._clock() + self.lifetime
        return value

    def valid(self, value: str) -> bool:
        expiry = self._expiry.get(_digest(value))
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._expiry[_digest(value)]
            return False
        return True

    def revoke(self, value: str) -> bool:
        """End the session; False when there was none by that value."""
        return self._expiry.pop(_digest(value), None) is not None

    def _expire(self) -> None:
        now = self._clock()
        while self._expiry:
            digest, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                break
            del self._expiry[digest]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()
