"""``python -m hive.demo_worker``: run the demo worker, exit with its code."""

import sys

from hive.demo_worker.cli import main

if __name__ == "__main__":
    sys.exit(main())
