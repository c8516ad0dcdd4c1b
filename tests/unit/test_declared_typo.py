"""A typo in a ``[[workers]]`` key names the key and the nearest right one, not the required
field it left out (issue 29): ``modl = "m"`` said ``model: is required``."""

from __future__ import annotations

from pathlib import Path

import pytest

from hive.desired.declared import read_file
from hive.errors import DeclarationError


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('modl = "m"', "modl: unknown key; did you mean 'model'?"),
        ('model = "m"\ncpu = 1', "cpu: unknown key; did you mean 'cpus'?"),
        ('model = "m"\nbackend = "demo"\nbakcend_args = []', "bakcend_args: unknown key"),
    ],
)
def test_an_unknown_key_is_named_first(tmp_path: Path, line: str, said: str) -> None:
    path = tmp_path / "web.toml"
    path.write_text(f'[[workers]]\nid = "web"\n{line}\n')
    with pytest.raises(DeclarationError) as caught:
        read_file(path, "files")
    assert str(caught.value).startswith(f"{path}: worker 'web': {said}")
