"""What a step's attention did, counted from its plan on the host: no device reads.

For every query of a step the plan (``plan.py``) knows its position p, and its selection
chunk's candidate count K (the memory units that end at or before the window of the position
where the chunk's selection was made). The semantics (docs/design.md section 2; the oracle's
loop) then fix what the query attends:

    init       min(n_init, w(p))                 tokens
    units      min(topk, K) memory units         of block_size tokens each (per KV head)
    remainder  max(0, w(p) - R0), R0 = n_init + K * block_size
    local      p - w(p) + 1                      (w(p) = max(0, p - n_local + 1))

against p + 1 keys for dense attention. A query "reads memory" when it attends at least one
memory unit. These are the per-step statistics the adapter exports (adapter/metrics.py).
"""

from __future__ import annotations

import dataclasses

from .config import InfLLMConfig
from .plan import StepPlan


@dataclasses.dataclass
class StepStats:
    queries: int = 0  # query tokens attended
    memory_queries: int = 0  # of those, queries that attend at least one memory unit
    units: int = 0  # memory units attended, summed over queries (per KV head: the same count)
    attended_keys: int = 0  # keys attended, summed over queries (per KV head)
    dense_keys: int = 0  # keys dense attention would attend: sum of p + 1

    def __iadd__(self, other: StepStats) -> StepStats:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


def _ramp(t: int, a: int, b: int) -> int:
    """sum of max(0, p - t) over p in [a, b)."""
    lo = max(a, t + 1)
    if lo >= b:
        return 0
    n = b - lo
    return n * (lo - t) + n * (n - 1) // 2


def chunk_stats(c0: int, length: int, num_cand: int, config: InfLLMConfig) -> StepStats:
    """The counts of one selection chunk's `length` queries at positions c0.. with K = num_cand."""
    if length <= 0:
        return StepStats()
    a, b = c0, c0 + length
    units = min(config.topk, num_cand)
    dense = (b * (b + 1) - a * (a + 1)) // 2  # sum of p + 1
    # Dense minus the keys in [n_init, R0) outside the window, plus the attended units:
    # min(n_init, w) + max(0, w - R0) + (p - w + 1) = p + 1 - max(0, w - n_init) + max(0, w - R0),
    # and max(0, w(p) - x) = max(0, p - (n_local - 1) - x) for x >= 0.
    edge = config.n_local - 1
    r0 = config.n_init + num_cand * config.block_size
    attended = dense - _ramp(edge + config.n_init, a, b) + _ramp(edge + r0, a, b) + length * units * config.block_size
    return StepStats(
        queries=length,
        memory_queries=length if units > 0 else 0,
        units=length * units,
        attended_keys=attended,
        dense_keys=dense,
    )


def step_stats(plan: StepPlan, config: InfLLMConfig) -> StepStats:
    """The counts of every query of a step (padding rows of a static decode plan count nothing)."""
    total = StepStats()
    for wave in plan.waves:
        h = wave.host
        for c0, length, num_cand in zip(h["c0"], h["length"], h["num_cand"], strict=True):
            total += chunk_stats(c0, length, num_cand, config)
    return total
