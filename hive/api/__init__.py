"""hive's HTTP API on aiohttp: routes, authentication and the error shape."""

from hive.api.app import CONTEXT, create_app

__all__ = ["CONTEXT", "create_app"]
