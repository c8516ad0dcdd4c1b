"""A deployments file (``hive fleet deploy -f``) is read as a ``[[workers]]`` file is: bounded,
TOML, no key but its own tables; each refusal a sentence naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hive.desired.declared import MAX_FILE_BYTES
from hive.desired.deployments import read_deployments
from hive.errors import DeclarationError

ONLY = "a deployments file holds [[deployments]] tables"


def test_a_deployments_file_gives_its_tables(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text('[[deployments]]\nname = "chat"\nreplicas = 2\nmodel = "m"\n')
    [chat] = read_deployments(path)
    assert (chat.name, chat.replicas) == ("chat", 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[workers]]\nmodel = "m"\n', f"workers: unknown key ({ONLY})"),
        ("[[deployments]\n", "not valid TOML"),
        ("# nothing\n", "deployments: must be one or more [[deployments]] tables"),
        ("x" * (MAX_FILE_BYTES + 1), f"larger than {MAX_FILE_BYTES} bytes"),
    ],
)
def test_a_deployments_file_refused_says_why(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "d.toml"
    path.write_text(text)
    with pytest.raises(DeclarationError) as caught:
        read_deployments(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_a_directory_is_refused_unread(tmp_path: Path) -> None:
    with pytest.raises(DeclarationError, match="not a regular file"):
        read_deployments(tmp_path)
