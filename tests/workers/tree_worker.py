"""A worker with a child: it starts a grandchild that ignores SIGTERM, then runs the demo worker.

Used to prove that stopping a worker ends its whole tree, even a process that will not take
SIGTERM. The grandchild writes its pid to ``<log dir>/<id>.child`` so the test can watch it.
"""

import os
import signal
import subprocess
import sys

stubborn = subprocess.Popen(
    [
        sys.executable,
        "-c",
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "while True: time.sleep(1)\n",
    ]
)
with open(os.environ["TREE_CHILD_FILE"], "w") as file:
    file.write(str(stubborn.pid))
signal.signal(signal.SIGTERM, signal.SIG_DFL)
os.execv(sys.executable, [sys.executable, "-m", "hive.demo_worker", *sys.argv[1:]])
