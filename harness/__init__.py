"""What the test suite and the benchmark share: a real ``hive serve`` in a temp dir, and ways to
look at the processes it started.

- :mod:`harness.daemon`: :class:`~harness.daemon.Hive`, one daemon under test.
- :mod:`harness.procs`: the tag that marks every process a run starts, finding and killing them.
- :mod:`harness.env`: an environment isolated in a temp dir and carrying the tag.
- :mod:`harness.net`: free ports, and whether one listens.
- :mod:`harness.waits`: polling until a condition holds.
- :mod:`harness.stats`: percentiles and summaries of samples.

Not shipped: ``pyproject.toml`` packages ``hive*`` only. This module imports nothing heavy, so
that a lean process (the bench's load generator) can use :mod:`harness.stats` alone.
"""

from __future__ import annotations

from pathlib import Path

#: The repository's root.
ROOT = Path(__file__).resolve().parent.parent
