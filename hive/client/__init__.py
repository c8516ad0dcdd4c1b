"""The client side of hive's HTTP API: `HiveClient` (the async client the CLI and orchestrators
use) and `sse` (reading Server-Sent Events). ``from hive.client import HiveClient`` is the
public import."""

from hive.client.client import (
    URL_FORMS,
    HiveAPIError,
    HiveClient,
    HiveClientError,
    HiveConnectionError,
    HiveNotHiveError,
    HiveURLError,
    check_url,
    default_token,
    default_url,
    default_url_from,
    local_config,
)

__all__ = [
    "URL_FORMS",
    "HiveAPIError",
    "HiveClient",
    "HiveClientError",
    "HiveConnectionError",
    "HiveNotHiveError",
    "HiveURLError",
    "check_url",
    "default_token",
    "default_url",
    "default_url_from",
    "local_config",
]
