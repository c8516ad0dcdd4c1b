"""A worker that runs out of memory: it limits its own memory, then allocates until the kernel's
OOM killer ends it. It never serves: hive sees it end while it starts.

``oom_worker.py v2``: it sets ``memory.max`` of its own cgroup v2 (the worker cgroup hive made);
``oom_worker.py v1:<dir>``: it joins the cgroup v1 memory group ``<dir>`` (the test made it,
with its limit). Both need root.
"""

import os
import sys
from pathlib import Path

LIMIT = 64 << 20

mode = sys.argv[1]
if mode == "v2":
    cgroups = Path("/proc/self/cgroup").read_text().splitlines()
    own = next(line[3:] for line in cgroups if line.startswith("0::"))
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    mount = next(
        line.split(" - ")[0].split()[4]
        for line in mounts
        if line.split(" - ")[1].split()[0] == "cgroup2"
    )
    group = Path(mount + own)
    (group / "memory.max").write_text(str(LIMIT))
    if (group / "memory.swap.max").exists():
        (group / "memory.swap.max").write_text("0")
else:
    (Path(mode.removeprefix("v1:")) / "cgroup.procs").write_text(str(os.getpid()))
print(f"oom worker: pid {os.getpid()} allocating until the OOM killer ends it", flush=True)
hog = []
while True:
    hog.append(b"x" * (8 << 20))
