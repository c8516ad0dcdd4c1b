"""`python -m hive` is the same as the `hive` command."""

from hive.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
