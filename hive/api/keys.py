"""The keys under which the application stores what its handlers share."""

from aiohttp import web

from hive.api.record_json import RecordJson
from hive.api.session import Sessions
from hive.api.table import Route
from hive.api.throttle import PeerLimiter
from hive.context import Context

CONTEXT = web.AppKey("context", Context)
RECORD_JSON = web.AppKey("record_json", RecordJson)
ROUTE_TABLE = web.AppKey("route_table", tuple[Route, ...])
#: The status page's sessions.
SESSIONS = web.AppKey("sessions", Sessions)
#: Failed log-ins and unknown tokens, per peer.
LIMITER = web.AppKey("limiter", PeerLimiter)
