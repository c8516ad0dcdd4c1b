"""Plain-text tables and figures for the ``hive`` CLI: what a person reads at a glance."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from hive.models import CpuDevice, Devices, GpuDevice, Node, Worker


def escape(text: str) -> str:
    """``text`` with every control or other non-printable character shown as an escape
    (``\\x1b``): a model name or label must never move a person's cursor or recolour their
    terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    rows = [[escape(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``42s``, ``5m3s``, ``2h10m``, ``3d4h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def since(at: datetime | None, now: datetime | None = None) -> str:
    if at is None:
        return "-"
    return duration(((now or datetime.now(UTC)) - at).total_seconds())


def size(n: int | None) -> str:
    """Bytes as ``512M``, ``31.2G``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit in ("B", "K", "M") else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"  # pragma: no cover - the loop always returns


def bar(used: int | None, total: int | None, width: int = 10) -> str:
    """``[####------]``: how full, for a glance."""
    if not used or not total:
        return "[" + "-" * width + "]"
    filled = min(width, round(width * used / total))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _opt(value: object, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def workers(records: Sequence[Worker]) -> str:
    headers = ["ID", "MODEL", "BACKEND", "ROLE", "DEVICE", "STATE", "PID", "URL", "RESTARTS", "AGE"]
    now = datetime.now(UTC)
    rows = []
    for w in records:
        state = w.state.value if w.desired == "running" else f"{w.state.value} (stopping)"
        if w.desired == "stopped" and w.state.value in ("stopped", "failed"):
            state = w.state.value
        rows.append(
            [
                w.id,
                w.model,
                w.backend,
                w.role,
                w.device,
                state,
                _opt(w.pid),
                w.url,
                str(w.restarts),
                since(w.created_at, now),
            ]
        )
    return table(headers, rows)


def worker(w: Worker) -> str:
    """One record, a field a line, for ``hive show``."""
    fields: list[tuple[str, object]] = [
        ("id", w.id),
        ("model", w.model),
        ("backend", w.backend),
        ("state", w.state.value),
        ("desired", w.desired),
        ("device", w.device),
        ("gpus", ",".join(w.gpus) or "-"),
        ("cpus", _cores(w.cpus)),
        ("pid", _opt(w.pid)),
        ("url", w.url),
        ("restart", w.restart),
        ("restarts", w.restarts),
        ("error", _opt(w.error)),
        ("exit code", _opt(w.exit_code)),
        ("next restart", _opt(w.next_restart_at and w.next_restart_at.isoformat())),
        ("created", w.created_at.isoformat()),
        ("started", _opt(w.started_at and w.started_at.isoformat())),
        ("ready", _opt(w.ready_at and w.ready_at.isoformat())),
        ("startup", _startup(w)),
        ("stopped", _opt(w.stopped_at and w.stopped_at.isoformat())),
        ("in flight", _opt(w.in_flight)),
        ("heartbeat", _opt(w.last_heartbeat_at and w.last_heartbeat_at.isoformat())),
        ("rss", size(w.rss_bytes)),
        ("cpu", _opt(w.cpu_percent, "%")),
        ("gpu memory", _opt(w.gpu_memory_used_mib, " MiB")),
        ("memory", _memory(w)),
        ("labels", ", ".join(f"{k}={v}" for k, v in w.labels.items()) or "-"),
        ("role", w.role),
        ("bootstrap port", _opt(w.bootstrap_port)),
        ("priority", w.priority),
        ("cost", w.cost),
        ("routers", ", ".join(f"{k}: {v}" for k, v in w.routers.items()) or "-"),
        ("containment", _opt(w.containment)),
        ("generation", w.generation),
        ("declared", _opt(w.declared)),
        ("replacement", _opt(w.replacement)),
        ("replacing", _opt(w.replacing)),
    ]
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {escape(str(value))}" for name, value in fields)


def _startup(w: Worker) -> str:
    """``41.9s to ready: hive 0.01s, process 6.2s, ... probe 0.12s; register 0.3s``."""
    if not w.startup:
        return "-"
    before = [p for p in w.startup if p.phase != "register"]
    text = ", ".join(f"{p.phase} {p.seconds:.2f}s" for p in before)
    if before and before[-1].phase == "probe":
        text = f"{sum(p.seconds for p in before):.2f}s to ready: {text}"
    else:
        text = f"so far: {text}"
    after = [p for p in w.startup if p.phase == "register"]
    return text + "".join(f"; register {p.seconds:.2f}s" for p in after)


def _memory(w: Worker) -> str:
    """``812 MiB reserved (learned), peak 790 MiB; GPU 4096 MiB reserved per GPU, peak 3900
    MiB``, and whether a stopped worker's reservation waits for its memory to be back."""
    if w.memory_mib is not None:
        text = f"{w.memory_mib} MiB reserved ({w.memory_source})"
    else:
        text = "none reserved"
    if w.memory_peak_mib is not None:
        text += f", peak {w.memory_peak_mib} MiB"
    if w.gpus:
        share = w.gpu_memory_mib
        text += f"; GPU {share} MiB reserved per GPU" if share else "; GPUs held whole"
        if w.gpu_memory_peak_mib is not None:
            text += f", peak {w.gpu_memory_peak_mib} MiB"
    if w.memory_held and w.state.value in ("stopped", "failed") and w.next_restart_at is None:
        text += "; still held: its memory is not back yet"
    return text


def _cores(cores: Sequence[int]) -> str:
    """``0-3,8,10-11``: core ids as ranges."""
    if not cores:
        return "-"
    parts = []
    ordered = sorted(cores)
    start = prev = ordered[0]
    for core in [*ordered[1:], None]:
        if core is not None and core == prev + 1:
            prev = core
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if core is not None:
            start = prev = core
    return ",".join(parts)


def _cpu_row(c: CpuDevice) -> list[str]:
    used = None
    if c.memory_total_bytes is not None and c.memory_available_bytes is not None:
        used = c.memory_total_bytes - c.memory_available_bytes
    memory = f"{size(used)}/{size(c.memory_total_bytes)}"
    return [
        c.id,
        _cores(c.cores),
        memory,
        _opt(c.load and round(c.load, 1), "%") if c.load is not None else "-",
        ",".join(c.workers) or "-",
    ]


def _gpu_row(g: GpuDevice) -> list[str]:
    memory = (
        f"{bar(g.memory_used_mib, g.memory_total_mib)} "
        f"{_opt(g.memory_used_mib)}/{_opt(g.memory_total_mib)} MiB"
    )
    health = "ok" if g.healthy else f"UNHEALTHY: {g.error or '?'}"
    return [
        g.id,
        g.name or "-",
        memory,
        _opt(g.utilization_percent, "%"),
        _opt(g.temperature_c, "C"),
        _opt(g.power_w and round(g.power_w), "W") if g.power_w is not None else "-",
        health,
        ",".join(g.workers) or "-",
    ]


def devices(d: Devices) -> str:
    parts = [
        table(["CPU", "CORES", "MEMORY", "LOAD", "WORKERS"], [_cpu_row(c) for c in d.cpus]),
    ]
    if d.gpus:
        headers = ["GPU", "NAME", "MEMORY", "UTIL", "TEMP", "POWER", "HEALTH", "WORKERS"]
        parts.append(table(headers, [_gpu_row(g) for g in d.gpus]))
    if d.gpu_error:
        parts.append(f"GPUs: none ({d.gpu_error})")
    return "\n\n".join(parts)


def node(n: Node) -> str:
    counts = ", ".join(f"{count} {state.value}" for state, count in n.workers.items())
    summary = f"{n.devices.cpus} CPU node(s), {n.devices.cores} cores, {n.devices.gpus} GPU(s)"
    if n.devices.gpu_error:
        summary += f" ({n.devices.gpu_error})"
    lines = [
        f"hive {n.version} on {n.hostname}, up {since(n.started_at)}",
        f"devices  {summary}",
        f"workers  {counts}",
    ]
    if n.fleet is not None:
        f = n.fleet
        state = f.etcd if f.error is None else f"{f.etcd} ({f.error})"
        lines.append(
            f"fleet    node {f.node}: etcd {state} for {since(f.since)}; "
            f"{f.desired} desired worker(s), lease {f.lease_ttl}s"
        )
        if f.claim == "taken" and f.holder is not None:
            who = f"{f.holder.get('hostname')} at {f.holder.get('api_url')}"
            lines.append(f"         name held by another hive ({who}): not joined, running alone")
        elif f.watch == "retrying":
            lines.append(f"         desired set: watch ended ({f.watch_error}), reading it again")
    if n.api_url or n.socket:
        where = " and ".join(x for x in (n.api_url, n.socket and f"unix socket {n.socket}") if x)
        lines.append(f"api      {where}")
    return "\n".join(lines + _files(n))


def _files(n: Node) -> list[str]:
    """Where the node's files are, and how its last reload went (a refusal's sentence whole)."""
    if n.state_dir is None:  # a hive from before these fields
        return []
    token = {"config": "from the configuration's token", "HIVE_TOKEN": "from HIVE_TOKEN"}
    lines = [
        f"config   {escape(n.config_file or 'none (the defaults)')}",
        f"state    {escape(n.state_dir)}",
        f"token    {token.get(n.token_source or '') or escape(f'file {n.token_file}')}",
    ]
    if n.last_reload is not None:
        r = n.last_reload
        when = "at start" if r.trigger == "start" else r.trigger
        verdict = "ok" if r.ok else "REFUSED"
        first, *rest = r.message.splitlines() or [""]
        lines.append(f"reload   {when}, {since(r.at)} ago: {verdict}: {escape(first)}")
        lines += [f"         {escape(line)}" for line in rest]
    return lines
