"""Worker records as JSON, serialized once per change rather than once per request.

A record is immutable: every change replaces it with a new object
(:mod:`hive.state.registry`). So the JSON of the object last serialized for a worker is the
JSON of that worker for as long as its record is that same object. ``GET /v1/workers`` joins
those bytes, and ``GET /v1/workers/{id}`` answers them, with the same bytes pydantic's
``model_dump_json`` writes for the whole list.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from hive.models import Worker


class RecordJson:
    """The last JSON of each worker's record, by worker id."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Worker, bytes]] = {}
        #: The unfiltered listing, and the registry version it is of.
        self._everything: tuple[int, bytes] | None = None

    def one(self, record: Worker) -> bytes:
        cached = self._cache.get(record.id)
        if cached is not None and cached[0] is record:
            return cached[1]
        body = record.model_dump_json().encode()
        self._cache[record.id] = (record, body)
        return body

    def listing(self, records: Sequence[Worker], known: Collection[str]) -> bytes:
        """``{"workers": [...], "total": n}``, as :class:`hive.models.WorkerList` dumps it.

        ``known``: every worker id the registry holds now; the JSON of any other is forgotten
        once the cache has grown past twice their number.
        """
        parts = [self.one(record) for record in records]
        if len(self._cache) > 2 * len(known) + 64:
            for worker_id in [w for w in self._cache if w not in known]:
                del self._cache[worker_id]
        return b'{"workers":[' + b",".join(parts) + b'],"total":' + str(len(parts)).encode() + b"}"

    def everything(self, version: int, records: Sequence[Worker]) -> bytes:
        """The listing of every record, which is the same bytes while ``version`` (the
        registry's count of writes) is."""
        if self._everything is not None and self._everything[0] == version:
            return self._everything[1]
        body = self.listing(records, {record.id for record in records})
        self._everything = (version, body)
        return body
