"""One scheduling pass: from the fleet's picture (:class:`FleetView`) to the writes that bring
it closer to what the deployments want. Pure: the scheduler carries the steps out, each in one
etcd transaction fenced on its election (several steps may share one).

In order, each replica in at most one step a pass:

1. **Keys that must go.** Replicas of a deployment that is gone, or beyond its ``replicas``; a
   replica on two nodes with no move that says why (the one that serves stays).
2. **Moves under way** (drain, labels): the replica's key is on both nodes and
   ``moves/<id>`` names them. Once the target serves it (ready at the deployment's revision and
   registered with each of the target's routers), the source's key and the move go, in one
   transaction: the source's hive then takes its worker out of the routers, drains and stops
   it. A target that is gone ends the move (its key goes; the source keeps the replica); a source
   gone longer than ``reschedule_after`` ends it the other way.
3. **Healing.** The replicas of a node gone longer than ``reschedule_after``: each key is moved
   to another node in one transaction (the old key deleted, the new one written).
4. **Placement.** Replicas with no key anywhere are placed (hive.desired.placing).
5. **Drains, one replica at a time per node**, and replicas on nodes whose labels no longer
   match, one at a time per deployment: the key is written on the target and the move recorded;
   the source's key stays until step 2 sees the target serve.
6. **Rolling changes, one replica at a time per deployment**: when no replica of it is on its way
   (written at the current revision, on a node that is up, not yet serving), one whose key is at
   an older revision gets the current one; its node replaces the worker without a gap (a
   successor beside it, ready and registered before the old one leaves). Where its node has no
   room for the successor beside it (a model that fills its GPUs), the replica is moved instead,
   as in 5, to a node that has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hive.desired.deployments import Deployment, replica_id, split_replica
from hive.desired.fleet_view import FleetView, Replica
from hive.desired.placing import Candidate, Room, choose, need, place_many

#: ("put", key, value) or ("delete", key, None).
Op = tuple[str, str, str | None]
#: Why a step writes a replica onto a node: a new replica (4), its node gone (3), its node
#: drained or its labels changed (5), a rolling change (6, in place or moved).
PLACEMENTS = ("placed", "healed", "drained", "relabelled", "rolled")


@dataclass
class Step:
    ops: list[Op]
    why: str
    #: One of many like it (a placement): logged as a count, not one line each.
    quiet: bool = False
    #: A step that writes a replica onto a node says why (:data:`PLACEMENTS`); others: "".
    kind: str = ""


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    #: Replicas that no node can take now.
    unplaced: list[str] = field(default_factory=list)


def _dump(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def candidates(view: FleetView) -> dict[str, Candidate]:
    """The nodes that may take replicas (up, not cordoned, saying what room they have), with
    what they hold: their replicas counted, and the room of those they have not started yet
    taken (a node's published room counts its workers only)."""
    found: dict[str, Candidate] = {}
    for name, info in view.nodes.items():
        if name not in view.cordoned and info.room is not None:
            found[name] = Candidate(name, info, Room(info.room))
    for node, replicas in view.replicas.items():
        candidate = found.get(node)
        if candidate is None:
            continue
        started = view.workers.get(node, {})
        for worker_id, replica in replicas.items():
            candidate.count[replica.deployment] += 1
            candidate.total += 1
            if worker_id not in started and (wanted := need(replica.spec, candidate.info)):
                candidate.room.take(wanted)
    return found


class Planner:
    """One pass over ``view`` (see the module's text)."""

    def __init__(self, view: FleetView, reschedule_after: float) -> None:
        self.view = view
        self.keys = view.keys
        self.reschedule_after = reschedule_after
        self.plan = Plan()
        self.busy: set[str] = set()
        #: Deployments with a step in this pass: no rolling change for them until the next.
        self.touched: set[str] = set()
        self._candidates: dict[str, Candidate] | None = None

    @property
    def candidates(self) -> dict[str, Candidate]:
        """The nodes that may take replicas, built when a step first needs one: a pass with
        nothing to place reads no node's room."""
        if self._candidates is None:
            self._candidates = candidates(self.view)
        return self._candidates

    def run(self) -> Plan:
        self._remove()
        self._moves()
        self._heal()
        self._place()
        self._drain()
        self._roll()
        return self.plan

    # -- helpers ---------------------------------------------------------------------------------

    def _step(
        self, worker_id: str, ops: list[Op], why: str, quiet: bool = False, kind: str = ""
    ) -> None:
        self.busy.add(worker_id)
        self.touched.add(worker_id.rpartition("-")[0])
        self.plan.steps.append(Step(ops, f"{worker_id}: {why}", quiet, kind))

    def _put(self, node: str, deployment: Deployment, k: int) -> Op:
        return ("put", self.keys.desired_key(node, replica_id(deployment.name, k)),
                _dump(deployment.desired(k)))  # fmt: skip

    def _delete(self, node: str, worker_id: str) -> Op:
        return ("delete", self.keys.desired_key(node, worker_id), None)

    def _gone_long(self, node: str) -> bool:
        gone = self.view.gone_for(node)
        return gone is not None and gone >= self.reschedule_after

    def _free(self, worker_id: str) -> bool:
        return worker_id not in self.busy and worker_id not in self.view.moves

    def _end_move(self, worker_id: str) -> Op:
        return ("delete", self.keys.move(worker_id), None)

    def _moving(self) -> set[str]:
        """Deployments with a replica being moved."""
        return {worker_id.rpartition("-")[0] for worker_id in self.view.moves}

    # -- 1. keys that must go --------------------------------------------------------------------

    def _remove(self) -> None:
        view = self.view
        for worker_id, nodes in sorted(view.placed.items()):
            name, k = split_replica(worker_id) or ("", 0)
            if view.refused(name):
                continue  # a deployment that does not parse: its replicas stay as they are
            deployment = view.deployments.get(name)
            move = view.moves.get(worker_id)
            drop_move = [self._end_move(worker_id)] if move else []
            if deployment is None or k >= deployment.replicas:
                why = "undeployed" if deployment is None else "scaled down"
                ops = [self._delete(n, worker_id) for n in sorted(nodes)]
                self._step(worker_id, ops + drop_move, why)
            elif len(nodes) > 1 and not (move and {move.source, move.target} == nodes):
                keep = self._keeper(worker_id, nodes)
                ops = [self._delete(n, worker_id) for n in sorted(nodes) if n != keep]
                self._step(worker_id, ops + drop_move, f"on {len(nodes)} nodes; stays on {keep}")
        for worker_id, move in sorted(view.moves.items()):
            if worker_id not in self.busy and view.placed.get(worker_id) != {
                move.source,
                move.target,
            }:
                self._step(worker_id, [self._end_move(worker_id)], "stale move")

    def _keeper(self, worker_id: str, nodes: set[str]) -> str:
        def rank(node: str) -> tuple[bool, bool, str]:
            replica = self.view.replicas[node][worker_id]
            return (not self.view.serving(node, replica), node not in self.view.nodes, node)

        return min(nodes, key=rank)

    # -- 2. moves under way ----------------------------------------------------------------------

    def _moves(self) -> None:
        view = self.view
        for worker_id, move in sorted(view.moves.items()):
            if worker_id in self.busy:
                continue
            target = view.replicas[move.target][worker_id]
            done = [self._delete(move.source, worker_id), self._end_move(worker_id)]
            if view.gone_for(move.target) is not None:
                ops = [self._delete(move.target, worker_id), self._end_move(worker_id)]
                self._step(worker_id, ops, f"move to {move.target} ended: {move.target} is gone")
            elif view.serving(move.target, target):
                self._step(worker_id, done, f"serves on {move.target}; leaves {move.source}")
            elif self._gone_long(move.source):
                self._step(worker_id, done, f"{move.source} is gone; stays on {move.target}")

    # -- 3. healing ------------------------------------------------------------------------------

    def _heal(self) -> None:
        view = self.view
        for node in sorted(view.replicas):
            if not self._gone_long(node):
                continue
            for worker_id, replica in sorted(view.replicas[node].items()):
                deployment = view.deployments.get(replica.deployment)
                if deployment is None or not self._free(worker_id):
                    continue
                target = choose(deployment, self.candidates, view.placed.get(worker_id, ()))
                if target is None:
                    self.plan.unplaced.append(worker_id)
                    continue
                ops = [self._delete(node, worker_id), self._put(target, deployment, replica.k)]
                self._step(worker_id, ops, f"{node} is gone; placed on {target}", kind="healed")

    # -- 4. placement ----------------------------------------------------------------------------

    def _place(self) -> None:
        view = self.view
        wanted = []
        for deployment in view.deployments.values():
            ks = [
                k
                for k in range(deployment.replicas)
                if replica_id(deployment.name, k) not in view.placed
                and replica_id(deployment.name, k) not in self.busy
            ]
            if ks:
                wanted.append((deployment, ks))
        if not wanted:
            return
        done: set[str] = set()
        for deployment, k, node in place_many(wanted, self.candidates):
            worker_id = replica_id(deployment.name, k)
            done.add(worker_id)
            self._step(
                worker_id, [self._put(node, deployment, k)], f"placed on {node}", True, "placed"
            )
        for deployment, ks in wanted:
            self.plan.unplaced += [
                rid for k in ks if (rid := replica_id(deployment.name, k)) not in done
            ]

    # -- 5. drains and labels --------------------------------------------------------------------

    def _drain(self) -> None:
        view = self.view
        sources = {move.source for move in view.moves.values()}
        moving = self._moving()
        for node, drain in sorted(view.cordoned.items()):
            if not drain or node in sources or node not in view.nodes:
                continue
            for worker_id, replica in sorted(view.replicas.get(node, {}).items()):
                if self._start_move(worker_id, replica, f"{node} is drained", "drained"):
                    sources.add(node)
                    moving.add(replica.deployment)
                    break
        for node, replicas in sorted(view.replicas.items()):
            info = view.nodes.get(node)
            if info is None:
                continue
            for worker_id, replica in sorted(replicas.items()):
                deployment = view.deployments.get(replica.deployment)
                if deployment is None or deployment.name in moving:
                    continue
                why = f"{node} no longer has the labels {deployment.node_labels}"
                if not deployment.matches(info.labels) and self._start_move(
                    worker_id, replica, why, "relabelled"
                ):
                    moving.add(deployment.name)

    def _start_move(
        self,
        worker_id: str,
        replica: Replica,
        why: str,
        kind: str,
        quiet_if_unplaced: bool = False,
    ) -> bool:
        deployment = self.view.deployments.get(replica.deployment)
        if deployment is None or not self._free(worker_id):
            return False
        target = choose(deployment, self.candidates, self.view.placed.get(worker_id, ()))
        if target is None:
            if not quiet_if_unplaced:
                self.plan.unplaced.append(worker_id)
            return False
        move = _dump({"from": replica.node, "to": target})
        ops: list[Op] = [self._put(target, deployment, replica.k),
                         ("put", self.keys.move(worker_id), move)]  # fmt: skip
        self._step(worker_id, ops, f"{why}: moving to {target}, which starts it first", kind=kind)
        return True

    # -- 6. rolling changes ----------------------------------------------------------------------

    def _roll(self) -> None:
        view = self.view
        moving = self._moving() | self.touched
        by_deployment: dict[str, list[Replica]] = {}
        for node, replicas in view.replicas.items():
            if node not in view.nodes:
                continue
            for replica in replicas.values():
                by_deployment.setdefault(replica.deployment, []).append(replica)
        for name, replicas in sorted(by_deployment.items()):
            deployment = view.deployments.get(name)
            if deployment is None or name in moving:
                continue
            revision = deployment.revision
            current = [r for r in replicas if r.revision == revision and r.k < deployment.replicas]
            if any(not view.serving(r.node, r) for r in current):
                continue  # one on its way: wait for it
            stale = [
                r
                for r in replicas
                if r.revision != revision and r.k < deployment.replicas and self._free(r.id)
            ]
            if stale:
                self._roll_one(deployment, min(stale, key=lambda r: r.k))

    def _roll_one(self, deployment: Deployment, replica: Replica) -> None:
        """In place when its node has room for a successor beside it; else moved to a node
        that has (the new one serving before the old leaves); else in place all the same (the
        node then says why it cannot)."""
        here = self.candidates.get(replica.node)
        if here is None or not here.takes(deployment):
            why = f"rolling to revision {deployment.revision}: no room beside it on {replica.node}"
            if self._start_move(replica.id, replica, why, "rolled", quiet_if_unplaced=True):
                return
        why = f"rolled to revision {deployment.revision} on {replica.node}"
        self._step(replica.id, [self._put(replica.node, deployment, replica.k)], why, kind="rolled")


def plan(view: FleetView, reschedule_after: float) -> Plan:
    return Planner(view, reschedule_after).run()
