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
  layer and KV head (every layer attends the same count). ``LLM.get_metrics()`` shows them when
  the engine runs in the caller's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). ``vllm serve``'s
  ``/metrics`` is served by the API-server process, which reads other processes' counters only
  in prometheus_client's multi-process mode: start the server with ``PROMETHEUS_MULTIPROC_DIR``
  set to an empty directory (vLLM's own mode for several API servers) and they appear there.
* **A log line** beside vLLM's periodic stats (logger ``vllm.infllm``, every
  ``VLLM_LOG_STATS_INTERVAL`` seconds, 10 by default, with the first step after the interval,
  when InfLLM attended anything in it), e.g.::

      InfLLM: 5120 query tokens in 10.0 s, 62.5% read memory (4.0 units each); 2430 keys
      attended per query, 31.2% of dense attention's 7790
"""

from __future__ import annotations

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
_prometheus: dict | None = None  # field -> Counter, created once per process


def _counters() -> dict:
    global _prometheus
    if _prometheus is None:
        from prometheus_client import Counter  # a vLLM dependency

        _prometheus = {f: Counter(name, doc, labelnames=["model_name"]) for f, (name, doc) in _COUNTERS.items()}
    return _prometheus


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

    def record(self, stats: StepStats) -> None:
        if not stats.queries:
            return
        self.total += stats
        self._window += stats
        for f, counter in self._labelled.items():
            counter.inc(getattr(stats, f))
        now = time.monotonic()
        if now - self._window_start >= self.interval_s:
            logger.info("%s", self.summary(self._window, now - self._window_start))
            self._window, self._window_start = StepStats(), now

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
