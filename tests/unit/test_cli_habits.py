"""The CLI's habits that need no daemon: "did you mean" with the subcommand's own short usage
and the error first, ``ls``, ``-o``, ``hive completion``, ``--help``'s examples and defaults,
and the YAML of ``-o yaml``."""

from __future__ import annotations

import json
import shlex

import pytest

from hive.cli import output, tables
from hive.cli.main import build_parser, main
from hive.cli.output import yaml
from hive.cli.parser import EXAMPLES
from hive.config import Config


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


def test_every_help_example_parses_and_names_a_real_backend() -> None:
    """spawn's example named --backend llama, which no hive has (llama-server is)."""
    parser = build_parser()
    backends = set(Config().backends)
    for text in EXAMPLES.values():
        for line in text.splitlines()[1:]:
            argv = shlex.split(line.split("|")[0].split(">")[0])
            if argv[:1] != ["hive"] or "<(" in line:
                continue
            args = parser.parse_args(argv[1 : argv.index("--") if "--" in argv else None])
            assert getattr(args, "backend", None) in (None, *backends), line


def test_list_wide_is_the_list_and_more_columns() -> None:
    """-o wide dropped the list's ROLE column while it "adds" columns (README)."""
    plain, wide = tables.workers([]).split(), output.workers_wide([]).split()
    assert wide[: len(plain)] == plain


def test_replace_says_it_takes_the_workers_arguments_after_dashes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["replace", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: hive replace ID [options] [-- ARGS...]\n")
    assert "examples:\n  hive replace chat-1 --model" in text


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_names_every_command(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("spawn", "list", "ls", "start", "completion", "deploy", "state", "wide"):
        assert word in script, (shell, word)
    if shell == "bash":
        assert script.rstrip().endswith("complete -o default -F _hive hive")
        assert "completion) words='bash zsh fish -h --help' ;;" in script  # its SHELL argument
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
