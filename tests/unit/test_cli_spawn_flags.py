"""``hive spawn`` and ``hive replace`` take the same spawn fields, from one definition
(:data:`hive.cli.args.SPAWN_FLAGS`): the same flags, the same request from the same argv, and
the same flag named in an error. The commands against a live daemon are in
tests/daemon/test_cli.py and tests/daemon/test_events_handover.py.
"""

from __future__ import annotations

import argparse

import pytest

from hive.cli.args import UsageError, spawn_request
from hive.cli.main import build_parser


def parse(*argv: str) -> argparse.Namespace:
    """``argv`` as ``hive`` reads it: what follows ``--`` is the worker's arguments."""
    words = list(argv)
    cut = words.index("--") if "--" in words else len(words)
    args = build_parser().parse_args(words[:cut])
    args.extra = words[cut + 1 :]
    return args


def flags(command: str) -> set[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in commands.choices[command]._actions for o in a.option_strings}


def test_both_commands_take_every_spawn_field_but_the_id() -> None:
    # spawn's own: its id (a successor keeps the worker's) and --no-wait; replace's own: its
    # --model (spawn's MODEL is positional) and --in-place. Everything else is the same.
    assert flags("spawn") - {"--id", "--no-wait"} == flags("replace") - {"--model", "--in-place"}


#: Every spawn field's flag, once.
FIELDS = [
    *("--backend", "demo", "--device", "CPU-0", "--gpus", "2", "--cpus", "0-1,3"),
    *("--gpu-memory", "512", "--memory", "1024", "--port", "18123"),
    *("--label", "team=search", "--label", "tier=gold", "--env", "A=1"),
    *("--restart", "always", "--no-register", "--role", "prefill", "--bootstrap-port", "18124"),
    *("--priority", "7", "--cost", "2.5"),
]


def test_the_same_flags_make_the_same_request() -> None:
    spawned = spawn_request(parse("spawn", "m", *FIELDS, "--", "-v", "x"), replace=False)
    replaced = spawn_request(
        parse("replace", "web", "--model", "m", *FIELDS, "--", "-v", "x"), replace=True
    )
    assert (
        spawned
        == replaced
        == {
            "model": "m",
            "backend": "demo",
            "device": "CPU-0",
            "gpus": 2,
            "cpus": [0, 1, 3],
            "gpu_memory_mib": 512,
            "memory_mib": 1024,
            "port": 18123,
            "labels": {"team": "search", "tier": "gold"},
            "env": {"A": "1"},
            "restart": "always",
            "register": False,
            "role": "prefill",
            "bootstrap_port": 18124,
            "priority": 7,
            "cost": 2.5,
            "args": ["-v", "x"],
        }
    )


def test_a_flag_not_given_is_left_out() -> None:
    assert spawn_request(parse("spawn", "m"), replace=False) == {"model": "m"}
    assert spawn_request(parse("replace", "web"), replace=True) == {}
    assert spawn_request(parse("spawn", "m", "--id", "web"), replace=False) == {
        "model": "m",
        "id": "web",
    }


@pytest.mark.parametrize("command", ["spawn", "replace"])
def test_an_error_names_the_flag_in_both(command: str) -> None:
    head = ["spawn", "m"] if command == "spawn" else ["replace", "web"]
    with pytest.raises(UsageError, match=r"^--gpu-memory: .*1"):
        spawn_request(parse(*head, "--gpu-memory", "0"), replace=command == "replace")
    with pytest.raises(UsageError, match=r"^--port: .*1024"):
        spawn_request(parse(*head, "--port", "80"), replace=command == "replace")
