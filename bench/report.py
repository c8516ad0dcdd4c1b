"""What a run reports: the machine it ran on, the table, ``results.json``."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
from figures.common import Figure, Settings

from harness import ROOT

#: Cores' worth of other processes' CPU during a figure above which the table warns.
OTHER_LOAD_WARNING = 0.1


# -- the machine ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("hive", "supervisor", "circus", "sglang-router", "aiohttp", "pydantic", "psutil"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "hive_commit": commit or None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# -- the table ------------------------------------------------------------------------------------


def fmt(value: Any, unit: str) -> str:
    if not isinstance(value, int | float):
        return "-"
    if unit == "req/s":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(summary: dict[str, Any], unit: str, stat: str) -> str:
    if "unavailable" in summary:
        return "unavailable"
    unit = summary.get("unit", unit)
    value = summary.get(stat, summary.get("value", summary.get("p50")))
    text = fmt(value, unit) + ("" if value is None else f" {unit}")
    if summary.get("censored"):
        text = ">" + text
    return text


def table(figures: list[Figure]) -> str:
    head = ("figure", "hive p50", "p95", "max", "n", "peer/floor p50", "target", "met?")
    rows = []
    for f in figures:
        h = f.hive
        if "unavailable" in h:
            first, p95, high, n = "unavailable", "-", "-", "-"
        else:
            main = h.get(f.stat) if f.stat == "value" else h.get("p50")
            first = f"{fmt(main, f.unit)} {f.unit}"
            p95, high = fmt(h.get("p95"), f.unit), fmt(h.get("max"), f.unit)
            n = str(h.get("n", "-"))
        peers = ", ".join(f"{k} {cell(v, f.unit, 'p50')}" for k, v in f.peers.items()) or "-"
        met = "n/a" if f.met is None else ("yes" if f.met else "NO")
        if f.target in ("", "(none)"):
            met = "-"
        rows.append((f"{f.key} {f.title}", first, p95, high, n, peers, f.target or "-", met))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


# -- the results ----------------------------------------------------------------------------------


def write_results(
    settings: Settings, outcome: dict[str, Any], info: dict[str, Any], left: list[str]
) -> None:
    """``results.json`` (or ``BENCH_OUT``): the figures with their samples, the settings, the
    machine, and what the final sweep found."""
    figures: list[Figure] = outcome["figures"]
    results = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": settings.quick,
        "duration_s": outcome["seconds"],
        "settings": {
            k: (sorted(v) if isinstance(v, frozenset) else shown(v) if isinstance(v, Path) else v)
            for k, v in asdict(settings).items()
        },
        "machine": info,
        "figures": [asdict(f) for f in figures],
        "leftover_processes": left,
    }
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(results, indent=1) + "\n")


def print_report(
    settings: Settings,
    info: dict[str, Any],
    outcome: dict[str, Any],
    other_load: dict[str, dict[str, float]],
) -> None:
    """The table, what was unavailable and why, the API's p99s, and a warning for each group
    of figures that other processes' load (by group, from ``OtherLoad``) may have skewed."""
    figures: list[Figure] = outcome["figures"]
    print()
    print(
        f"hive bench on {info['cpu_model']} ({info['cores']} cores), kernel {info['kernel']}, "
        f"Python {info['python']}; {outcome['seconds']:.0f}s"
        + (" (BENCH_QUICK: too few samples to judge)" if settings.quick else "")
    )
    print(table(figures))
    print(
        "(rows of one value - a rate, CPU, RSS, a wall time - show it under hive p50; "
        "their p95/max are of the per-request or per-worker times)"
    )
    print()
    for f in figures:
        if "unavailable" in f.hive:
            print(f"{f.key} {f.title}: {f.hive['unavailable']}")
        for name, peer in f.peers.items():
            if "unavailable" in peer:
                print(f"{f.key} {name}: {peer['unavailable']}")
    api = [f for f in figures if f.key.startswith("5") and f.key.endswith("'")]
    for f in api:
        peer = next(iter(f.peers.values()), {})
        print(
            f"{f.key} {f.title}: hive p50 {fmt(f.hive.get('p50'), 'ms')} ms, "
            f"p99 {fmt(f.hive.get('p99'), 'ms')} ms; bare aiohttp p50 "
            f"{fmt(peer.get('p50'), 'ms')} ms, p99 {fmt(peer.get('p99'), 'ms')} ms"
        )
    busy = {k: v for k, v in other_load.items() if v["other_cores"] >= OTHER_LOAD_WARNING}
    if busy:
        print(
            "WARNING: other processes loaded this machine during "
            + ", ".join(f"figure {k} ({v['other_cores']:.2f} cores)" for k, v in busy.items())
            + ": those figures are skewed; run again on a quiet machine"
        )
    print(f"results: {settings.out}")
