"""A worker whose descendant escapes: it double-forks, calls ``setsid()`` and ignores SIGTERM.

Real engines do this (vLLM with Ray, multiprocessing spawners, shell wrappers): the escapee
leaves the worker's session and process group and re-parents away from the worker, so neither
a process-group kill nor a walk of the worker's children finds it. It writes its pid to
``$ESCAPEE_FILE`` (``{id}`` in the path is the worker id), then the worker runs the demo
worker.
"""

import os
import signal
import sys
import time

path = os.environ["ESCAPEE_FILE"].replace("{id}", os.environ["HIVE_WORKER_ID"])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(path + ".tmp", "w") as file:
            file.write(str(os.getpid()))
        os.rename(path + ".tmp", path)
        os.closerange(0, 3)
        while True:
            time.sleep(1)
    os._exit(0)
os.wait()
os.execv(sys.executable, [sys.executable, "-m", "hive.demo_worker", *sys.argv[1:]])
