"""The scheduler's pass, as a pure function of the fleet's keys (hive.desired.scheduling over a
FleetView fed the keys a real fleet writes): placement spreads and respects labels, cordons and
room; a gone node's replicas move after reschedule_after and not before; a drain moves one
replica at a time and lets the old one go only once the new one serves; a rolling change goes
one replica at a time; a replica is never left on two nodes without a move that says why."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from hive.desired.deployments import Keys, parse_deployment, split_replica
from hive.desired.fleet_view import FleetView, NodeInfo
from hive.desired.placing import Candidate, Room, place_many
from hive.desired.scheduling import plan
from hive.errors import DeclarationError

KEYS = Keys("/hive")
ROUTER = "http://127.0.0.1:30000"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    """A FleetView fed keys as etcd would, and each plan's writes applied back."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.view = FleetView(KEYS, self.clock)
        self.revision = 1
        #: The kinds of the steps that wrote a replica onto a node (the metrics' reasons).
        self.kinds: Counter[str] = Counter()

    def put(self, key: str, value: Any) -> None:
        self.revision += 1
        self.view.put(key, json.dumps(value).encode(), self.revision)

    def delete(self, key: str) -> None:
        self.revision += 1
        self.view.delete(key, self.revision)

    def node(self, name: str, labels: dict[str, str] | None = None, cores: int = 8,
             gpus: int = 0, held: int = 0) -> None:  # fmt: skip
        """A node key as a hive publishes it; ``held``: GPUs its workers hold whole."""
        room = {
            "cores": [cores],
            "memory_mib": 64000,
            "gpus": [
                {"id": f"GPU-{i}", "healthy": True, "memory_total_mib": 80000,
                 "memory_free_mib": 0 if i < held else 80000, "whole": i >= held}
                for i in range(gpus)
            ],
        }  # fmt: skip
        self.put(KEYS.nodes + name, {"fleet": {
            "labels": labels or {}, "backends": {"demo": "optional", "vllm": True},
            "default_backend": "demo", "routers": [ROUTER], "room": room,
        }})  # fmt: skip

    def deploy(self, name: str, replicas: int, **spawn: Any) -> None:
        self.put(KEYS.deployment(name), {"name": name, "replicas": replicas, "model": "m", **spawn})

    def serve(self, node: str, worker_id: str, state: str = "ready") -> None:
        """``node`` publishes the worker as its desired key has it, ready and registered."""
        spec = self.view.replicas[node][worker_id].spec
        self.put(f"{KEYS.workers}{node}/{worker_id}", {
            "id": worker_id, "state": state, "labels": spec["labels"],
            "routers": {ROUTER: "registered"}, "replacement": None,
        })  # fmt: skip

    def step(self, reschedule_after: float = 10.0) -> list[str]:
        """One pass, its writes applied; what it did."""
        result = plan(self.view, reschedule_after)
        for step in result.steps:
            self.kinds.update([step.kind] if step.kind else [])
            self.revision += 1
            for kind, key, value in step.ops:
                if kind == "put":
                    assert value is not None
                    self.view.put(key, value.encode(), self.revision)
                else:
                    self.view.delete(key, self.revision)
        return [s.why for s in result.steps]

    def where(self) -> dict[str, set[str]]:
        return {k: set(v) for k, v in self.view.placed.items()}


def test_replicas_spread_one_per_node_and_respect_labels_and_cordons() -> None:
    fleet = Fleet()
    for name in ("n1", "n2", "n3"):
        fleet.node(name)
    fleet.deploy("chat", 3)
    fleet.step()
    assert sorted(n for nodes in fleet.where().values() for n in nodes) == ["n1", "n2", "n3"]
    assert fleet.step() == []  # nothing more to do

    fleet.node("g1", labels={"gpu": "a100"}, gpus=2)
    fleet.put(KEYS.cordon("n3"), {"drain": False})
    fleet.deploy("big", 3, backend="vllm", node_labels={"gpu": "a100"})
    fleet.step()
    big = {k: v for k, v in fleet.where().items() if k.startswith("big-")}
    assert set(big) == {"big-0", "big-1"}  # g1 has two GPUs: room for two whole ones
    assert all(nodes == {"g1"} for nodes in big.values())
    fleet.deploy("more", 4)
    fleet.step()
    more = [n for k, nodes in fleet.where().items() if k.startswith("more-") for n in nodes]
    assert "n3" not in more  # cordoned


