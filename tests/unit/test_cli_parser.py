"""The CLI's parser, in process: every flag has help, and serve offers no client options. The CLI
against a live daemon is in tests/daemon/test_cli.py.
"""

from __future__ import annotations

import argparse


def test_every_flag_has_help_and_serve_offers_no_client_options() -> None:
    from hive.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.dest}"
        for name, sub in [("hive", parser), *commands.choices.items()]
        for action in sub._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []
    serve = commands.choices["serve"].format_help()
    assert "--url" not in serve and "--token" not in serve
    assert "--url" in commands.choices["list"].format_help()
