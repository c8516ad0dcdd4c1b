"""The status page's sessions and the per-peer limit on failed credentials, on a clock of the
test's own: sessions are random, expire and are revoked; a peer that fails too often waits,
regains a try a second, and is logged once per burst."""

from __future__ import annotations

import logging

import pytest

from hive.api.session import Sessions
from hive.api.throttle import PeerLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_is_random_expires_and_is_revoked() -> None:
    clock = Clock()
    sessions = Sessions(lifetime=60, clock=clock)
    a, b = sessions.create(), sessions.create()
    assert a != b and len(a) >= 40
    assert sessions.valid(a) and sessions.valid(b) and not sessions.valid("made-up")
    assert sessions.revoke(a) and not sessions.valid(a) and not sessions.revoke(a)
    clock.now += 59
    assert sessions.valid(b)
    clock.now += 1
    assert not sessions.valid(b) and len(sessions) == 0


def test_past_the_limit_a_log_in_ends_the_oldest_session() -> None:
    sessions = Sessions(limit=3, clock=Clock())
    made = [sessions.create() for _ in range(4)]
    assert [sessions.valid(s) for s in made] == [False, True, True, True]


def test_a_peer_waits_after_a_burst_and_regains_a_try_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    failures: list[str] = []
    refused: list[None] = []
    limiter = PeerLimiter(
        burst=3, rate=1.0, clock=clock, on_failure=failures.append,
        on_refused=lambda: refused.append(None),
    )  # fmt: skip
    caplog.set_level(logging.WARNING, "hive.api")
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") == 0
        limiter.failed("10.0.0.1", "token")
    assert limiter.retry_after("10.0.0.1") == 1
    assert limiter.retry_after("10.0.0.1") == 1
    assert limiter.retry_after("10.0.0.2") == 0  # another address is not held back
    assert len([r for r in caplog.records if "10.0.0.1" in r.message]) == 1  # once a burst
    clock.now += 1.0
    assert limiter.retry_after("10.0.0.1") == 0
    limiter.failed("10.0.0.1", "login")
    assert limiter.retry_after("10.0.0.1") == 1
    assert len([r for r in caplog.records if "10.0.0.1" in r.message]) == 2  # a new burst
    assert failures == ["token", "token", "token", "login"] and len(refused) == 3


def test_an_ipv6_peer_is_held_by_its_64() -> None:
    limiter = PeerLimiter(burst=1, clock=Clock())
    limiter.failed("2001:db8:1:2::1", "token")
    assert limiter.retry_after("2001:db8:1:2::ffff") == 1
    assert limiter.retry_after("2001:db8:1:3::1") == 0
    limiter.failed("::ffff:192.0.2.7", "token")  # an IPv4 peer on a dual-stack socket
    assert limiter.retry_after("192.0.2.7") == 1
