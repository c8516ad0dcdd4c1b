"""The status page's session: the cookie that ``POST /login`` sets from the API token."""

from __future__ import annotations

import hashlib
import hmac

#: The session cookie's name.
SESSION_COOKIE = "hive_session"


def session_value(token: str) -> str:
    """What the session cookie holds: an HMAC of a fixed label under the API token, so the
    cookie is not the token and changes when the token does."""
    return hmac.new(token.encode(), b"hive status page session", hashlib.sha256).hexdigest()
