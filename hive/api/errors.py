"""What each cause of :mod:`hive.errors` is on the wire: its HTTP status and error code.

The one place that knows. The error middleware answers every :class:`~hive.errors.HiveError`
through :func:`wire`, and aiohttp's own refusals (no such route, a method a route does not
take, a body over the limit) through :data:`HTTP_CODES`; the layers that raise the errors know
nothing of HTTP. The codes are the contract's (SPEC §5).
"""

from __future__ import annotations

from collections.abc import Mapping

from hive.errors import (
    CapacityError,
    ConfigError,
    Conflict,
    HiveError,
    InvalidRequest,
    JournalError,
    MalformedBody,
    NotAuthenticated,
    NotFound,
    NotPermitted,
    RequestError,
    StateError,
    UpstreamError,
)
from hive.models import ErrorCode

#: Cause -> (HTTP status, error code). An error answers as the nearest class of its own
#: ancestry listed here; :class:`HiveError` itself ends every search.
WIRE: Mapping[type[HiveError], tuple[int, ErrorCode]] = {
    RequestError: (400, "invalid"),
    InvalidRequest: (422, "invalid"),
    MalformedBody: (400, "invalid"),
    NotAuthenticated: (401, "unauthorized"),
    NotPermitted: (403, "forbidden"),
    NotFound: (404, "not_found"),
    Conflict: (409, "conflict"),
    CapacityError: (503, "no_capacity"),
    # A change the journal could not hold is refused as the host having no room for it.
    JournalError: (503, "no_capacity"),
    # Never what a request ends in today; if one gets that far, it is hive's own failure.
    StateError: (500, "internal"),
    ConfigError: (500, "internal"),
    UpstreamError: (500, "internal"),
    HiveError: (500, "internal"),
}

#: aiohttp's own refusals, by the status it chose -> the error code answered with it.
HTTP_CODES: Mapping[int, ErrorCode] = {
    400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "invalid",
    409: "conflict", 413: "too_large", 422: "invalid", 503: "no_capacity",
}  # fmt: skip


def wire(cause: type[HiveError]) -> tuple[int, ErrorCode]:
    """The HTTP status and error code of an error of class ``cause``."""
    for cls in cause.__mro__:
        if cls in WIRE:
            return WIRE[cls]
    raise TypeError(f"{cause.__name__} is not a HiveError")
