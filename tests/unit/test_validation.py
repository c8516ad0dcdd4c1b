"""hive.validation: every pydantic error a person sees is a sentence naming the field and what
it may be: no regular expressions, no union-arm names, and "did you mean" for a typo'd key."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from hive.api.middleware import validation_message
from hive.config import Config, ConfigError, parse_config
from hive.models import SpawnRequest
from hive.validation import field_errors

ID = "must be 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
DEVICE = "must be auto, cpu, gpu, CPU-<n>, GPU-<n> or a GPU UUID"
CPUS = "must be a count of at least 1, or a list of core ids"


def _error(model: type[BaseModel], data: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return caught.value


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"id": "Qwen-A"}, ("id", ID)),
        ({"id": 7}, ("id", ID)),
        ({"device": "TPU-0"}, ("device", DEVICE)),
        ({"cpus": 0}, ("cpus", CPUS)),
        ({"cpus": [-1]}, ("cpus", CPUS)),
        ({"cpus": "many"}, ("cpus", CPUS)),
        ({"cpus": [1, 1]}, ("cpus", "core ids must be unique")),
        ({"port": 80}, ("port", "must be at least 1024")),
        ({"port": 70000}, ("port", "must be at most 65535")),
        ({"cost": 0}, ("cost", "must be more than 0")),
        ({"gpus": "two"}, ("gpus", "must be a whole number")),
        ({"restart": "x"}, ("restart", "must be 'no', 'on-failure' or 'always'")),
        ({"register": "yes"}, ("register", "must be true or false")),
        ({"model": ""}, ("model", "must not be empty")),
        (
            {"bootstrap_port": 20000},
            ("bootstrap_port", "only a worker with role 'prefill' has one"),
        ),
    ],
)
def test_each_spawn_error_is_a_sentence(body: dict[str, Any], expected: tuple[str, str]) -> None:
    exc = _error(SpawnRequest, {"model": "m", **body})
    assert field_errors(exc, top="body") == [expected]


def test_the_api_message_has_no_pattern_or_type_tag() -> None:
    exc = _error(SpawnRequest, {"model": "m", "id": "Qwen-A", "device": "TPU-0", "cpus": 0})
    message, fields = validation_message(exc)
    assert message == f"id: {ID}; device: {DEVICE}; cpus: {CPUS}"
    assert [f["field"] for f in fields] == ["id", "device", "cpus"]
    for bad in ("^", "[", "function-", "constrained", "Input should"):
        assert bad not in message


def test_a_misspelled_config_key_gets_the_nearest_known_one() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("stop_timout = 5\n", "h.toml")
    assert str(caught.value) == "h.toml: stop_timout: unknown key; did you mean 'stop_timeout'?"


def test_nested_config_keys_are_suggested_from_their_own_table() -> None:
    text = (
        '[backends.demo]\ncomand = ["x"]\n'
        '[[routers]]\nurl = "http://r:1"\nadvertise_hots = "h"\n'
        "[backends.extra]\ncommand = ['x']\nhealth = '/h'\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "h.toml")
    lines = str(caught.value).splitlines()
    assert "h.toml: backends.demo.comand: unknown key; did you mean 'command'?" in lines
    assert "h.toml: routers.0.advertise_hots: unknown key; did you mean 'advertise_host'?" in lines
    assert "h.toml: backends.extra.health: unknown key; did you mean 'health_path'?" in lines


def test_an_unknown_key_far_from_any_known_one_gets_no_guess() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("zzzzzz = 1\n", "h.toml")
    assert str(caught.value) == "h.toml: zzzzzz: unknown key"


def test_the_formatter_without_a_model_makes_no_guess() -> None:
    exc = _error(Config, {"stop_timout": 1})
    assert field_errors(exc, top="") == [("stop_timout", "unknown key")]
