"""The systemd files in systemd/, read in this process: the unit's keys, the sysusers entry, the
example configuration (through hive's own loader). What runs a program on them
(`systemd-analyze verify`, systemd-sysusers, install.sh) is in tests/daemon/test_systemd_tools.py.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from hive.config import (
    BackendConfig,
    Config,
    FleetConfig,
    RouterConfig,
    load_config,
    parse_config,
)
from hive.desired.declared import parse_workers

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "hive.service"
SYSUSERS = SYSTEMD / "hive.sysusers"
EXAMPLE = SYSTEMD / "hive.toml.example"
INSTALL = SYSTEMD / "install.sh"


# -- reading the unit ----------------------------------------------------------------------------


def unit_parser() -> configparser.RawConfigParser:
    """The unit as INI: systemd's syntax, with repeated keys allowed (the last one wins here)."""
    parser = configparser.RawConfigParser(
        strict=False,
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        empty_lines_in_values=False,
        interpolation=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text(), source=str(UNIT))
    return parser


def unit_values() -> dict[tuple[str, str], list[str]]:
    """Every value of every key, in order: DeviceAllow= and friends are given many times."""
    values: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        values.setdefault((section, key.strip()), []).append(value.strip())
    return values


def one(key: str, section: str = "Service") -> str:
    found = unit_values().get((section, key))
    assert found, f"{section}.{key} is not set"
    assert len(found) == 1, f"{section}.{key} is set {len(found)} times"
    return found[0]


