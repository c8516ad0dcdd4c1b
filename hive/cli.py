"""The ``hive`` command."""

from __future__ import annotations

import argparse
import sys

from hive.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hive")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--config")
    serve.add_argument("--listen")
    serve.add_argument("--socket")
    serve.add_argument("--log-format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    from hive.daemon import serve as run

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"hive: {exc}", file=sys.stderr)
        return 1
    updates = {}
    if args.listen:
        updates["listen"] = args.listen
    if args.socket:
        updates["socket"] = args.socket
    config = config.model_copy(update=updates)
    return run(config, args.log_format)
