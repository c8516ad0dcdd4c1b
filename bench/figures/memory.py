"""Figure 10: memory truth (issue 30).

* **Estimate and learned figure against the measured peak**, for a real llama-server serving a
  generated GGUF model (8 layers, embedding 1024, 16 heads and 4 KV heads, f16: 174 MiB of
  weights) at three context sizes and two slot counts. Each case runs twice: the first run
  reserves hive's estimate (made before it ever ran), serves a prompt that fills a micro-batch
  (so the compute buffers are touched, as on a busy server) and is stopped; its peak is what the
  estimate is judged against. The second run of the same spawn reserves what the first taught
  (``learned``) and is judged against its own peak. Beside them, Ollama's published estimate for
  the same model and context (its ``llm/memory.go`` and ``fs/ggml/ggml.go``, reproduced below).
* **Packing**: hive in a cgroup (v1 memory controller) whose limit is ``host_memory_mib`` plus
  room for hive itself; llama-server workers (``-lm none``, no mmap: each holds its own
  weights) spawned until hive refuses one, with learned figures; then each serves a prompt at
  the same moment.
  Counted: workers the OOM killer took (goal 0), and whether the last refusal's figures are
  right. The control: the same spawns declaring 1 MiB each, so hive admits them all.
* **The cost of measuring** at 200 idle tiny workers with default settings: hive's idle CPU
  beside the same hive without memory truth (the commit before it, from a git worktree), in
  the same run; and what the meter's samples took, from its own counters in ``/metrics``.

Run with the bench (``BENCH_ONLY=10``), or alone: ``.venv/bin/python bench/figures/memory.py``
(needs llama-server: ``HIVE_LLAMA_SERVER``, or ``engines/llama_server.py`` builds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
for path in (ROOT, ROOT / "bench", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import tiny_gguf  # noqa: E402
from benchlib import (  # noqa: E402
    DROP_ENV,
    EXTRA_ENV,
    TAG,
    EventStream,
    log,
    new_home,
    watch_usage,
)

from figures.common import Figure, Settings, check, unavailable  # noqa: E402
from harness.daemon import Hive  # noqa: E402
from harness.net import port_block  # noqa: E402
from harness.stats import summarize  # noqa: E402
from hive.devices.estimate import MIB, read_gguf  # noqa: E402

CASES = [(2048, 1), (2048, 4), (8192, 1), (8192, 4), (32768, 1), (32768, 4)]
PROMPT = "hello world "
READY = {"wait": "ready", "timeout": "120"}
V1_MEMORY = Path("/sys/fs/cgroup/memory")


def llama_server() -> Path | None:
    if path := os.environ.get("HIVE_LLAMA_SERVER"):
        return Path(path)
    found = subprocess.run(
        [sys.executable, str(ROOT / "engines" / "llama_server.py"), "path"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return Path(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip() else None


def memory_hive(name: str, config: str, env: dict[str, str] | None = None, span: int = 500) -> Hive:
    home = new_home(name)
    low = port_block(span)
    return Hive(
        'default_restart = "no"\n' + config,
        {**EXTRA_ENV, **(env or {})},
        tag=TAG, home=home, port_range=(low, low + span - 1), drop_env=DROP_ENV, log_tail=4000,
    )  # fmt: skip


def ollama_estimate(path: Path, n_ctx: int) -> int:
    """Ollama's estimate of the model's memory on a host without a GPU, in MiB, as its
    ``estimateGPULayers`` (llm/memory.go, at ollama/ollama f560bd077^, the last version that had
    it) computes it when no GPU has room: every layer's weights plus its KV cache
    (``GraphSize`` in fs/ggml/ggml.go: context x (key + value length) x KV heads x 2 bytes for
    f16, context being ``num_ctx x numParallel``, i.e. llama-server's total ``-c``), plus the
    output layer (``output`` and ``output_norm``; ``token_embd`` only when there is no
    ``output``). No graph (compute buffer) is added without a GPU, and nothing for the runtime."""
    model = read_gguf(path)
    layers = sum(model.layer(i) for i in range(model.n_layer))
    kv = sum(n_ctx * (model.key_length + model.value_length) * h * 2 for h in model.n_head_kv)
    output = model.tensors.get("output.weight", model.tensors.get("token_embd.weight", 0))
    output += model.tensors.get("output_norm.weight", 0)
    return -(-(layers + kv + output) // MIB)


async def _serve(url: str, tokens: int = 490) -> None:
    """A prompt of about ``tokens`` tokens (a micro-batch of llama-server's default 512, within
    a slot of 512 cells), and four tokens generated."""
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as c:
        async with c.post(f"{url}/tokenize", json={"content": PROMPT}) as r:
            per = len((await r.json())["tokens"])
        body = {"prompt": PROMPT * max(tokens // per, 1), "n_predict": 4, "cache_prompt": False}
        async with c.post(f"{url}/completion", json=body) as r:
            text = await r.text()
            if r.status != 200:
                raise RuntimeError(f"llama-server answered {r.status}: {text[:300]}")


async def _run(hive: Hive, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Spawn, serve the prompt, stop: the record as it started and as it stopped."""
    started = await hive.call("POST", "/v1/workers", json_body=spec, params=READY)
    await _serve(started["url"])
    stopped = await hive.call("POST", f"/v1/workers/{spec['id']}/stop?wait=true")
    await hive.call("DELETE", f"/v1/workers/{spec['id']}")
    return started, stopped


def _pct(reserved: int, peak: int) -> float:
    return round((reserved - peak) / peak * 100, 1)


async def figure_estimates(binary: Path, model: Path) -> list[Figure]:
    env = {"PATH": f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    hive = memory_hive("memory-estimate", "", env)
    await hive.start_async()
    rows: list[dict[str, Any]] = []
    try:
        for ctx, slots in CASES:
            args = ["-c", str(ctx), "-np", str(slots)]
            spec = {"model": str(model), "backend": "llama-server", "args": args}
            first, end1 = await _run(hive, {**spec, "id": f"e{ctx}-{slots}-a"})
            second, end2 = await _run(hive, {**spec, "id": f"e{ctx}-{slots}-b"})
            ollama = ollama_estimate(model, ctx)
            row = {
                "ctx": ctx, "slots": slots,
                "estimate": first["memory_mib"], "estimate_source": first["memory_source"],
                "peak1": end1["memory_peak_mib"],
                "learned": second["memory_mib"], "learned_source": second["memory_source"],
                "peak2": end2["memory_peak_mib"], "ollama": ollama,
            }  # fmt: skip
            row["estimate_err"] = _pct(row["estimate"], row["peak1"])
            row["learned_err"] = _pct(row["learned"], row["peak2"])
            row["ollama_err"] = _pct(ollama, row["peak1"])
            rows.append(row)
            log(f"memory: {row}")
    finally:
        await hive.close()
    notes = [
        f"-c {r['ctx']} -np {r['slots']}: estimate {r['estimate']} MiB ({r['estimate_err']:+}%), "
        f"peak {r['peak1']} MiB; learned {r['learned']} MiB ({r['learned_err']:+}%), peak "
        f"{r['peak2']} MiB; Ollama {r['ollama']} MiB ({r['ollama_err']:+}%)"
        for r in rows
    ]
    sources = {r["estimate_source"] for r in rows} | {r["learned_source"] for r in rows}
    notes.append(f"sources seen: {sorted(s for s in sources if s)}")

    def row(title: str, key: str, limit: float | None) -> Figure:
        errors = [abs(r[key]) for r in rows]
        summary = summarize(errors)
        return Figure(
            "10", title, "% |error|", summary,
            target=f"<= {limit:g} % (each)" if limit else "",
            met=check(max(errors), "<=", limit) if limit else None, stat="max",
            notes=notes if key == "estimate_err" else [],
        )  # fmt: skip

    return [
        row(
            "memory estimate before the first run vs measured peak (llama-server)",
            "estimate_err",
            15,
        ),
        row("memory learned from the first run vs the second run's peak", "learned_err", 5),
        row("Ollama's estimate (llm/memory.go) vs measured peak, same cases", "ollama_err", None),
    ]


def _v1_group(limit_mib: int) -> Path | None:
    if os.geteuid() != 0 or not (V1_MEMORY / "memory.limit_in_bytes").exists():
        return None
    group = V1_MEMORY / f"hive-bench-memory-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit_mib * MIB))
    return group


def _oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return -1


async def _pack(hive: Hive, spec: dict[str, Any], prefix: str) -> tuple[list[str], dict[str, Any]]:
    """Spawn ``spec`` until hive refuses one; the workers, and the refusal's error."""
    made: list[str] = []
    async with hive.session() as s:
        for i in range(64):
            body = {**spec, "id": f"{prefix}{i}"}
            async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
                answer = await r.json()
            if r.status == 503:
                return made, answer["error"]
            if r.status != 200:
                return made, {"unexpected": r.status, "answer": answer}
            made.append(body["id"])
    return made, {"never refused": True}


async def figure_packing(binary: Path, model: Path, budget: int) -> list[Figure]:
    group = _v1_group(budget + 256)
    if group is None:
        why = unavailable("needs root and the cgroup v1 memory controller")
        return [Figure("10", "packing llama-servers by learned figures: OOM kills", "", why)]
    env = {"PATH": f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    hive = memory_hive("memory-pack", f"host_memory_mib = {budget}\n", env)
    await hive.start_async()
    (group / "cgroup.procs").write_text(str(hive.pid))  # its workers are charged here too
    spec = {"model": str(model), "backend": "llama-server",
            "args": ["-c", "2048", "-np", "1", "-lm", "none"]}  # fmt: skip
    notes: list[str] = [f"cgroup v1 memory limit {budget + 256} MiB = host_memory_mib + 256"]
    try:
        await _run(hive, {**spec, "id": "teach"})
        made, refusal = await _pack(hive, spec, "p")
        learned = (await hive.call("GET", f"/v1/workers/{made[0]}"))["memory_mib"] if made else 0
        urls = [(await hive.call("GET", f"/v1/workers/{w}"))["url"] for w in made]
        await asyncio.gather(*(_serve(u) for u in urls))
        records = [await hive.call("GET", f"/v1/workers/{w}") for w in made]
        alive = sum(1 for r in records if r["state"] in ("ready", "busy"))
        kills = _oom_kills(group)
        # Stopped, each is sampled a last time: the peaks of the prompt served are in.
        stops = [hive.call("POST", f"/v1/workers/{w}/stop", params={"wait": "true"}) for w in made]
        records = await asyncio.gather(*stops)
        figures = refusal.get("memory", {})
        expected = {
            "needed_mib": learned, "source": "learned", "host_memory_mib": budget,
            "free_mib": budget - learned * len(made), "held": {w: learned for w in made},
        }  # fmt: skip
        right = figures == expected
        peaks = [r["memory_peak_mib"] or 0 for r in records]
        notes += [
            f"{len(made)} workers admitted at {learned} MiB learned each, "
            f"{alive} still serving after a prompt each at once; their peaks sum to "
            f"{sum(peaks)} MiB",
            f"the refusal: {refusal.get('message')}",
            f"its figures {'are' if right else 'are NOT'} right: {json.dumps(figures)}",
        ]
        for worker in ["teach", *made]:
            with contextlib.suppress(Exception):
                await hive.call("DELETE", f"/v1/workers/{worker}")
        # The control: the same spawns, declaring 1 MiB each, so that hive admits them all.
        lies = [f"c{i}" for i in range(len(made) + 4)]
        for worker in lies:
            body = {**spec, "id": worker, "memory_mib": 1}
            await hive.call("POST", "/v1/workers", json_body=body, params=READY)
        urls = [(await hive.call("GET", f"/v1/workers/{w}"))["url"] for w in lies]
        await asyncio.gather(*(_serve(u) for u in urls), return_exceptions=True)
        control = _oom_kills(group) - kills
        notes.append(
            f"control: {len(lies)} of the same workers declaring memory_mib = 1, admitted all; "
            f"the OOM killer then took {control} process(es)"
        )
        for worker in lies:
            with contextlib.suppress(Exception):
                await hive.call("DELETE", f"/v1/workers/{worker}")
    finally:
        await hive.close()
        with contextlib.suppress(OSError):
            group.rmdir()
    return [
        Figure(
            "10", "packing llama-servers by learned figures: OOM kills", "processes",
            {"value": kills, "n": len(made)}, target="0, last refusal's figures right",
            met=kills == 0 and right and alive == len(made), stat="value", notes=notes,
        )
    ]  # fmt: skip


async def _idle(label: str, env: dict[str, str], count: int, seconds: float) -> dict[str, Any]:
    from figures.scale import DEFAULT, spawn_many

    hive = memory_hive(label, DEFAULT, env, span=2 * count + 100)
    await hive.start_async()
    events = await EventStream(hive).start()
    try:
        await spawn_many(hive, events, count, label)
        await asyncio.sleep(16)
        before = await _meter(hive)
        usage = await watch_usage({"hive": psutil.Process(hive.pid)}, seconds)
        after = await _meter(hive)
    finally:
        await events.close()
        await hive.close()
    return {
        "cpu_percent": usage["hive"]["cpu_percent"], "window_s": usage["hive"]["window_s"],
        "samples": after[0] - before[0], "sample_seconds": after[1] - before[1],
    }  # fmt: skip


async def _meter(hive: Hive) -> tuple[float, float]:
    async with hive.session() as s, s.get("/metrics") as r:
        text = await r.text()
    found = dict(re.findall(r"^(hive_memory_sample(?:s|_seconds)_total) (\S+)$", text, re.M))
    return (
        float(found.get("hive_memory_samples_total", 0)),
        float(found.get("hive_memory_sample_seconds_total", 0)),
    )


async def figure_cost(count: int, seconds: float, baseline: str | None) -> list[Figure]:
    now = await _idle("memory-cost", {}, count, seconds)
    peers: dict[str, Any] = {}
    notes = [
        f"% of one core over {now['window_s']:g} s idle, {count} tiny workers, default settings; "
        f"the meter took {now['samples']:.0f} samples in the window, "
        f"{now['sample_seconds'] * 1000:.1f} ms in all "
        f"({now['sample_seconds'] / max(now['window_s'], 1) * 100:.3f} % of a core)"
    ]
    if baseline is not None:
        before = await _idle("memory-cost-base", {"PYTHONPATH": baseline}, count, seconds)
        peers["hive before memory truth"] = {"value": before["cpu_percent"], "n": 1}
    return [
        Figure(
            "10", f"idle CPU of hive with memory truth, {count} workers", "%",
            {"value": now["cpu_percent"], "n": 1}, peers, target="<= 1 % (200 workers)",
            met=check(now["cpu_percent"], "<=", 1.0) if count == 200 else None, stat="value",
            notes=notes,
        )
    ]  # fmt: skip


def baseline_tree(commit: str) -> str | None:
    """A git worktree of ``commit`` (the code before memory truth), for the cost's baseline."""
    where = Path(tempfile.mkdtemp(prefix="hb-memory-base-"))
    made = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where / "tree"), commit],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return str(where / "tree") if made.returncode == 0 else None


async def figures_memory(settings: Settings) -> list[Figure]:
    binary = llama_server()
    figures: list[Figure] = []
    if binary is None or not binary.exists():
        why = unavailable("no llama-server: set HIVE_LLAMA_SERVER or run engines/llama_server.py")
        figures.append(Figure("10", "memory estimate vs measured peak", "", why))
    else:
        work = Path(tempfile.mkdtemp(prefix="hb-memory-model-"))
        model = tiny_gguf.write(
            work / "model.gguf", context=32768, layers=8, embd=1024, heads=16, kv_heads=4,
            ff=2816, f16=True,
        )  # fmt: skip
        try:
            figures += await figure_estimates(binary, model)
            figures += await figure_packing(binary, model, 1600)
        finally:
            model.unlink()
            work.rmdir()
    count = settings.scale[0] if settings.scale else 200
    # The baseline: a directory holding hive's package without memory truth, or a commit.
    base = os.environ.get("BENCH_MEMORY_BASELINE")
    made = base is not None and not Path(base).is_dir()
    tree = (baseline_tree(base) if made else base) if base else None
    try:
        figures += await figure_cost(count, settings.idle_seconds, tree)
    finally:
        if made and tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tree],
                           check=False, capture_output=True)  # fmt: skip
    return figures


if __name__ == "__main__":
    from benchlib import remove_homes

    settings = Settings.from_env()
    try:
        result = asyncio.run(figures_memory(settings))
    finally:
        remove_homes()
    out = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results-memory.json"))
    out.write_text(json.dumps([f.__dict__ for f in result], indent=1, default=str))
    for figure in result:
        print(figure.title, figure.hive, figure.peers, figure.met)
        for note in figure.notes:
            print("   ", note)
