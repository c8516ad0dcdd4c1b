"""hive's benchmark: ``make bench`` (or ``bench/.venv/bin/python bench/run.py``).

Measures the figures in bench/README.md against real processes on loopback, each beside a peer
or a floor measured in the same run, prints a table and writes ``bench/results.json``.
``BENCH_QUICK=1`` is a smoke run of about a minute (written to ``bench/results-quick.json``).

This is the driver: the figures are in ``figures/`` (one module each), the machine, the table
and the JSON in ``report.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# The repository's root, for harness/ (what the bench shares with the tests).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import TAG, EventStream, OtherLoad, bench_hive, log, remove_homes
from figures.api import figures_api
from figures.common import HIVE_MAIN_CONFIG, Figure, Popened, Settings, unavailable
from figures.crash import crash_peers, figures_heartbeat_and_crash
from figures.fleet import figures_fleet
from figures.memory import figures_memory
from figures.replace import figure_replace
from figures.router import RouterDefaults, figure_router
from figures.scale import figures_scale
from figures.spawn import figure_spawn_burst, figures_spawn_and_probe
from peers import PeerUnavailable
from report import machine, print_report, write_results

from harness.procs import sweep, tagged_processes

#: Other processes' load during each group of figures, by the group's key.
OTHER_LOAD: dict[str, dict[str, float]] = {}


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- main -----------------------------------------------------------------------------------------


async def guarded(
    figures: list[Figure], key: str, title: str, run: Callable[[], Awaitable[list[Figure]]]
) -> None:
    """Run one group of figures; a failure becomes a row that says so, not a crash."""
    log(f"figure {key}: {title}")
    begun = time.monotonic()
    load = OtherLoad()
    first = len(figures)
    try:
        figures.extend(await run())
    except Exception as exc:
        traceback.print_exc()
        figures.append(Figure(key, title, "", unavailable(f"error: {exc!r}"[:300])))
    other = load.result()
    OTHER_LOAD[key] = other
    for figure in figures[first:]:
        figure.other_load = other
    busy = (
        f"; other processes kept {other['other_cores']:.2f} cores busy meanwhile"
        f" ({other['stolen_cores']:.2f} stolen by the hypervisor)"
    )
    log(f"figure {key} done in {time.monotonic() - begun:.1f}s{busy}")


async def bench(settings: Settings) -> dict[str, Any]:
    figures: list[Figure] = []
    popened = Popened()
    peer: RouterDefaults | None = None
    peer_task: asyncio.Task[None] | None = None
    peer_error: str | None = None
    begun = time.monotonic()
    try:
        if "4" in settings.only:
            log("figure 4 (peer): sglang-router with default health checks, set up first")
            try:
                peer = RouterDefaults(settings, popened)
                await peer.setup()
                peer_task = asyncio.create_task(peer.run())
            except (PeerUnavailable, RuntimeError, TimeoutError) as exc:
                peer_error = f"{exc}"[:300]
                if peer is not None:
                    await peer.close()
                peer = None

        if settings.only & {"1", "2", "3"}:
            hive = bench_hive("main", HIVE_MAIN_CONFIG)
            await hive.start_async()
            events = await EventStream(hive).start()
            try:
                if settings.only & {"1", "2"}:
                    await guarded(
                        figures,
                        "1",
                        "spawn and readiness by probe",
                        lambda: figures_spawn_and_probe(settings, hive, events, popened),
                    )

                    async def burst() -> list[Figure]:
                        return [await figure_spawn_burst(settings, hive, popened)]

                    await guarded(figures, "1b", "spawns sent at once", burst)

                async def beat_and_crash() -> list[Figure]:
                    return list(await figures_heartbeat_and_crash(settings, hive, events))

                await guarded(figures, "2b", "readiness by heartbeat; crash", beat_and_crash)
            finally:
                await events.close()
                await hive.close()

            await guarded(
                figures,
                "3 (peers)",
                "crash under supervisord and circus",
                lambda: crash_peers(settings, figures),
            )

        if "4" in settings.only:

            async def router() -> list[Figure]:
                return [await figure_router(settings, peer, peer_error)]

            await guarded(figures, "4", "out of the router", router)
        if "8" in settings.only:

            async def replace() -> list[Figure]:
                return [await figure_replace(settings)]

            await guarded(figures, "8", "replace and drain under load", replace)
        if "10" in settings.only:  # not by default: it needs llama-server (bench/README.md)
            await guarded(figures, "10", "memory truth", lambda: figures_memory(settings))
        if "5" in settings.only:
            await guarded(figures, "5", "API", lambda: figures_api(settings, popened))
        if settings.only & {"6", "7"}:
            await guarded(figures, "6", "scale and overhead", lambda: figures_scale(settings))
        if "9" in settings.only:
            await guarded(figures, "9", "fleet scheduler", lambda: figures_fleet(settings))

        if peer is not None and peer_task is not None:
            peer.finishing.set()
            log("figure 4 (peer): waiting for the router to notice its dead workers")
            with contextlib.suppress(Exception):
                await peer_task
            row = next((f for f in figures if f.key == "4"), None)
            if row is not None:
                row.peers["sglang-router defaults"] = peer.result()
    finally:
        if peer_task is not None and not peer_task.done():
            peer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await peer_task
        if peer is not None:
            await peer.close()
        await popened.close()
    return {"figures": figures, "seconds": round(time.monotonic() - begun, 1)}


def main() -> int:
    settings = Settings.from_env()
    raise_fd_limit()
    info = machine()
    log(
        f"bench: {'quick' if settings.quick else 'full'} run, {settings.samples} samples, tag {TAG}"
    )
    whole = OtherLoad()
    outcome = asyncio.run(bench(settings))
    left = sweep(TAG)
    if os.environ.get("BENCH_KEEP", "") in ("", "0"):
        remove_homes()
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["other_load"] = whole.result()
    write_results(settings, outcome, info, left)
    print_report(settings, info, outcome, OTHER_LOAD)
    still = tagged_processes(TAG)
    print(f"leftover processes: {len(left)} killed by the final sweep, {len(still)} still alive")
    return 0 if not left and not still else 1


if __name__ == "__main__":
    sys.exit(main())
