"""The NVML reader (hive.devices.gpu) against a fake libnvidia-ml.so.1 loaded by the real pynvml.

pynvml loads the library by name once per process, so each scenario runs in a child Python with
LD_LIBRARY_PATH pointing at the fake and FAKE_NVML_CONFIG at a config written here; the child
prints snapshots as JSON lines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from harness.nvml import (
    FakeGpu,
    build_fake_nvml,
    compiler,
    env_for,
    write_config,
)

TESTS = Path(__file__).parent.parent
UUID0 = "GPU-11111111-2222-3333-4444-555555555555"
UUID1 = "GPU-66666666-7777-8888-9999-000000000000"

# Runs before each scenario's body in the child: a monitor `m`, and `dump()` to report.
PRELUDE = """
import dataclasses, json, os, sys, threading, time
from pathlib import Path
import pynvml
from harness.nvml import FakeGpu, FakeProc, write_config
from hive.devices.gpu import GpuMonitor, compute_pids

CONFIG = Path(os.environ["FAKE_NVML_CONFIG"]) if "FAKE_NVML_CONFIG" in os.environ else None
THREADS = set()

def _record(name, call):
    def recorded(*args, **kwargs):
        THREADS.add(threading.current_thread().name)
        return call(*args, **kwargs)
    return recorded

# Note which threads call NVML: the real functions still run, only wrapped.
for _name in dir(pynvml):
    if _name.startswith("nvml") and callable(getattr(pynvml, _name)):
        setattr(pynvml, _name, _record(_name, getattr(pynvml, _name)))

def dump(snapshot, **extra):
    record = dataclasses.asdict(snapshot)
    record["pids"] = {str(k): v for k, v in compute_pids(snapshot).items()}
    record["models"] = [g.to_model(["w-" + str(g.index)]).model_dump(mode="json")
                        for g in snapshot.gpus]
    record.update(extra)
    print(json.dumps(record), flush=True)
