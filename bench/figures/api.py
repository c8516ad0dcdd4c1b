"""Figure 5: the API under a closed-loop load (``bench/loadgen.py``) beside a bare aiohttp app
that answers the same bytes: list, get one, heartbeat."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from benchlib import BENCH, PYTHON, bench_env, bench_hive, new_home

from figures.common import Figure, Popened, Settings, check, profile
from harness.net import free_port
from harness.waits import wait_http_ok

HIVE_API_CONFIG = """
# The heartbeat target must not be found hung while the other loads run first.
heartbeat_timeout = 3600

[backends.exit0]
command = ["/bin/true"]
health_path = ""

[backends.sleeper]
command = ["/bin/sleep", "3600"]
health_path = ""
startup_timeout = 3600
"""


async def loadgen(
    port: int, method: str, path: str, connections: int, seconds: float, *headers: str, body: str
) -> dict[str, Any]:
    argv = [
        PYTHON, str(BENCH / "loadgen.py"), "--port", str(port), "--method", method,
        "--path", path, "--connections", str(connections), "--seconds", str(seconds),
        "--body", body,
    ]  # fmt: skip
    for header in headers:
        argv += ["--header", header]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, env=bench_env(Path("/tmp"))
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode})")
    return dict(json.loads(out))


async def figures_api(settings: Settings, popened: Popened) -> list[Figure]:
    hive = bench_hive("api", HIVE_API_CONFIG, port_span=max(2 * settings.records, 500))
    await hive.start_async()
    floor_home = new_home("floor")
    floor: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with gate:
                await hive.spawn({"model": "bench", "backend": "exit0", "id": f"rec-{i:04d}"})

        await asyncio.gather(*(one(i) for i in range(settings.records)))
        while (await hive.call("GET", "/v1/node"))["workers"].get("stopped", 0) < settings.records:
            await asyncio.sleep(0.1)
        made = time.monotonic() - started
        await hive.spawn({"model": "bench", "backend": "sleeper", "id": "hb"})
        beat = '{"state": "ready"}'
        await hive.call("POST", "/v1/workers/hb/heartbeat", json_body={"state": "ready"})

        async def raw(method: str, path: str, body: str | None = None) -> str:
            async with hive.http().request(method, path, data=body) as response:
                return await response.text()

        bodies = {
            "list": await raw("GET", "/v1/workers"),
            "one": await raw("GET", "/v1/workers/hb"),
            "heartbeat": await raw("POST", "/v1/workers/hb/heartbeat", beat),
        }
        total = json.loads(bodies["list"])["total"]
        (floor_home / "bodies.json").write_text(json.dumps(bodies))
        floor_port = free_port()
        floor = popened.start(
            [PYTHON, str(BENCH / "floor_server.py"), "--port", str(floor_port),
             "--bodies", str(floor_home / "bodies.json")],
            floor_home / "floor.log",
            floor_home,
        )  # fmt: skip
        await wait_http_ok(f"http://127.0.0.1:{floor_port}/health", 30)

        auth = f"Authorization: Bearer {hive.token}"
        cases = [
            # The targets are shares of the bare handler's rate in the same run.
            ("5a", f"list {total} records: GET /v1/workers", "GET", "/v1/workers", "", 0.40),
            ("5b", "get one record: GET /v1/workers/{id}", "GET", "/v1/workers/hb", "", None),
            ("5c", "heartbeat: POST .../heartbeat", "POST", "/v1/workers/hb/heartbeat", beat, 0.75),
        ]
        figures = []
        for key, title, method, path, body, target in cases:
            conns = settings.list_connections if key == "5a" else settings.connections
            seconds = settings.api_seconds
            ours = await loadgen(hive.port, method, path, conns, seconds, auth, body=body)
            bare = await loadgen(floor_port, method, path, conns, seconds, auth, body=body)
            flame = None
            if settings.pyspy is not None:
                spy = asyncio.create_task(profile(settings, hive.pid, f"api-{key}", seconds))
                await loadgen(hive.port, method, path, conns, seconds, auth, body=body)
                flame = await spy
            for result in (ours, bare):
                if result["ok"] != result["requests"] or result["errors"]:
                    raise RuntimeError(f"{title}: errors under load: {result}")
            rate = Figure(
                key,
                f"{title} [rate]",
                "req/s",
                {"value": ours["rate"], "n": ours["requests"]},
                {"bare aiohttp": {"value": bare["rate"], "n": bare["requests"]}},
                target=f">= {target:.0%} of bare aiohttp" if target else "(none)",
                met=check(ours["rate"], ">=", target * bare["rate"]) if target else None,
                stat="value",
                notes=[f"{conns} keep-alive connections, {seconds:g} s, load generator in its "
                       "own process"],
            )  # fmt: skip
            latency = Figure(
                f"{key}'",
                f"{title} [latency]",
                "ms",
                {k.removesuffix("_ms"): v for k, v in ours.items() if k.endswith("_ms")}
                | {"n": ours["requests"]},
                {"bare aiohttp": {k.removesuffix("_ms"): v for k, v in bare.items()
                                  if k.endswith("_ms")} | {"n": bare["requests"]}},
            )  # fmt: skip
            if flame:
                rate.notes.append(f"py-spy flame graph: {flame}")
            figures += [rate, latency]
        figures[0].notes.append(
            f"{settings.records} records made (spawned /bin/true) in {made:.1f}s"
        )
        return figures
    finally:
        if floor is not None:
            await popened.reap(floor)
        await hive.close()
