"""InfLLM's per-step statistics (core/stats.py), where vLLM users look for them.

The builder counts every real step from its plan on the host (dummy runs are not counted) and
hands the counts here. They surface in two places:

* **Prometheus counters**, registered in the process that runs attention (vLLM's engine core):

      vllm:infllm_query_tokens_total         query tokens attended (once per step, not per layer)
      vllm:infllm_memory_query_tokens_total  of those, queries that attended >= 1 memory unit
      vllm:infllm_selected_units_total       memory units attended, summed over query tokens
      vllm:infllm_attended_keys_total        keys attended, summed over query tokens
      vllm:infllm_dense_keys_total           keys dense attention would have attended

  attended / dense keys is the share of the attention work InfLLM does; keys are counted per
  layer and KV head (every layer attends the same count). With offload on (adapter/offload.py):

      vllm:infllm_offload_pool_blocks        gauge: KV-pool blocks the running requests hold
      vllm:infllm_offload_store_units        gauge: memory units in the worker's store
      vllm:infllm_offload_store_bytes        gauge: bytes of those units (K/V and representatives)
      vllm:infllm_offloaded_units_total      units that left the pool for the store
      vllm:infllm_unit_reads_total           selected units read, summed over layers and chunks
      vllm:infllm_store_unit_reads_total     of those, units read from the store (the rest
                                             were in the pool: 1 - store / all is the pool
                                             cache's hit rate)

  ``LLM.get_metrics()`` shows them when the engine runs in the caller's process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; see `_register`). ``vllm serve``'s ``/metrics`` is served
  by the API-server process, which reads other processes' counters only in prometheus_client's
  multi-process mode: start the server with ``PROMETHEUS_MULTIPROC_DIR`` set to an empty
  directory (vLLM's own mode for several API servers) and they appear there.
* **A log line** beside vLLM's periodic stats (logger ``vllm.infllm``, every
  ``VLLM_LOG_STATS_INTERVAL`` seconds, 10 by default, with the first step after the interval,
  when InfLLM attended anything in it), e.g.::

      InfLLM: 5120 query tokens in 10.0 s, 62.5% read memory (4.0 units each); 2430 keys
      attended per query, 31.2% of dense attention's 7790

  and with offload on a second line, e.g.::

      InfLLM offload: 48 pool blocks held, 204 units in the store (1.13 GiB); 2 units left the
      pool; 16560 unit reads, 2.5% from the pool
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from ..core.stats import StepStats

logger = logging.getLogger("vllm.infllm")

_COUNTERS = {  # StepStats field -> (metric name, help)
    "queries": ("vllm:infllm_query_tokens", "Query tokens attended by InfLLM (once per step, not per layer)."),
    "memory_queries": ("vllm:infllm_memory_query_tokens", "Query tokens that attended at least one memory unit."),
    "units": ("vllm:infllm_selected_units", "Memory units attended, summed over query tokens."),
    "attended_keys": ("vllm:infllm_attended_keys", "Keys attended, summed over query tokens (per layer and KV head)."),
    "dense_keys": ("vllm:infllm_dense_keys", "Keys dense attention would attend, summed over query tokens."),
}
_OFFLOAD_GAUGES = {  # OffloadStats field -> (metric name, help)
    "pool_blocks": ("vllm:infllm_offload_pool_blocks", "KV-pool blocks held by the running requests (offload)."),
    "store_units": ("vllm:infllm_offload_store_units", "Memory units in the worker's offload store."),
    "store_bytes": ("vllm:infllm_offload_store_bytes", "Bytes of the memory units in the offload store."),
}
_OFFLOAD_COUNTERS = {
    "units_offloaded": ("vllm:infllm_offloaded_units", "Memory units that left the KV pool for the store."),
    "unit_reads": ("vllm:infllm_unit_reads", "Selected memory units read, summed over layers and chunks."),
    "store_reads": ("vllm:infllm_store_unit_reads", "Selected memory units read from the offload store."),
}
_prometheus: dict | None = None  # field -> Counter or Gauge, created once per process


def _counters() -> dict:
    global _prometheus
    if _prometheus is None:
        from prometheus_client import Counter, Gauge  # a vLLM dependency

        _prometheus = {f: Counter(name, doc, labelnames=["model_name"]) for f, (name, doc) in _COUNTERS.items()}
        _prometheus |= {"offload." + f: Counter(name, doc, labelnames=["model_name"])
                        for f, (name, doc) in _OFFLOAD_COUNTERS.items()}
        _prometheus |= {"offload." + f: Gauge(name, doc, labelnames=["model_name"], multiprocess_mode="mostrecent")
                        for f, (name, doc) in _OFFLOAD_GAUGES.items()}
    return _prometheus


def _register() -> None:
    """Put the collectors (back) in prometheus_client's registry. vLLM's Prometheus logger
    unregisters every "vllm:" collector when it starts (`unregister_vllm_metrics`), and with an
    in-process engine core (LLM with VLLM_ENABLE_V1_MULTIPROCESSING=0) it starts after our
    builder made them: so each InfLLMMetrics registers them again at its first real step, which
    comes after the engine, and its logger, exist."""
    from prometheus_client import REGISTRY

    for collector in _counters().values():
        try:
            REGISTRY.register(collector)
        except ValueError:  # still registered (e.g. the engine core runs in its own process)
            pass


@dataclasses.dataclass
class OffloadStats:
    """The offload store's state (gauges) and running totals (counters), adapter/offload.py."""

    pool_blocks: int = 0  # KV-pool blocks the running InfLLM requests hold
    store_units: int = 0  # memory units in the store
    store_bytes: int = 0  # bytes of those units
    units_offloaded: int = 0  # units that ever left the pool
    unit_reads: int = 0  # selected units read (per layer and selection chunk)
    store_reads: int = 0  # of those, read from the store