def test_a_gone_node_is_healed_after_reschedule_after_not_before() -> None:
    fleet = Fleet()
    for name in ("n1", "n2", "n3"):
        fleet.node(name)
    fleet.deploy("chat", 3)
    fleet.step()
    lost = next(k for k, v in fleet.where().items() if v == {"n2"})
    fleet.delete(KEYS.nodes + "n2")
    fleet.clock.now += 9.9
    assert fleet.step(reschedule_after=10) == []
    fleet.clock.now += 0.2
    assert fleet.step(reschedule_after=10) == [f"{lost}: n2 is gone; placed on n1"]
    assert fleet.where()[lost] == {"n1"}  # the old key went in the same step
    fleet.node("n2")  # it comes back: nothing moves back, nothing is placed twice
    assert fleet.step() == []
    assert fleet.kinds == {"placed": 3, "healed": 1}


def test_drain_moves_one_at_a_time_and_the_old_leaves_once_the_new_serves() -> None:
    fleet = Fleet()
    for name in ("n1", "n2", "n3"):
        fleet.node(name)
    fleet.deploy("chat", 3)
    fleet.deploy("code", 3)
    fleet.step()
    on_n3 = sorted(k for k, v in fleet.where().items() if v == {"n3"})
    assert len(on_n3) == 2
    for worker_id, nodes in fleet.where().items():
        fleet.serve(next(iter(nodes)), worker_id)
    fleet.put(KEYS.cordon("n3"), {"drain": True})
    [why] = fleet.step()
    first = on_n3[0]
    assert why.startswith(f"{first}: n3 is drained: moving to ")
    target = fleet.view.moves[first].target
    assert fleet.where()[first] == {"n3", target}  # both, while the new one starts
    assert fleet.step() == []  # one at a time: the next waits, and the old one stays
    fleet.serve(target, first, state="starting")
    assert fleet.step() == []
    fleet.serve(target, first)
    assert fleet.step() == [f"{first}: serves on {target}; leaves n3"]
    assert fleet.where()[first] == {target} and first not in fleet.view.moves
    fleet.step()
    second = on_n3[1]
    assert second in fleet.view.moves
    fleet.serve(fleet.view.moves[second].target, second)
    fleet.step()
    assert not any("n3" in v for v in fleet.where().values())
    fleet.delete(KEYS.cordon("n3"))  # uncordoned: placements may go there again
    fleet.deploy("chat", 4)
    fleet.step()
    assert fleet.where()["chat-3"] == {"n3"}
    assert fleet.kinds == {"placed": 7, "drained": 2}  # a move's end places nothing


def test_a_move_whose_target_dies_stays_on_its_source() -> None:
    fleet = Fleet()
    for name in ("n1", "n2"):
        fleet.node(name)
    fleet.deploy("chat", 1)
    fleet.step()
    [source] = fleet.where()["chat-0"]
    fleet.put(KEYS.cordon(source), {"drain": True})
    fleet.step()
    target = fleet.view.moves["chat-0"].target
    fleet.delete(KEYS.nodes + target)
    assert fleet.step() == [f"chat-0: move to {target} ended: {target} is gone"]
    assert fleet.where()["chat-0"] == {source} and not fleet.view.moves


def test_a_rolling_change_replaces_one_replica_at_a_time() -> None:
    fleet = Fleet()
    for name in ("n1", "n2", "n3"):
        fleet.node(name)
    fleet.deploy("chat", 3)
    fleet.step()
    for worker_id, nodes in fleet.where().items():
        fleet.serve(next(iter(nodes)), worker_id)
    fleet.deploy("chat", 3, args=["--latency-ms", "5"])
    revision = fleet.view.deployments["chat"].revision
    for k in range(3):
        [why] = fleet.step()
        assert why.startswith(f"chat-{k}: rolled to revision {revision}")
        assert fleet.step() == []  # until it serves at the new revision
        [node] = fleet.where()[f"chat-{k}"]
        fleet.serve(node, f"chat-{k}")
    assert fleet.step() == []
    assert all(r.revision == revision for n in fleet.view.replicas.values() for r in n.values())
    assert fleet.kinds == {"placed": 3, "rolled": 3}


