"""Declared workers: what should run here, read from files, and the plan that gets there.

Workers are declared in hive's configuration (``[[workers]]``), in the files of ``workers_dir``
(each a TOML file of ``[[workers]]`` tables), or sent by ``hive apply -f``. A declaration is a
spawn request with a required ``id``. :func:`plan` compares a declared set with the registry:
missing workers are created, changed ones replaced, unchanged ones left alone (or started again
when they are down though nobody stopped them), and (with ``prune``) the rest removed.
:class:`hive.desired.reconcile.Reconciler` carries a plan out.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hive.config import Config, config_dir
from hive.errors import DeclarationError, UnknownBackend
from hive.models import DOWN_STATES, DeclaredWorker, Entry, PlanItem, SpawnRequest, Worker
from hive.validation import field_errors

#: The ``declared`` of a worker from hive's own files (config and ``workers_dir``).
CONFIG_SOURCE = "config:"
APPLY_SOURCE = "apply:"
#: A declaration file larger than this is refused unread (a workers file is a few KiB).
MAX_FILE_BYTES = 1 << 20
_ONLY = f"a workers file must be a regular TOML file of at most {MAX_FILE_BYTES} bytes"


@dataclass(frozen=True, slots=True)
class Declared:
    """One declared worker and where it is declared (``config:<file>``, ``apply:<source>``)."""

    spec: DeclaredWorker
    source: str


def parse_workers(items: Any, where: str, source: str) -> list[Declared]:
    """Validate a list of worker tables; the first bad one refuses the whole list.

    Errors read ``<where>: worker 'web': cpus: must be ...`` (the index when a table has no
    usable id), so that the operator finds the line to fix.
    """
    if not isinstance(items, list):
        raise DeclarationError(f"{where}: workers: must be a list of tables ([[workers]])")
    declared: list[Declared] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        name = _name(item, index)
        if not isinstance(item, dict):
            raise DeclarationError(f"{where}: {name}: must be a table of spawn request fields")
        try:
            spec = DeclaredWorker.model_validate(item)
        except ValidationError as exc:
            errors = field_errors(exc, top="(worker)", model=DeclaredWorker, unknown_first=True)
            field, message = errors[0]
            raise DeclarationError(f"{where}: {name}: {field}: {message}") from None
        if spec.id in seen:
            raise DeclarationError(f"{where}: {name}: id: declared twice")
        seen.add(spec.id)
        declared.append(Declared(spec, source))
    return declared


def _name(item: Any, index: int) -> str:
    if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]:
        return f"worker {item['id']!r}"
    return f"workers[{index}]"


def workers_dir(config: Config, config_path: Path | None) -> Path:
    """Where declaration files live: ``workers_dir``, else ``workers.d`` beside the config."""
    if config.workers_dir is not None:
        base = config_path.parent if config_path is not None else config_dir()
        return base / config.workers_dir
    return (config_path.parent if config_path is not None else config_dir()) / "workers.d"


def read_file(path: Path, source: str, named: bool = False) -> list[Declared]:
    """The ``[[workers]]`` of one TOML file: a regular file of at most :data:`MAX_FILE_BYTES`;
    anything else (a FIFO, a device, a directory, a bigger file) is refused unread, never waited
    on. A file ``named`` by the operator (``hive apply -f <(...)``) may also be a pipe, read up
    to the same limit. Blocks: hive calls it in a thread."""
    items = read_tables(path, "workers", "a workers file holds [[workers]] tables only", named)
    return parse_workers(items, str(path), source)


def read_tables(path: Path, key: str, only: str, named: bool = False) -> Any:
    """The ``key`` tables of a TOML file read as :func:`read_file` reads one (``[]`` where it
    has none); any other top-level key is refused, ``only`` saying what the file holds."""
    try:
        data = tomllib.loads(_read_bounded(path, named).decode())
    except OSError as exc:
        raise DeclarationError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeclarationError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {key})
    if unknown:
        raise DeclarationError(f"{path}: {unknown[0]}: unknown key ({only})")
    return data.get(key, [])


def _read_bounded(path: Path, named: bool) -> bytes:
    """At most :data:`MAX_FILE_BYTES` of the file (one more says it is larger)."""
    info = os.stat(path)
    regular = stat.S_ISREG(info.st_mode)
    if not regular and not (named and (stat.S_ISFIFO(info.st_mode) or stat.S_ISCHR(info.st_mode))):
        raise DeclarationError(f"{path}: not a regular file ({_kind(info.st_mode)}); {_ONLY}")
    if info.st_size > MAX_FILE_BYTES:
        raise DeclarationError(f"{path}: larger than {MAX_FILE_BYTES} bytes; {_ONLY}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_NONBLOCK if regular else 0))
    try:
        info = os.fstat(fd)  # what was opened, should it have been swapped since the stat
        if regular and not stat.S_ISREG(info.st_mode):
            raise DeclarationError(f"{path}: not a regular file ({_kind(info.st_mode)}); {_ONLY}")
        data = b""
        while len(data) <= MAX_FILE_BYTES and (
            chunk := os.read(fd, MAX_FILE_BYTES + 1 - len(data))
        ):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise DeclarationError(f"{path}: larger than {MAX_FILE_BYTES} bytes; {_ONLY}")
    return data


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "an unknown kind of file"


def read_paths(paths: Iterable[Path], source: Callable[[Path], str]) -> list[Declared]:
    """Every worker of these files, and of the ``*.toml`` files of these directories (in name
    order); an id declared in two places is an error naming both. A file named here may be a
    pipe; a directory's files must be regular files (:func:`read_file`)."""
    declared: list[Declared] = []
    where: dict[str, Path] = {}
    for path in paths:
        named = not path.is_dir()
        files = [path] if named else sorted(path.glob("*.toml"))
        for file in files:
            for item in read_file(file, source(file), named):
                if item.spec.id in where:
                    raise DeclarationError(
                        f"{file}: worker {item.spec.id!r}: id: already declared in "
                        f"{where[item.spec.id]}"
                    )
                where[item.spec.id] = file
                declared.append(item)
    return declared