"""


@pytest.fixture(scope="session")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if compiler() is None:
        pytest.skip("no C compiler to build the fake NVML (apt-get install gcc)")
    return build_fake_nvml(tmp_path_factory.getbasetemp() / "fake-nvml")


def run_child(lib: Path | None, config: Path | None, body: str, **env: str) -> list[dict[str, Any]]:
    """Run PRELUDE + body in a child Python using the fake NVML; return its JSON lines."""
    environ = env_for(lib, config) if lib is not None else env_for(Path("/nonexistent"), config)
    environ["PYTHONPATH"] = f"{TESTS}:{TESTS.parent}"
    environ.update(env)
    code = PRELUDE + textwrap.dedent(body)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def two_gpus(**changes: Any) -> list[FakeGpu]:
    gpu0 = dict(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        uuid=UUID0,
        bus="00000000:17:00.0",
        total_mib=81559,
        used_mib=500,
        util=12,
        temp=40,
        power_mw=70250,
        cpus="0",
    )
    gpu1 = dict(
        index=1,
        name="NVIDIA A10",
        uuid=UUID1,
        bus="00000000:B3:00.0",
        total_mib=23028,
        used_mib=3000,
        util=97,
        temp=71,
        power_mw=150000,
        cpus="1",
    )
    for key, value in changes.items():
        target, _, field = key.partition("_")
        (gpu0 if target == "g0" else gpu1)[field] = value
    return [FakeGpu(**gpu0), FakeGpu(**gpu1)]


# -- scenarios in a child process ---------------------------------------------------------------


def test_two_gpus_every_field_through_the_real_pynvml(fake_lib: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "nvml.conf",
        two_gpus(),
        [(0, 4242, 2048), (1, 4343, None), (1, 4242, 100)],
        driver="555.42.06",
    )
    [snap] = run_child(
        fake_lib,
        config,
        """
        m = GpuMonitor(interval=60)
        snapshot = m.start()
        maps = Path("/proc/self/maps").read_text()
        loaded = sorted({l.split()[-1] for l in maps.splitlines() if "libnvidia-ml" in l})
        m.close()
        dump(snapshot, pynvml_file=pynvml.__file__, loaded=loaded, threads=sorted(THREADS),
             running=m.running)
        """,
    )
    # The real binding, loading the fake as libnvidia-ml.so.1.
    assert "site-packages" in snap["pynvml_file"]
    assert snap["loaded"] == [str(fake_lib / "libnvidia-ml.so.1")]
    # Every NVML call ran on the monitor's own thread.
    assert snap["threads"] == ["hive-nvml"]
    assert snap["running"] is False

    assert snap["error"] is None
    assert snap["driver_version"] == "555.42.06"
    assert snap["taken_at"] > 0
    gpu0, gpu1 = snap["gpus"]
    assert gpu0 == {
        "index": 0,
        "uuid": UUID0,
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:17:00.0",
        "memory_total_mib": 81559,
        "memory_used_mib": 500,
        "memory_free_mib": 81059,
        "utilization_percent": 12,
        "temperature_c": 40,
        "power_w": 70.25,
        "cpu_affinity": [0],
        "processes": [{"pid": 4242, "used_memory_mib": 2048}],
        "healthy": True,
        "error": None,
    }
    assert gpu1["uuid"] == UUID1
    assert gpu1["name"] == "NVIDIA A10"
    assert gpu1["pci_bus_id"] == "00000000:B3:00.0"
    assert (gpu1["memory_total_mib"], gpu1["memory_used_mib"]) == (23028, 3000)
    assert (gpu1["utilization_percent"], gpu1["temperature_c"], gpu1["power_w"]) == (97, 71, 150.0)
    assert gpu1["cpu_affinity"] == [1]
    assert gpu1["processes"] == [
        {"pid": 4343, "used_memory_mib": None},
        {"pid": 4242, "used_memory_mib": 100},
    ]
    # pid -> MiB over all GPUs; a pid with no figure is left out.
    assert snap["pids"] == {"4242": 2148}

    model0, model1 = snap["models"]
    assert model0["id"] == "GPU-0" and model1["id"] == "GPU-1"
    assert model0["workers"] == ["w-0"]
    assert model0["processes"] == [{"pid": 4242, "used_memory_mib": 2048}]
    assert model1["uuid"] == UUID1 and model1["healthy"] is True


def test_unsupported_or_failing_call_nulls_that_field_only(fake_lib: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "nvml.conf",
        two_gpus(
            g0_unsupported=["power", "temp"],
            g1_unsupported=["affinity", "processes", "memory"],
            g1_fail={"util": 999},
        ),
        [(1, 77, 10)],
    )
    [snap] = run_child(
        fake_lib,
        config,
        """
        m = GpuMonitor(interval=60)
        dump(m.start())
        m.close()
        """,
    )
    gpu0, gpu1 = snap["gpus"]
    assert gpu0["power_w"] is None and gpu0["temperature_c"] is None
    assert gpu0["memory_used_mib"] == 500 and gpu0["utilization_percent"] == 12
    assert gpu0["healthy"] is True and gpu0["error"] is None

    assert gpu1["cpu_affinity"] == [] and gpu1["processes"] == []
    assert gpu1["memory_total_mib"] is None
    assert gpu1["memory_used_mib"] is None and gpu1["memory_free_mib"] is None
    assert gpu1["utilization_percent"] is None  # an unexpected error: the figure only
    assert gpu1["temperature_c"] == 71 and gpu1["power_w"] == 150.0
    assert gpu1["name"] == "NVIDIA A10" and gpu1["uuid"] == UUID1
    assert gpu1["healthy"] is True and gpu1["error"] is None
    # The API model accepts the nulls.
    assert snap["models"][1]["memory_total_mib"] is None


def test_lost_gpu_is_unhealthy_and_the_others_stay_healthy(fake_lib: Path, tmp_path: Path) -> None:
    broken = [FakeGpu(index=2, lost=True), FakeGpu(index=3, fail={"uuid": 4})]
    config = write_config(tmp_path / "nvml.conf", [*two_gpus(), *broken], [(1, 500, 1000)])
    later = [*two_gpus(g1_lost=True), *broken]
    before, after = run_child(
        fake_lib,
        config,
        f"""
        m = GpuMonitor(interval=60)
        dump(m.start())
        write_config(CONFIG, {repr_gpus(later)}, [(1, 500, 1000)])
        dump(m.refresh_now())
        m.close()
        """,
    )
    # Lost before it was ever read: nothing known, but listed.
    assert before["gpus"][2]["healthy"] is False
    assert "lost" in before["gpus"][2]["error"]
    assert before["gpus"][2]["uuid"] is None
    # Any other failure on an identity call: unhealthy, with the reason.
    assert before["gpus"][3]["healthy"] is False
    assert "Insufficient Permissions" in before["gpus"][3]["error"]
    assert before["models"][3]["uuid"] == ""
    assert before["gpus"][1]["healthy"] is True

    gpu0, gpu1 = after["gpus"][:2]
    assert gpu0["healthy"] is True and gpu0["error"] is None
    assert gpu0["memory_used_mib"] == 500
    # Lost mid-run: unhealthy, keeps what was known of it, no live figures.
    assert gpu1["healthy"] is False
    assert "lost" in gpu1["error"].lower()
    assert (gpu1["uuid"], gpu1["name"], gpu1["pci_bus_id"]) == (
        UUID1,
        "NVIDIA A10",
        "00000000:B3:00.0",
    )
    assert gpu1["memory_total_mib"] == 23028
    assert gpu1["memory_used_mib"] is None and gpu1["utilization_percent"] is None
    assert gpu1["processes"] == []
    assert after["pids"] == {}
    assert after["error"] is None


def repr_gpus(gpus: list[FakeGpu]) -> str:
    """Python source for a list of FakeGpu, for a child's body."""
    return "[" + ", ".join(repr(gpu) for gpu in gpus) + "]"


