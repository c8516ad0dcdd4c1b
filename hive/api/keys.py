"""The keys under which the application stores what its handlers share."""

from aiohttp import web

from hive.context import Context

CONTEXT = web.AppKey("context", Context)
