"""The figures of bench/README.md, one module per group measured together.

- ``spawn.py``: 1 spawn, 2a readiness by probe.
- ``crash.py``: 2b readiness by heartbeat, 3 crash detection (and under supervisord, circus).
- ``router.py``: 4 out of the router.
- ``api.py``: 5 the API under load.
- ``scale.py``: 6 scale and idle overhead; ``stop_all.py``: 7 stop all.
- ``common.py``: the settings, the row (``Figure``), and what several of them use.
"""