def test_config_change_shows_on_refresh_now(fake_lib: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "nvml.conf", two_gpus(), [(0, 10, 100)])
    changed = two_gpus(g0_used_mib=60000, g0_util=88, g0_temp=66, g0_power_mw=300000)
    before, after = run_child(
        fake_lib,
        config,
        f"""
        m = GpuMonitor(interval=60)
        dump(m.start())
        write_config(CONFIG, {repr_gpus(changed)}, [(0, 10, 100), (0, 11, 50000)])
        dump(m.refresh_now())
        m.close()
        """,
    )
    assert before["gpus"][0]["memory_used_mib"] == 500
    gpu0 = after["gpus"][0]
    assert gpu0["memory_used_mib"] == 60000
    assert gpu0["memory_free_mib"] == 81559 - 60000
    assert (gpu0["utilization_percent"], gpu0["temperature_c"], gpu0["power_w"]) == (88, 66, 300.0)
    assert [p["pid"] for p in gpu0["processes"]] == [10, 11]
    assert after["pids"] == {"10": 100, "11": 50000}
    assert after["taken_at"] > before["taken_at"]


def test_periodic_refresh_without_asking(fake_lib: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "nvml.conf", two_gpus())
    changed = two_gpus(g1_util=5)
    [snap] = run_child(
        fake_lib,
        config,
        f"""
        m = GpuMonitor(interval=0.05)
        m.start()
        write_config(CONFIG, {repr_gpus(changed)})
        deadline = time.monotonic() + 10
        while m.snapshot().gpus[1].utilization_percent != 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        dump(m.snapshot())
        m.close()
        """,
    )
    assert snap["gpus"][1]["utilization_percent"] == 5


@pytest.mark.parametrize(
    ("config_text", "env", "expected"),
    [
        (None, {}, "NVIDIA driver is not loaded"),
        ("system driver=1\n", {}, "no GPU"),
        ("system init_error=18\n", {}, "NVML unavailable: "),
        ("gpu index=0\n", {"FAKE_NVML_INIT_ERROR": "999"}, "Unknown Error"),
    ],
    ids=["no-config", "zero-gpus", "init-fails", "init-fails-env"],
)
def test_no_gpus_gives_an_error_line(
    fake_lib: Path, tmp_path: Path, config_text: str | None, env: dict[str, str], expected: str
) -> None:
    config = None
    if config_text is not None:
        config = tmp_path / "nvml.conf"
        config.write_text(config_text)
    [snap] = run_child(
        fake_lib,
        config,
        """
        m = GpuMonitor(interval=60)
        snapshot = m.start()
        m.close()
        dump(snapshot, monitor_error=m.error)
        """,
        **env,
    )
    assert snap["gpus"] == []
    assert expected in snap["error"]
    assert "\n" not in snap["error"]
    assert snap["monitor_error"] == snap["error"]


def test_no_library_at_all(tmp_path: Path) -> None:
    [snap] = run_child(
        None,
        None,
        """
        m = GpuMonitor(interval=60)
        dump(m.start())
        m.close()
        """,
    )
    assert snap["gpus"] == []
    assert "libnvidia-ml.so.1 not found" in snap["error"]


def test_driver_appearing_later_is_picked_up(fake_lib: Path, tmp_path: Path) -> None:
    config = tmp_path / "nvml.conf"  # not there yet: "driver not loaded"
    before, after = run_child(
        fake_lib,
        config,
        f"""
        m = GpuMonitor(interval=60, retry_interval=3600)
        dump(m.start())
        write_config(CONFIG, {repr_gpus(two_gpus())})
        dump(m.refresh_now())
        m.close()
        """,
    )
    assert before["gpus"] == [] and "not loaded" in before["error"]
    assert [g["uuid"] for g in after["gpus"]] == [UUID0, UUID1]
    assert after["error"] is None


def test_slow_gpu_blocks_neither_start_nor_snapshot(fake_lib: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "nvml.conf", two_gpus(g1_delay_ms=40))
    first, later = run_child(
        fake_lib,
        config,
        """
        m = GpuMonitor(interval=60, start_timeout=0.05)
        t = time.monotonic()
        snapshot = m.start()
        start_s = time.monotonic() - t
        t = time.monotonic()
        for _ in range(100):
            m.snapshot(); m.error
        snapshot_s = time.monotonic() - t
        dump(snapshot, start_s=start_s, snapshot_s=snapshot_s)
        dump(m.refresh_now(timeout=30))
        m.close()
        """,
    )
    assert first["start_s"] < 0.4
    assert first["snapshot_s"] < 0.05
    assert first["gpus"] == [] and "did not answer" in first["error"]
    assert [g["healthy"] for g in later["gpus"]] == [True, True]
    assert later["error"] is None


def test_close_shuts_nvml_down(fake_lib: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "nvml.conf", two_gpus())
    [snap] = run_child(
        fake_lib,
        config,
        """
        m = GpuMonitor(interval=60)
        m.start()
        m.close()
        try:
            pynvml.nvmlDeviceGetCount()
            after = "still initialised"
        except pynvml.NVMLError_Uninitialized:
            after = "uninitialized"
        dump(m.snapshot(), after=after, refreshed=m.refresh_now() is m.snapshot())
        """,
    )
    assert snap["after"] == "uninitialized"
    assert snap["refreshed"] is True
    assert len(snap["gpus"]) == 2  # the last snapshot stays readable


# -- pure helpers, in process ------------------------------------------------------------------
