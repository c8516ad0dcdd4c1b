"""The restart policy: whether a worker whose attempt ended is started again, and when.

kubelet's back-off: the first restart after ``restart_delay``, each next one twice as late up to
``restart_delay_max``, back to the start once an attempt stayed ready ``restart_reset_after``
seconds. ``max_restarts`` (if set) gives up. A plain function of the outcome, the record, the
configuration and the back-off so far, so every rule is tested without a daemon.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from hive.config import Config
from hive.models import Worker


class Outcome(Enum):
    """How one attempt ended."""

    STOPPED = "stopped"  # asked to stop, and it did
    EXITED = "exited"  # exited with code 0 on its own while it was not wanted running
    FAILED = "failed"  # crashed, hung, never ready, could not start for now, or exited unasked
    UNRUNNABLE = "unrunnable"  # its command cannot be run at all (not found, not executable)


@dataclass(frozen=True, slots=True)
class Backoff:
    """What the policy carries from one attempt to the next."""

    #: The last delay used (0: none yet).
    delay: float = 0.0
    #: ``time.monotonic()`` when the latest attempt became ready (None: it never did).
    ready_since: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer: the delay before the next attempt, or None for no more."""

    delay: float | None
    backoff: Backoff
    #: When the policy gives up on a worker that wanted to run: the error to record.
    gave_up: str | None = None


def next_delay(
    outcome: Outcome, record: Worker, config: Config, backoff: Backoff, now: float
) -> Decision:
    """Seconds until the next attempt of ``record``'s worker, or None when the policy says
    no more. ``now`` is ``time.monotonic()``."""
    if outcome is Outcome.STOPPED or record.desired == "stopped":
        return Decision(None, backoff)
    if outcome is Outcome.UNRUNNABLE:  # trying again would fail the same way, for ever
        return Decision(
            None, backoff, gave_up=f"{record.error}; not retried: fix the backend's command"
        )
    if record.restart == "no" or (record.restart == "on-failure" and outcome is Outcome.EXITED):
        return Decision(None, backoff)
    limit = config.max_restarts
    if limit is not None and record.restarts >= limit:
        return Decision(
            None, backoff, gave_up=f"{record.error or 'exited'}; gave up after {limit} restarts"
        )
    stable = (
        backoff.ready_since is not None and now - backoff.ready_since >= config.restart_reset_after
    )
    if stable or backoff.delay == 0:
        delay = config.restart_delay
    else:
        delay = min(backoff.delay * 2, config.restart_delay_max)
    return Decision(delay, Backoff(delay=delay))
