"""Memory in ``GET /metrics``: what each worker reserves and peaked at, what workers may
reserve in total and hold now, and what measuring costs. Read at scrape time from the records
and the meter (:mod:`hive.workers.memory`), so it never drifts from them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hive.devices.host_memory import holds_memory
from hive.state.registry import Registry


class MemoryCollector(Collector):
    def __init__(
        self,
        registry: Registry,
        budget: Callable[[], int | None],
        cost: Callable[[], tuple[int, float]],
    ) -> None:
        self.registry = registry
        self.budget = budget
        #: Samples taken so far, and the seconds they took.
        self.cost = cost

    def collect(self) -> Iterator[Metric]:
        reserved = GaugeMetricFamily(
            "hive_worker_memory_reserved_mib",
            "Host memory reserved for the worker (declared, learned or estimated), while held.",
            labels=["worker", "source"],
        )
        gpu_reserved = GaugeMetricFamily(
            "hive_worker_gpu_memory_reserved_mib",
            "GPU memory reserved for the worker on each of its GPUs, while held.",
            labels=["worker", "source"],
        )
        peak = GaugeMetricFamily(
            "hive_worker_memory_peak_mib",
            "Peak host memory of the worker's tree in its current attempt.",
            labels=["worker"],
        )
        gpu_peak = GaugeMetricFamily(
            "hive_worker_gpu_memory_peak_mib",
            "Peak GPU memory of the worker's processes in its current attempt.",
            labels=["worker"],
        )
        held = 0
        for w in self.registry.list():
            source = w.memory_source or ""
            if holds_memory(w):
                if w.memory_mib is not None:
                    reserved.add_metric([w.id, source], w.memory_mib)
                    held += w.memory_mib
                if w.gpu_memory_mib is not None:
                    gpu_reserved.add_metric([w.id, source], w.gpu_memory_mib)
            if w.memory_peak_mib is not None:
                peak.add_metric([w.id], w.memory_peak_mib)
            if w.gpu_memory_peak_mib is not None:
                gpu_peak.add_metric([w.id], w.gpu_memory_peak_mib)
        yield from (reserved, gpu_reserved, peak, gpu_peak)
        budget = self.budget()
        if budget is not None:
            yield GaugeMetricFamily(
                "hive_host_memory_budget_mib",
                "Host memory workers may reserve in total (host_memory_mib).",
                value=budget,
            )
        yield GaugeMetricFamily(
            "hive_host_memory_reserved_mib",
            "Host memory workers hold reserved now.",
            value=held,
        )
        samples, seconds = self.cost()
        yield CounterMetricFamily(
            "hive_memory_samples", "Workers' memory peaks sampled so far.", value=samples
        )
        yield CounterMetricFamily(
            "hive_memory_sample_seconds",
            "Seconds hive spent sampling workers' memory peaks (in a thread).",
            value=seconds,
        )
