"""What the demo worker prints: one flushed line at a time, and aiohttp's complaints as one line.

stdout and stderr are usually hive's log file for the worker, so every line is flushed at once and
nothing ever prints a traceback.
"""

from __future__ import annotations

import logging
import sys


def say(message: str) -> None:
    """One line to stdout, flushed at once (stdout is usually a log file)."""
    print(message, flush=True)


def warn(message: str) -> None:
    """One line to stderr, flushed at once."""
    print(message, file=sys.stderr, flush=True)


class OneLineFormatter(logging.Formatter):
    """A log record as one line: an exception is summed up, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = f"demo worker: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = " ".join(str(exc).split())[:160]
            message += f" ({type(exc).__name__}: {detail})" if detail else f" ({exc!r})"
        return message


def quiet_aiohttp_logs() -> None:
    """aiohttp's own complaints (a client speaking HTTP/2 to us, say) as one line on stderr.

    A router probing whether the worker speaks gRPC sends an HTTP/2 preface: aiohttp answers 400
    and would otherwise print a traceback.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    logger = logging.getLogger("aiohttp")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
