"""The shipped Prometheus rules and Grafana dashboard, against the real ``promtool`` and a real
Prometheus server scraping a live hive (with its token): the rules load, the metrics lint
clean, a query answers about the workers, and a failed worker raises the alert."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hivetest import TAG, Hive, running_hive

from harness.net import free_port
from harness.procs import kill_tree
from harness.waits import async_wait_for, wait_for

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("promtool") is None or shutil.which("prometheus") is None,
        reason="prometheus is not installed (apt-get install prometheus)",
    ),
]

MONITORING = Path(__file__).resolve().parents[2] / "systemd" / "monitoring"
RULES = MONITORING / "hive.rules.yml"
DASHBOARD = MONITORING / "hive.dashboard.json"


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive("usage_refresh = 0.5\n") as daemon:
        yield daemon


class Prometheus:
    """A Prometheus server scraping one hive every 0.5 s, with the shipped rules."""

    def __init__(self, hive: Hive) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="hive-prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        token = self.home / "token"
        token.write_text(hive.token)
        (self.home / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n"
            f"rule_files: ['{RULES}']\n"
            "scrape_configs:\n"
            "  - job_name: hive\n"
            "    authorization:\n"
            f"      credentials_file: {token}\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{hive.port}']}}]\n"
        )
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.home / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.home / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            env={**os.environ, **TAG.env},
            stdout=subprocess.DEVNULL,
            stderr=(self.home / "log").open("w"),
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        body = r.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def get(self, path: str) -> Any:
        return requests.get(f"{self.url}{path}", timeout=5).json()["data"]

    def up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {(self.home / 'log').read_text()}")
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        kill_tree(self.proc, 20.0)
        shutil.rmtree(self.home, ignore_errors=True)


def test_promtool_checks_the_shipped_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


async def test_live_metrics_lint_clean_and_the_dashboard_names_only_real_ones(hive: Hive) -> None:
    await hive.spawn({"model": "m", "id": "lint-a"}, wait=True)
    try:
        async with hive.http().get("/metrics") as r:
            text = await r.text()
        # A hive with [fleet] (its etcd away: the families are there all the same) has the
        # fleet's and the scheduler's.
        with running_hive(f'[fleet]\nendpoints = ["http://127.0.0.1:{free_port()}"]\n') as fleet:
            try:
                async with fleet.http().get("/metrics") as r:
                    fleet_text = await r.text()
            finally:
                await fleet.close_http()
        assert "hive_scheduler_leader 0.0" in fleet_text
        for scraped in (text, fleet_text):
            result = subprocess.run(
                ["promtool", "check", "metrics"], input=scraped, capture_output=True, text=True
            )
            assert result.returncode == 0, result.stdout + result.stderr
        # Every family hive has, with or without samples now (no GPU, no router here).
        families = set(re.findall(r"^# TYPE (hive_[a-z_]+) ", text + fleet_text, re.M))
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        assert len(exprs) >= 10
        for source in [*exprs, RULES.read_text()]:
            for name in re.findall(r"\b(hive_[a-z_]+)", source):
                family = re.sub(r"_(total|bucket|count|sum)$", "", name)
                assert name in families or family in families, f"hive exports no {name}"
    finally:
        await hive.call("DELETE", "/v1/workers/lint-a")
        await hive.close_http()


async def test_prometheus_scrapes_hive_and_a_failed_worker_raises_the_alert(hive: Hive) -> None:
    prometheus = Prometheus(hive)
    try:
        wait_for(prometheus.up, timeout=60, what="prometheus ready")
        a = await hive.spawn({"model": "m", "id": "prom-a", "restart": "no"}, wait=True)
        await hive.spawn({"model": "m", "id": "prom-b", "restart": "no"}, wait=True)

        def ready_workers() -> float | None:
            result = prometheus.query('hive_workers{job="hive",state="ready"}')
            return float(result[0]["value"][1]) if result else None

        await async_wait_for(lambda: ready_workers() == 2, timeout=60, what="2 ready in Prometheus")
        up = prometheus.query('hive_worker_up{worker="prom-a"}')
        assert up and up[0]["value"][1] == "1"
        groups = prometheus.get("/api/v1/rules")["groups"]
        assert [g["name"] for g in groups] == ["hive"]
        assert all(rule["health"] == "ok" for rule in groups[0]["rules"])

        os.kill(a["pid"], signal.SIGKILL)

        def alerting() -> list[dict[str, Any]]:
            return [
                alert
                for alert in prometheus.get("/api/v1/alerts")["alerts"]
                if alert["labels"]["alertname"] == "HiveWorkerFailed"
            ]

        alerts = await async_wait_for(alerting, timeout=60, what="the HiveWorkerFailed alert")
        assert alerts[0]["state"] in ("pending", "firing")
        assert alerts[0]["labels"]["instance"] == f"127.0.0.1:{hive.port}"
    finally:
        prometheus.close()
        for worker_id in ("prom-a", "prom-b"):
            await hive.call("DELETE", f"/v1/workers/{worker_id}", ok=(200, 404))
        await hive.close_http()