def seconds(span: str) -> float:
    """A systemd time span in seconds: ``90``, ``90s``, ``1min 30s``, ``2m``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    assert total > 0, f"not a time span: {span!r}"
    return total


# -- the unit ------------------------------------------------------------------------------------


def test_unit_parses_as_ini() -> None:
    parser = unit_parser()
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser.get("Install", "WantedBy") == "multi-user.target"
    # configparser keeps the last of a repeated key; the line reader sees them all.
    assert parser.get("Service", "DeviceAllow") == unit_values()[("Service", "DeviceAllow")][-1]


def test_unit_service_type_and_commands() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == "/usr/local/bin/hive serve --config /etc/hive/hive.toml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert one("User") == "hive"
    assert one("Group") == "hive"
    assert one("Environment") == "PYTHONUNBUFFERED=1"
    assert int(one("LimitNOFILE")) >= 65536


def test_unit_keeps_workers_when_hive_goes() -> None:
    # Only hive is signalled on stop, on a crash and by the watchdog: the workers are hive's to
    # stop, or to adopt after a restart.
    assert one("KillMode") == "process"
    # A worker killed by the kernel's OOM killer must not stop the unit (and every worker).
    assert one("OOMPolicy") == "continue"
    # Not RemoveIPC: it would delete the shared memory of workers that outlive hive.
    assert ("Service", "RemoveIPC") not in unit_values()
    # Not a private /tmp: systemd deletes it when the unit stops, under surviving workers.
    assert one("PrivateTmp") == "no"
    assert set(one("ReadWritePaths").split()) == {"/tmp", "/var/tmp"}


def test_unit_timeouts() -> None:
    stop = seconds(one("TimeoutStopSec"))
    defaults = Config()
    example = load_config(EXAMPLE)
    assert stop > 30
    # hive's own graceful shutdown (drain, then SIGTERM to SIGKILL) fits, with a margin.
    for config in (defaults, example):
        assert stop >= config.drain_timeout + config.stop_timeout + 15
    assert seconds(one("WatchdogSec")) >= 10
    assert seconds(one("TimeoutStartSec")) >= 30


def test_unit_directories() -> None:
    assert one("RuntimeDirectory") == "hive"
    assert one("RuntimeDirectoryMode") == "0750"
    assert one("StateDirectory") == "hive"
    assert one("ConfigurationDirectory") == "hive"
    example = load_config(EXAMPLE)
    assert example.socket_path == Path("/run/hive/hive.sock")  # in RuntimeDirectory
    assert example.state_path == Path("/var/lib/hive")  # StateDirectory
    assert example.token_path == Path("/etc/hive/token")  # ConfigurationDirectory


def test_unit_hardening() -> None:
    values = unit_values()
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "no",
        "Delegate": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictNamespaces": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
    }
    for key, value in expected.items():
        assert values.get(("Service", key)) == [value], key
    # These two would break the workers: JIT compilers need W+X memory; GPUs live in /dev.
    for key in ("MemoryDenyWriteExecute", "PrivateDevices"):
        assert ("Service", key) not in values, f"{key} breaks CUDA workers"


def test_unit_allows_the_nvidia_devices() -> None:
    allowed = [v.split() for v in unit_values()[("Service", "DeviceAllow")]]
    assert all(len(entry) == 2 and set(entry[1]) <= set("rwm") for entry in allowed), allowed

    def covers(node: str, proc_devices_group: str) -> bool:
        for spec, access in allowed:
            if "r" not in access or "w" not in access:
                continue
            if spec == node:
                return True
            if spec.startswith("char-") and re.fullmatch(
                spec.removeprefix("char-").replace("*", ".*"), proc_devices_group
            ):
                return True
        return False

    # Paths, and the groups /proc/devices lists them under (before and after driver 550).
    for node, group in [
        ("/dev/nvidiactl", "nvidiactl"),
        ("/dev/nvidiactl", "nvidia-frontend"),
        ("/dev/nvidia-uvm", "nvidia-uvm"),
        ("/dev/nvidia-uvm-tools", "nvidia-uvm"),
        ("/dev/nvidia0", "nvidia"),
        ("/dev/nvidia7", "nvidia-frontend"),
        ("/dev/nvidia-caps/nvidia-cap1", "nvidia-caps"),
        ("/dev/nvidia-nvswitch0", "nvidia-nvswitch"),
    ]:
        assert covers(node, group), f"{node} ({group}) is not allowed"
    assert covers("/dev/nvidiactl", "-") and covers("/dev/nvidia-uvm", "-")  # named as paths


# -- sysusers ------------------------------------------------------------------------------------


def test_sysusers_entry() -> None:
    lines = [
        line.split(maxsplit=1)
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["u", 'hive - "hive node agent" /var/lib/hive'] in lines
    members = {rest.split()[1] for kind, rest in lines if kind == "m" and rest.startswith("hive ")}
    assert members == set(one("SupplementaryGroups").split())


# -- the example configuration -------------------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.listen == "127.0.0.1:7070"
    assert config.default_backend == "vllm"
    vllm = config.backends["vllm"]
    assert vllm.gpu is True
    # PATH under systemd is the system's: vllm is found in the backend's own venv.
    assert vllm.venv is not None and vllm.venv.is_absolute() and vllm.command[0] == "vllm"
    assert vllm.load is not None and vllm.share_args
    assert "{model}" in vllm.command and "{port}" in vllm.command
    assert vllm.env["HF_HOME"].startswith("/var/lib/hive/")  # writable: the StateDirectory
    assert "demo" in config.backends  # built-ins stay
    assert config.routers == []  # the example router is commented out


def test_example_config_names_every_key() -> None:
    """Every key hive knows appears in the example, set or commented: it cannot drift."""
    text = EXAMPLE.read_text()

    def mentioned(key: str) -> bool:
        return re.search(rf"^[ \t]*(#[ \t]*)?{re.escape(key)}[ \t]*=", text, re.M) is not None

    top = [k for k in Config.model_fields if k not in ("backends", "routers", "fleet")]
    missing = [k for k in top + list(BackendConfig.model_fields) if not mentioned(k)]
    missing += [f"routers.{k}" for k in RouterConfig.model_fields if not mentioned(k)]
    missing += [f"fleet.{k}" for k in FleetConfig.model_fields if not mentioned(k)]
    assert re.search(r"^#\s*\[fleet\]", text, re.M)
    assert missing == [], f"keys missing from {EXAMPLE.name}: {missing}"
    assert "[backends.vllm]" in text
    assert re.search(r"^#\s*\[\[routers\]\]", text, re.M)


def test_example_commented_keys_are_valid_once_uncommented() -> None:
    """A commented top-level key sits above the first table, where uncommenting it works."""
    text = EXAMPLE.read_text()
    keys = [k for k in Config.model_fields if re.search(rf"^# {k} = ", text, re.M)]
    assert keys  # device_refresh, router_reconcile, ... until configuration.md has them
    for key in keys:
        # The TLS keys come as a pair (and a third that needs the pair): uncommented together.
        group = [k for k in keys if k.startswith("tls_")] if key.startswith("tls_") else [key]
        uncommented = text
        for name in group:
            uncommented = re.sub(rf"^# ({name} = )", r"\1", uncommented, flags=re.M)
        config = parse_config(uncommented, EXAMPLE)
        assert key in config.model_fields_set


def test_example_workers_are_valid_once_uncommented() -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("# -- Declared workers ----") :]
    uncommented = re.sub(r"^# ?(?=[\[a-z_]+ =|\[\[)", "", block, flags=re.M)
    config = parse_config(text + "\n" + uncommented, EXAMPLE)
    declared = parse_workers(config.workers, str(EXAMPLE), "config:")
    assert [item.spec.id for item in declared] == ["chat"]
    assert declared[0].spec.backend == "vllm"


def test_example_fleet_is_valid_once_uncommented() -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("# [fleet]") : text.index("# -- Declared workers ----")]
    config = parse_config(text + "\n" + re.sub(r"^# ?", "", block, flags=re.M), EXAMPLE)
    assert config.fleet is not None and config.fleet.node == "gpu-07"


def test_example_router_is_valid_once_uncommented() -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("# [[routers]]") : text.index("# -- Fleet ----")]
    uncommented = re.sub(r"^# ?", "", block, flags=re.M)
    config = parse_config(text + "\n" + uncommented, EXAMPLE)
    assert len(config.routers) == 1
    assert config.routers[0].kind == "sglang"
