"""The query strings of hive's API routes, validated like bodies: an unknown or bad parameter is a
422 naming it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from hive.models import State
from hive.state.events import LAST_EVENT_ID_PATTERN


class ListQuery(BaseModel):
    """``GET /v1/workers?state=&model=&device=&label=key=value``."""

    model_config = ConfigDict(extra="forbid")

    state: State | None = None
    model: str | None = None
    device: str | None = None
    label: list[str] = Field(
        default=[], json_schema_extra={"items": {"type": "string", "pattern": "^[^=]+="}}
    )

    @field_validator("label")
    @classmethod
    def _pairs(cls, labels: list[str]) -> list[str]:
        for label in labels:
            if "=" not in label:
                raise ValueError(f"{label!r} must be key=value")
        return labels

    def labels(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.label)


class SpawnQuery(BaseModel):
    """``POST /v1/workers?wait=ready&timeout=S``."""

    model_config = ConfigDict(extra="forbid")

    wait: Literal["ready"] | None = None
    timeout: Annotated[float, Field(gt=0, le=86400)] = 600.0


class StopQuery(BaseModel):
    """``POST /v1/workers/{id}/stop?timeout=S&wait=true``."""

    model_config = ConfigDict(extra="forbid")

    timeout: Annotated[float, Field(ge=0, le=86400)] | None = None
    wait: bool = False


class EventsQuery(BaseModel):
    """Query of ``GET /v1/events``; the ``Last-Event-ID`` header takes precedence. An event id
    is ``<instance>-<seq>``; a plain number (an older hive's id) is taken too, and reset."""

    last_event_id: (
        Annotated[str, StringConstraints(max_length=64, pattern=LAST_EVENT_ID_PATTERN)] | None
    ) = None


class LogsQuery(BaseModel):
    """``GET /v1/workers/{id}/logs?tail=N&follow=true``."""

    model_config = ConfigDict(extra="forbid")

    tail: Annotated[int, Field(ge=0, le=1_000_000)] = 100
    follow: bool = False


class ReplaceQuery(BaseModel):
    """``POST /v1/workers/{id}/replace?in_place=false&timeout=S``."""

    model_config = ConfigDict(extra="forbid")

    #: Stop the old worker first and start the successor on what it freed (a gap in serving):
    #: for a successor that needs the old worker's GPUs or its pinned port.
    in_place: bool = False
    #: How long the successor has to become ready (and registered) before the replacement is
    #: abandoned and the old worker kept.
    timeout: Annotated[float, Field(gt=0, le=86400)] = 1800.0