def test_a_rolling_change_with_no_room_beside_moves_the_replica() -> None:
    fleet = Fleet()
    for name in ("g1", "g2"):
        fleet.node(name, gpus=1)
    fleet.deploy("big", 1, backend="vllm")  # a whole GPU: no successor fits beside it
    fleet.step()
    [node] = fleet.where()["big-0"]
    other = "g2" if node == "g1" else "g1"
    fleet.serve(node, "big-0")
    fleet.node(node, gpus=1, held=1)  # as its hive publishes it, the GPU held
    fleet.deploy("big", 1, backend="vllm", args=["--new"])
    [why] = fleet.step()
    assert why.startswith("big-0: rolling to revision ") and f"no room beside it on {node}" in why
    assert fleet.view.moves["big-0"].target == other
    fleet.serve(other, "big-0")
    assert fleet.step() == [f"big-0: serves on {other}; leaves {node}"]
    assert fleet.where() == {"big-0": {other}}
    assert fleet.kinds == {"placed": 1, "rolled": 1}  # moved, for a rolling change


def test_scaling_down_undeploying_and_duplicates() -> None:
    fleet = Fleet()
    for name in ("n1", "n2"):
        fleet.node(name)
    fleet.deploy("chat", 3)
    fleet.step()
    fleet.deploy("chat", 1)
    fleet.step()
    assert set(fleet.where()) == {"chat-0"}
    # Written on a second node by someone else, with no move: one of them goes.
    [node] = fleet.where()["chat-0"]
    other = "n1" if node == "n2" else "n2"
    spec = fleet.view.replicas[node]["chat-0"].spec
    fleet.put(KEYS.desired_key(other, "chat-0"), spec)
    fleet.serve(other, "chat-0")
    [why] = fleet.step()
    assert why == f"chat-0: on 2 nodes; stays on {other}"  # the one that serves
    assert fleet.where() == {"chat-0": {other}}
    fleet.delete(KEYS.deployment("chat"))
    fleet.step()
    assert fleet.where() == {}


def test_a_bad_deployment_is_refused_and_its_replicas_left_alone() -> None:
    fleet = Fleet()
    fleet.node("n1")
    fleet.deploy("chat", 1)
    fleet.step()
    fleet.put(KEYS.deployment("chat"), {"name": "chat", "replicas": 1, "model": "m", "gpus": 0})
    assert fleet.step() == []
    assert fleet.where() == {"chat-0": {"n1"}}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"name": "Chat", "replicas": 1, "model": "m"}, "name: 'Chat' must be lower-case"),
        ({"name": "chat", "replicas": -1, "model": "m"}, "replicas: must be between 0"),
        ({"name": "chat", "replicas": True, "model": "m"}, "replicas: must be a whole number"),
        ({"name": "chat", "replicas": 1, "model": "m", "id": "x"}, "id: a deployment has none"),
        ({"name": "chat", "replicas": 1, "model": "m", "cpus": "x"}, "deployment 'chat': cpus:"),
        ({"name": "chat", "replicas": 1}, "deployment 'chat': model:"),
        ({"name": "chat", "replicas": 1, "model": "m", "node_labels": {"a": 1}}, "node_labels"),
    ],
)
def test_deployment_errors_name_the_field(data: dict[str, Any], error: str) -> None:
    with pytest.raises(DeclarationError, match=error):
        parse_deployment(data, "f.toml")


def test_replica_ids() -> None:
    assert split_replica("chat-2") == ("chat", 2)
    assert split_replica("a-1-10") == ("a-1", 10)
    assert split_replica("chat") is None and split_replica("chat-02") is None