def read_declared(config: Config, config_path: Path | None) -> list[Declared]:
    """What hive's own files declare: ``[[workers]]`` of the config, then ``workers_dir``."""
    name = str(config_path) if config_path is not None else "(defaults)"
    declared = parse_workers(config.workers, name, CONFIG_SOURCE + name)
    where = {item.spec.id: name for item in declared}
    directory = workers_dir(config, config_path)
    if directory.is_dir():
        for item in read_paths([directory], lambda file: CONFIG_SOURCE + str(file)):
            if item.spec.id in where:
                raise DeclarationError(
                    f"{item.source.removeprefix(CONFIG_SOURCE)}: worker {item.spec.id!r}: "
                    f"id: already declared in {where[item.spec.id]}"
                )
            declared.append(item)
    elif directory.exists():
        raise DeclarationError(f"{directory}: workers_dir is not a directory")
    return declared


def check_backends(declared: Iterable[Declared], config: Config) -> None:
    """Refuse a set that names a backend hive does not have (nothing of it is applied)."""
    for item in declared:
        try:
            config.backend(config.backend_name(item.spec))
        except UnknownBackend as exc:
            where = item.source.split(":", 1)[1]
            raise DeclarationError(f"{where}: worker {item.spec.id!r}: {exc.message}") from None


def differences(running: SpawnRequest, declared: SpawnRequest) -> dict[str, list[Any]]:
    """The request fields that differ, ``{field: [running, declared]}`` (by their wire names)."""
    old = running.model_dump(mode="json", by_alias=True)
    new = declared.model_dump(mode="json", by_alias=True)
    return {
        key: [old.get(key), new[key]] for key in new if key != "id" and old.get(key) != new[key]
    }


def needs_start(record: Worker) -> bool:
    """A declared worker that should run and does not, with nothing under way to change that:
    stopped or failed, no restart due, no replacement half-way, and not stopped by an operator
    (``desired: stopped``, kept in the journal across restarts of hive). hive's own shutdown
    (``on_exit = "stop"``) leaves ``desired: running``, so such a worker starts again."""
    return (
        record.state in DOWN_STATES
        and record.desired == "running"
        and record.next_restart_at is None
        and record.replacing is None
    )


def plan(
    declared: Iterable[Declared],
    entries: Mapping[str, Entry],
    normalize: Callable[[SpawnRequest], SpawnRequest],
    prune: Callable[[Entry], bool] | None = None,
) -> list[PlanItem]:
    """What applying ``declared`` to the workers in ``entries`` would do, in order: each
    declared worker created, replaced, started again (:func:`needs_start`) or left alone, then
    each worker ``prune`` picks among the undeclared (successors under way never)."""
    items: list[PlanItem] = []
    ids = set()
    for item in declared:
        spec = normalize(item.spec)
        ids.add(spec.id)
        entry = entries.get(spec.id or "")
        if entry is None:
            items.append(PlanItem(id=spec.id or "", action="create"))
            continue
        changes = differences(normalize(entry.spec), spec)
        action = "replace" if changes else "start" if needs_start(entry.record) else "unchanged"
        items.append(PlanItem(id=spec.id or "", action=action, changes=changes))
    if prune is not None:
        for worker_id, entry in entries.items():
            if worker_id not in ids and "~" not in worker_id and prune(entry):
                items.append(PlanItem(id=worker_id, action="prune"))
    return items


def check_complete(declared: Iterable[Declared], held: Iterable[Worker], directory: Path) -> None:
    """Refuse a set read while its files were being changed, before it prunes anything: the
    workers it no longer names (``held``: those hive's files declared so far) stay as they are
    when ``workers_dir`` is missing (a deploy that moves it briefly away), or when the file that
    declared them is empty (``>`` redirection truncates it before the new text is written). A
    file removed from a directory that is there, or a file that declares nothing in words (a
    comment), is a real change. Blocks (stats and reads small files): call it in a thread."""
    named = {item.spec.id for item in declared}
    lost = [record for record in held if record.id not in named and record.declared]
    if not lost:
        return
    inside = [r for r in lost if Path(_file_of(r)).parent == directory]
    if inside and not directory.is_dir():
        raise DeclarationError(
            f"{directory}: workers_dir is missing; what it declared keeps running as it is "
            f"({_ids(inside)}; make the directory again, even empty, to remove them)"
        )
    by_file: dict[str, list[Worker]] = {}
    for record in lost:
        by_file.setdefault(_file_of(record), []).append(record)
    for file, records in by_file.items():
        if _blank(Path(file)):
            raise DeclarationError(
                f"{file}: empty (being written?); what it declared keeps running as it is "
                f"({_ids(records)}; remove the file, or leave a comment in it, to remove them)"
            )


def _file_of(record: Worker) -> str:
    return (record.declared or "").removeprefix(CONFIG_SOURCE)


def _ids(records: list[Worker]) -> str:
    return ", ".join(repr(r.id) for r in records)


def _blank(path: Path) -> bool:
    """True for a regular file with nothing but white space in it; False for a missing one."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return False
        with path.open("rb") as file:
            return not file.read(4097).strip()
    except OSError:
        return False
