"""hive's errors: one tree by cause (:mod:`hive.errors`), one table that makes them HTTP
(:mod:`hive.api.errors`), and layers under the API that know nothing of HTTP.

No daemon: the tree and the table are read as they are, an error is answered by the middleware's
own function, and the replacement's clashes go through a real supervisor and registry whose
spawns are refused before any process would start.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import pytest

import hive
from hive import errors
from hive.api.errors import WIRE, wire
from hive.api.middleware import answer
from hive.config import Config
from hive.desired.reconcile import Reconciler
from hive.devices import cpu
from hive.devices.placement import Placer
from hive.errors import (
    CapacityError,
    ConfigError,
    Conflict,
    DeclarationError,
    DuplicateWorker,
    HiveError,
    IllegalTransition,
    JournalError,
    MalformedBody,
    NoCapacity,
    NoDiskRoom,
    NoFreePort,
    NotAuthenticated,
    NotPermitted,
    PortTaken,
    RequestError,
    UnknownBackend,
    UnknownWorker,
)
from hive.host.containment import Cgroups
from hive.models import ErrorCode, SpawnRequest, State
from hive.state.registry import Registry
from hive.workers.logs import Logs
from hive.workers.supervisor import Supervisor

pytestmark = pytest.mark.timeout(30)

ROOT = Path(hive.__file__).parent
#: The layers under the API: they raise causes, and never say what those are in HTTP.
INNER = ("devices", "workers", "state", "desired")


def _all_subclasses(cls: type[HiveError]) -> set[type[HiveError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _all_subclasses(sub)
    return found


def _every_module() -> None:
    for info in pkgutil.walk_packages([str(ROOT)], "hive."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


# -- the tree ------------------------------------------------------------------------------------


def test_every_error_of_hive_is_in_the_one_tree() -> None:
    _every_module()  # any HiveError a module defines is known by now
    outside = sorted(
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in _all_subclasses(HiveError)
        if cls.__module__ != errors.__name__
    )
    assert outside == [], "define causes in hive/errors.py, where the tree is drawn"
    drawn = errors.__doc__ or ""
    for cls in _all_subclasses(HiveError):
        if cls.__name__ in vars(errors) and vars(errors)[cls.__name__] is cls:
            assert re.search(rf"[x+-] {cls.__name__}\b", drawn), f"{cls.__name__} is not drawn"


def test_every_cause_has_an_http_status_and_code_in_the_api_table() -> None:
    _every_module()
    codes = set(get_args(ErrorCode))
    assert HiveError in WIRE  # every search ends there
    for cls in {HiveError, *_all_subclasses(HiveError)}:
        status, code = wire(cls)
        assert code in codes, cls
        if issubclass(cls, RequestError):
            assert 400 <= status < 500, cls
        elif issubclass(cls, CapacityError):
            assert (status, code) == (503, "no_capacity"), cls


def test_no_error_carries_an_http_status_or_code() -> None:
    for cls in {HiveError, *_all_subclasses(HiveError)}:
        assert "code" not in dir(cls), cls
        if cls is not errors.RouterError:  # its ``status`` is the router's answer, per error
            assert "status" not in dir(cls), cls
    with pytest.raises(TypeError):
        HiveError("x", status=500)  # type: ignore[call-arg]


# -- the wire: what the API answers is what it answered before the tree --------------------------


@pytest.mark.parametrize(
    ("error", "status", "code", "message"),
    [
        (PortTaken(18000, "web"), 409, "conflict", "port: 18000 is in use by worker 'web'"),
        (PortTaken(18001, None, "bootstrap_port"), 409, "conflict",
         "bootstrap_port: 18001 is in use by another process on this host"),
        (NoFreePort(18000, 18999), 503, "no_capacity", "no free port in port_range 18000-18999"),
        (NoCapacity("cpus: 2 unreserved cores of 4, 3 requested"), 503, "no_capacity",
         "cpus: 2 unreserved cores of 4, 3 requested"),
        (NoDiskRoom(Path("/var/lib/hive"), 512 * 1024, "space"), 503, "no_capacity",
         "state_dir /var/lib/hive is full (512 KiB free): no room for a worker's log or the "
         "journal; free space there, or move state_dir"),
        (NoDiskRoom(Path("/s"), 1 << 30, "inodes"), 503, "no_capacity",
         "state_dir /s is full (no free inodes): no room for a worker's log or the journal; "
         "free space there, or move state_dir"),
        (JournalError(Path("/s/journal.json"), "write: No space left on device"), 503,
         "no_capacity", "cannot write /s/journal.json: write: No space left on device"),
        (UnknownWorker("w"), 404, "not_found", "no worker 'w'"),
        (DuplicateWorker("w", field="id"), 409, "conflict", "id: worker 'w' already exists"),
        (DuplicateWorker("w"), 409, "conflict", "worker 'w' already exists"),
        (IllegalTransition("w", State.STOPPED, State.READY), 409, "conflict",
         "worker 'w' cannot go from stopped to ready"),
        (UnknownBackend("nope", ["demo", "vllm"]), 422, "invalid",
         "backend: no backend 'nope' (configured: demo, vllm)"),
        (DeclarationError("api: worker 'x': id: declared twice"), 422, "invalid",
         "api: worker 'x': id: declared twice"),
        (MalformedBody("body: not valid JSON"), 400, "invalid", "body: not valid JSON"),
        (NotAuthenticated("invalid token"), 401, "unauthorized", "invalid token"),
        (NotPermitted("a worker token is good only for that worker's own heartbeat"), 403,
         "forbidden", "a worker token is good only for that worker's own heartbeat"),
        (Conflict("hive is shutting down"), 409, "conflict", "hive is shutting down"),
        (ConfigError("h.toml: listen: must be HOST:PORT"), 500, "internal",
         "h.toml: listen: must be HOST:PORT"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, HiveError) else None,
)  # fmt: skip
def test_an_error_is_answered_with_its_causes_status_and_code(
    error: HiveError, status: int, code: str, message: str
) -> None:
    response = answer(error)
    assert response.status == status
    assert response.text is not None
    assert json.loads(response.text) == {"error": {"code": code, "message": message}}


# -- the layers under the API know nothing of HTTP -----------------------------------------------


def _inner_sources() -> list[Path]:
    return sorted(p for layer in INNER for p in (ROOT / layer).rglob("*.py"))


#: The API's own statuses and codes, unless it is an upstream's answer (``HTTP 503``).
_API_WORDS = re.compile(
    r"(?<!HTTP )\b(404|409|413|422|503)\b|\bno_capacity\b|\bnot_found\b|\btoo_large\b"
)


def test_no_inner_layer_imports_the_web_framework_or_the_api() -> None:
    for path in _inner_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                assert not name.startswith(("aiohttp.web", "hive.api")), f"{path}: {name}"


def test_no_inner_layer_raises_with_a_status_or_speaks_of_the_apis_statuses() -> None:
    for path in _inner_sources():
        text = path.read_text()
        assert "web.HTTP" not in text, path
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                keywords = {k.arg for k in node.exc.keywords}
                assert not keywords & {"status", "code"}, f"{path}:{node.lineno}"
        for number, line in enumerate(text.splitlines(), 1):
            assert not _API_WORDS.search(line), f"{path}:{number}: {line.strip()}"


# -- a replacement tells a port clash from an id clash by the error's class ----------------------


@pytest.fixture
async def reconciler(tmp_path: Path) -> AsyncIterator[Reconciler]:
    """A real supervisor and registry; nothing is started (the spawns tried here are refused
    while their reservation is made, before any process)."""
    config = Config(state_dir=tmp_path, port_range=(18000, 18009))
    registry = Registry()
    supervisor = Supervisor(
        config,
        registry,
        Placer(cpu.discover()),
        Logs(tmp_path / "logs", config.max_log_bytes),
        "http://127.0.0.1:9",
        containment=Cgroups(tmp_path / "cgroups", "test-errors", tmp_path),
    )
    yield Reconciler(supervisor, registry)


def _running(registry: Registry, record_id: str, port: int) -> None:
    """A worker record that holds ``port``, as a spawn leaves it (``starting``); a successor's
    (``<id>~<generation>``) has its worker's id in its request."""

    def build(entries: Any) -> dict[str, Any]:
        url = f"http://127.0.0.1:{port}"
        fields = {"model": "m", "backend": "demo", "device": "CPU-0", "port": port, "url": url}
        return {"id": record_id, **fields}

    spec = SpawnRequest(model="m", id=record_id.partition("~")[0])
    registry.add(spec, "token", build)