def test_many_replicas_over_many_nodes_each_once_and_spread() -> None:
    info = NodeInfo(backends={"demo": "optional"}, default_backend="demo")
    room = {"cores": [8], "memory_mib": 1000, "gpus": []}
    nodes = {f"n{i:04d}": Candidate(f"n{i:04d}", info, Room(room)) for i in range(1000)}
    deployments = [
        parse_deployment({"name": f"d{j}", "replicas": 100, "model": "m"}, "t") for j in range(20)
    ]
    placed = place_many([(d, list(range(100))) for d in deployments], nodes)
    assert len(placed) == 2000
    assert len({(d.name, k) for d, k, _ in placed}) == 2000
    per_node: dict[str, int] = {}
    for _, _, node in placed:
        per_node[node] = per_node.get(node, 0) + 1
    assert max(per_node.values()) == 2 and len(per_node) == 1000


def test_a_node_publishes_stable_figures_and_its_room() -> None:
    from hive.config import Config, FleetConfig
    from hive.desired.node_doc import node_document
    from hive.models import Entry, SpawnRequest, State, Worker
    from hive.state.registry import now

    def holding(wid: str, spec: SpawnRequest, state: State = State.READY, **fields: Any) -> Entry:
        record = Worker(id=wid, model="m", backend="demo", device=fields.pop("device", "CPU-0"),
                        port=18000, url="u", state=state, created_at=now(), **fields)  # fmt: skip
        return Entry(record, spec, "t")

    value = {
        "hostname": "h",
        "workers": {"starting": 0, "ready": 1, "busy": 2, "stopped": 1},
        "devices": {
            "cpus": [{"id": "CPU-0", "cores": [0, 1, 2, 3], "memory_total_bytes": 8 << 30,
                      "memory_available_bytes": 123, "load": 0.7, "workers": []}],
            "gpus": [{"id": f"GPU-{i}", "uuid": f"u{i}", "memory_total_mib": 80000,
                      "memory_used_mib": 5, "temperature_c": 40, "healthy": True}
                     for i in range(3)],
            "gpu_error": None,
        },
    }  # fmt: skip
    entries = {
        "cores": holding("cores", SpawnRequest(model="m", cpus=2), cpus=[0, 1]),
        "whole": holding("whole", SpawnRequest(model="m", gpus=1), device="GPU-0", gpus=["u0"]),
        "share": holding("share", SpawnRequest(model="m", gpu_memory_mib=30000), gpus=["u1"]),
        "gone": holding("gone", SpawnRequest(model="m", gpus=1), State.STOPPED, gpus=["u2"]),
        "sized": holding("sized", SpawnRequest(model="m"), memory_mib=1500, memory_held=True),
        "exited": holding("exited", SpawnRequest(model="m"), State.STOPPED, memory_mib=700,
                          memory_held=True),  # its memory not back yet: still held
        "freed": holding("freed", SpawnRequest(model="m"), State.STOPPED, memory_mib=900),
    }  # fmt: skip
    fleet = FleetConfig(endpoints=["http://e"], labels={"zone": "b"})
    # The memory room is what the node admits: its budget (host_memory_mib, here 7,000 MiB of
    # the 8 GiB host) less what workers hold, as hive.devices.host_memory counts it.
    doc = node_document(value, entries, Config(), fleet, budget_mib=7000)
    assert doc["workers"] == {"starting": 0, "ready": 3, "stopped": 1}  # busy counts as ready
    assert "load" not in doc["devices"]["cpus"][0]
    assert "memory_available_bytes" not in doc["devices"]["cpus"][0]
    assert "memory_used_mib" not in doc["devices"]["gpus"][0]
    assert "temperature_c" not in doc["devices"]["gpus"][0]
    assert doc["fleet"]["labels"] == {"zone": "b"} and "demo" in doc["fleet"]["backends"]
    room = doc["fleet"]["room"]
    assert room["cores"] == [2] and room["memory_mib"] == 7000 - 1500 - 700
    unknown = node_document(value, entries, Config(), fleet, budget_mib=None)
    assert unknown["fleet"]["room"]["memory_mib"] is None  # not accounted: not checked
    assert [(g["memory_free_mib"], g["whole"]) for g in room["gpus"]] == [
        (0, False), (50000, False), (80000, True),
    ]  # fmt: skip
