"""The app's routes against the OpenAPI operations, in process: every served route is documented
once. The document against a live daemon (and the fuzz run) is in tests/daemon/test_openapi.py.
"""

from __future__ import annotations

from typing import cast

from hive.api.app import create_app, operations
from hive.context import Context


def test_every_served_route_has_an_operation() -> None:
    """Walk the app's router: a route served without its OpenAPI operation fails here."""
    app = create_app(cast(Context, None))  # the routes do not need the context until called
    served = [(r.method, r.resource.canonical) for r in app.router.routes() if r.resource]
    documented = [(op.method.upper(), op.path) for op in operations()]
    assert sorted(m for m in served if m[0] != "HEAD") == sorted(documented)
    assert len(set(documented)) == len(documented), "a route declared twice"
    # Every GET answers HEAD too; nothing else does.
    gets = {path for method, path in documented if method == "GET"}
    assert {path for method, path in served if method == "HEAD"} == gets
