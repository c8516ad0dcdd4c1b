"""The CLI's habits that need no daemon: "did you mean" with the subcommand's own short usage
and the error first, ``ls``, ``-o``, ``hive completion``, ``--help``'s examples and defaults,
and the YAML of ``-o yaml``."""

from __future__ import annotations

import json

import pytest

from hive.cli.main import build_parser, main
from hive.cli.output import yaml


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_an_unknown_command_says_the_nearest_one_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error(capsys, "lst") == [
        "hive: unknown command 'lst'; did you mean 'list'?",
        "usage: hive COMMAND ... [options]",
        "see: hive --help",
    ]
    assert (
        usage_error(capsys, "fleet", "aply")[0]
        == "hive: unknown command 'aply'; did you mean 'apply'?"
    )


def test_an_unknown_flag_gets_the_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error(capsys, "list", "--sate", "ready") == [
        "hive: hive list does not take: --sate (did you mean --state?), ready",
        "usage: hive list [options]",
        "see: hive list --help",
    ]
    assert usage_error(capsys, "ls", "--modle=m")[0] == (
        "hive: hive list does not take: --modle=m (did you mean --model?)"
    )
    assert usage_error(capsys, "spawn") == [
        "hive: the following arguments are required: model",
        "usage: hive spawn MODEL [options] [-- ARGS...]",
        "see: hive spawn --help",
    ]


def test_ls_and_output_formats_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["ls", "-o", "wide", "-q"])
    assert args.command == "ls" and args.output == "wide" and args.quiet
    for argv in (
        ["show", "x", "-o", "yaml"],
        ["status", "-o", "json"],
        ["fleet", "ls", "-o", "json"],
    ):
        assert parser.parse_args(argv).output == argv[-1]
    assert parser.parse_args(["start", "w"]).id == "w"


def test_help_has_examples_defaults_and_the_id_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["spawn", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: hive spawn MODEL [options] [-- ARGS...]")
    assert "examples:\n  hive spawn ./models/tiny.gguf" in text
    assert "its id, which must be 1-63" in " ".join(text.split())
    with pytest.raises(SystemExit):
        main(["logs", "--help"])
    assert "last N lines (default: 100)" in capsys.readouterr().out


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_names_every_command(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("spawn", "list", "ls", "start", "completion", "deploy", "state", "wide"):
        assert word in script, (shell, word)
    if shell == "bash":
        assert script.rstrip().endswith("complete -o default -F _hive hive")
    if shell == "zsh":
        assert script.startswith("#compdef hive\n")


def test_yaml_reads_back_as_the_same_data() -> None:
    pyyaml = pytest.importorskip("yaml")
    data = {
        "workers": [
            {"id": "w-1", "labels": {}, "gpus": [], "error": "exit 1: no: such", "pid": None},
            {"id": "yes", "labels": {"team": "a b"}, "gpus": ["GPU-0"], "cpu": 12.5, "on": True},
        ],
        "total": 2,
        "empty": [],
        "text": "line\nnext",
        "number-like": "007",
    }
    text = yaml(data)
    assert pyyaml.safe_load(text) == data
    assert text.startswith("workers:\n- id: w-1\n  labels: {}\n")
    assert pyyaml.safe_load(yaml([])) == [] and json.loads(yaml(None)) is None