def _log_interval_s() -> float:
    try:
        value = float(os.environ.get("VLLM_LOG_STATS_INTERVAL", "10"))
    except ValueError:
        value = 10.0
    return value if value > 0 else 10.0  # as vLLM reads it


class InfLLMMetrics:
    """Counts of one engine's steps: exported to Prometheus as they come, logged per interval."""

    def __init__(self, model_name: str, log_interval_s: float | None = None) -> None:
        self.model_name = model_name
        self.interval_s = _log_interval_s() if log_interval_s is None else log_interval_s
        self.total = StepStats()
        self._window = StepStats()
        self._window_start = time.monotonic()
        self._labelled = {f: c.labels(model_name=model_name) for f, c in _counters().items()}
        self.offload: OffloadStats | None = None  # the last snapshot recorded
        self._window_offload = OffloadStats()  # the snapshot at the window's start
        self._registered = False

    def record(self, stats: StepStats, offload: OffloadStats | None = None) -> None:
        """One step's counts, and with offload on the store's snapshot (running totals)."""
        if not stats.queries:
            return
        if not self._registered:
            _register()
            self._registered = True
        self.total += stats
        self._window += stats
        for f in _COUNTERS:
            self._labelled[f].inc(getattr(stats, f))
        if offload is not None:
            last = self.offload or OffloadStats()
            for f in _OFFLOAD_COUNTERS:
                self._labelled["offload." + f].inc(max(0, getattr(offload, f) - getattr(last, f)))
            for f in _OFFLOAD_GAUGES:
                self._labelled["offload." + f].set(getattr(offload, f))
            self.offload = offload
        now = time.monotonic()
        if now - self._window_start >= self.interval_s:
            logger.info("%s", self.summary(self._window, now - self._window_start))
            if self.offload is not None:
                logger.info("%s", self.offload_summary(self.offload, self._window_offload))
                self._window_offload = self.offload
            self._window, self._window_start = StepStats(), now

    @staticmethod
    def offload_summary(now: OffloadStats, start: OffloadStats) -> str:
        """The store now, and what moved since `start` (the window's first snapshot)."""
        reads = now.unit_reads - start.unit_reads
        pool = reads - (now.store_reads - start.store_reads)
        hit = f", {100.0 * pool / reads:.1f}% from the pool" if reads else ""
        return (
            f"InfLLM offload: {now.pool_blocks} pool blocks held, {now.store_units} units in the store "
            f"({now.store_bytes / 2**30:.2f} GiB); {now.units_offloaded - start.units_offloaded} units left "
            f"the pool; {reads} unit reads{hit}"
        )

    @staticmethod
    def summary(s: StepStats, seconds: float) -> str:
        q = max(1, s.queries)
        units = s.units / s.memory_queries if s.memory_queries else 0.0
        share = 100.0 * s.attended_keys / s.dense_keys if s.dense_keys else 100.0
        return (
            f"InfLLM: {s.queries} query tokens in {seconds:.1f} s, {100.0 * s.memory_queries / q:.1f}% read memory "
            f"({units:.1f} units each); {s.attended_keys / q:.0f} keys attended per query, {share:.1f}% of dense "
            f"attention's {s.dense_keys / q:.0f}"
        )
