"""The errors hive answers with, each carrying its code and HTTP status (see the API contract)."""

from __future__ import annotations

from hive.models import ErrorCode, Worker


class HiveError(Exception):
    """A request hive refuses or cannot complete; ``code`` and ``status`` go on the wire."""

    code: ErrorCode = "internal"
    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        worker: Worker | None = None,
        code: ErrorCode | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.worker = worker
        self.code = code or self.code
        self.status = status or self.status


class Invalid(HiveError):
    code, status = "invalid", 422


class BadRequest(HiveError):
    code, status = "invalid", 400


class Unauthorized(HiveError):
    code, status = "unauthorized", 401


class Forbidden(HiveError):
    code, status = "forbidden", 403


class NotFound(HiveError):
    code, status = "not_found", 404


class Conflict(HiveError):
    code, status = "conflict", 409


class NoCapacity(HiveError):
    code, status = "no_capacity", 503