async def test_a_successor_that_wants_its_workers_port_is_told_to_replace_in_place(
    reconciler: Reconciler,
) -> None:
    _running(reconciler.registry, "web", 18003)
    with pytest.raises(Conflict) as refused:
        await reconciler.replace("web", SpawnRequest(model="m", id="web", port=18003))
    assert not isinstance(refused.value, DuplicateWorker)
    assert refused.value.message == (
        "port: 18003 is in use by worker 'web': the successor cannot have 'web''s port while "
        "it runs; leave port out, or replace in place (in_place=true, hive replace --in-place)"
    )
    assert refused.value.worker is not None and refused.value.worker.id == "web"
    assert set(reconciler.registry.ids()) == {"web"}


async def test_an_id_clash_is_not_taken_for_a_port_clash_whatever_the_id_says(
    reconciler: Reconciler,
) -> None:
    # "report" has "port" in it: a message search took its id clash for a port clash.
    _running(reconciler.registry, "report", 18001)
    _running(reconciler.registry, "report~2", 18002)  # its successor's id, already taken
    with pytest.raises(DuplicateWorker) as refused:
        await reconciler.replace("report", SpawnRequest(model="m", id="report", args=["-v"]))
    assert refused.value.message == "id: worker 'report' already exists"
    assert refused.value.worker_id == "report"
    assert set(reconciler.registry.ids()) == {"report", "report~2"}
