"""The InfLLM runtime: one layer's attention over a paged KV cache for a varlen batch.

vLLM-free. The vLLM adapter (backend.py) turns its metadata into a `StepPlan` once per step
(shared by all layers) and calls `infllm_forward` per layer; tests drive the same code directly.

Data model (DESIGN §3):
  kv_cache     [num_blocks, Hkv, block_size, 2*D]  K then V, post-RoPE keys, any strides
  block_table  [num_reqs, max_blocks]              physical block of each logical block
  LayerMemory  per physical block: fp32 representative scores, representative keys, sealed flag

A step is cut into selection chunks (DESIGN §2). Chunks of one request depend on each other
(a later chunk may seal a unit an earlier chunk scored), chunks of different requests do not,
so the plan groups them in *waves*: wave i holds the i-th chunk of every request. Each wave is
seal -> select -> attend; the ops are batched over the wave's chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence

import torch

from .config import InfLLMConfig


@dataclasses.dataclass
class LayerMemory:
    """Per-physical-block side state of one layer (reset when a block is rewritten from offset 0).

    reprs:  [num_blocks, Hq, D]   representative keys (raw, un-rotated), one per query head
    scores: [num_blocks, Hq, B]   fp32 sum of softmax mass each token received inside local windows
    sealed: [num_blocks] bool     representatives computed (the unit became a candidate)
    """

    reprs: torch.Tensor
    scores: torch.Tensor
    sealed: torch.Tensor

    @classmethod
    def allocate(cls, num_blocks, num_q_heads, head_dim, block_size, dtype, device) -> LayerMemory:
        return cls(
            reprs=torch.zeros(num_blocks, num_q_heads, head_dim, dtype=dtype, device=device),
            scores=torch.zeros(num_blocks, num_q_heads, block_size, dtype=torch.float32, device=device),
            sealed=torch.zeros(num_blocks, dtype=torch.bool, device=device),
        )


@dataclasses.dataclass
class ChunkBatch:
    """The selection chunks of one wave (at most one per request).

    Device tensors (int64, [n]): req (block-table row), c0 (absolute position of the first
    query), length (queries), q0 (row of the first query in the packed query tensor),
    num_cand (candidate units K). The same values as Python lists in `host` let the torch path
    tile work without reading device memory; `max_len`/`max_cand` size padded buffers.
    """

    req: torch.Tensor
    c0: torch.Tensor
    length: torch.Tensor
    q0: torch.Tensor
    num_cand: torch.Tensor
    host: dict[str, list[int]]
    max_len: int
    max_cand: int
    # Layer-independent index work (positions, masks, block ids, RoPE rows) that the ops
    # compute at the first layer of a step and reuse at the others: the plan is shared.
    scratch: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.host["req"])


@dataclasses.dataclass
class StepPlan:
    waves: list[ChunkBatch]
    num_tokens: int  # query rows covered (rows beyond are padding)


def plan_step(
    query_start_loc: Sequence[int], seq_lens: Sequence[int], config: InfLLMConfig, device=None
) -> StepPlan:
    """Cut a step into selection chunks and group them in waves. Host-side, once per step.

    Request r owns query rows [query_start_loc[r], query_start_loc[r+1]) at positions
    seq_lens[r] - query_len + i. Prefill spans are cut at absolute multiples of `chunk`;
    a one-token query (decode) is a chunk of its own, and so is the last query of every
    step. That query produces the next token when the step ends the prompt; a selection by
    the mean of up to `chunk` filler queries would hide from it what it is asked about (the
    original InfLLM likewise feeds the last prompt token alone). Selection chunks are thus
    cut at step starts, at multiples of `chunk`, and before each step's last query.
    """
    qsl = [int(x) for x in query_start_loc]
    lens = [int(x) for x in seq_lens]
    per_req: list[list[tuple[int, int, int, int, int]]] = []
    for r in range(len(lens)):
        n_q = qsl[r + 1] - qsl[r]
        start = lens[r] - n_q
        if n_q <= 0:
            per_req.append([])
            continue
        if start < 0:
            raise ValueError(f"request {r}: {n_q} query tokens but seq_len {lens[r]}")
        chunks = []
        c0, end = start, start + n_q
        while c0 < end:
            c1 = min(end, (c0 // config.chunk + 1) * config.chunk)
            if c1 == end and c0 < end - 1:
                c1 = end - 1  # the step's last query selects alone (see plan_step's doc)
            chunks.append((r, c0, c1 - c0, qsl[r] + (c0 - start), config.num_candidates(c0)))
            c0 = c1
        per_req.append(chunks)

    waves = []
    for i in range(max((len(c) for c in per_req), default=0)):
        rows = [c[i] for c in per_req if len(c) > i]
        host = {k: [row[j] for row in rows] for j, k in enumerate(("req", "c0", "length", "q0", "num_cand"))}
        t = {k: torch.tensor(v, dtype=torch.int64, device=device) for k, v in host.items()}
        waves.append(
            ChunkBatch(**t, host=host, max_len=max(host["length"]), max_cand=max(host["num_cand"]))
        )
    return StepPlan(waves=waves, num_tokens=qsl[-1] if qsl else 0)


def infllm_forward(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    plan: StepPlan,
    memory: LayerMemory,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: InfLLMConfig,
    scale: float,
    out: torch.Tensor,
    ops=None,
) -> torch.Tensor:
    """InfLLM attention of one layer. `query` [T, Hq, D] is post-RoPE; K/V are already in the cache.

    Writes `out[:plan.num_tokens]` and updates `memory` (scores, sealing).
    """
    if ops is None:
        from . import ops as ops_pkg

        ops = ops_pkg.for_device(query.device)
    with _cpu_threads(query.device, plan.num_tokens):
        for wave in plan.waves:
            if config.topk > 0:
                ops.seal_units(kv_cache, memory, block_table, wave, cos, sin, config)
                selected = ops.select_units(query, memory, block_table, wave, cos, sin, config)
            else:
                selected = None
            ops.attend(query, kv_cache, memory, block_table, wave, selected, cos, sin, config, scale, out)
    return out


#: Steps with at most this many query tokens run the CPU ops on one thread
#: (VLLM_INFLLM_SINGLE_THREAD_MAX_TOKENS overrides; 0 = never).
def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be an integer (e.g. {name}={default})") from None


SINGLE_THREAD_MAX_TOKENS = _env_int("VLLM_INFLLM_SINGLE_THREAD_MAX_TOKENS", 16)


@contextlib.contextmanager
def _cpu_threads(device, num_tokens: int):
    """Run a small step's CPU ops on one thread, then restore the thread count.

    A decode step is ~60 small ops per layer; with vLLM's 2 bound OpenMP threads each op pays a
    fork/join barrier. Measured in the engine (SmolLM2, 4K context, 2-core CPU, two runs each):
    InfLLM attention 41-49 -> 35 ms per decoded token, whole decode step 79-86 -> 74-75 ms.
    Prefill tiles are large matmuls that do gain from all threads (an 8K-token prefill layer:
    0.59 s with 2 threads, 0.97 s with 1), so they keep them. We call torch._C.set_num_threads
    (the builtin behind torch.set_num_threads) because vLLM's CPU worker replaces
    torch.set_num_threads with a no-op after binding its threads.
    """
    setter = getattr(torch._C, "set_num_threads", None)
    if torch.device(device).type != "cpu" or num_tokens > SINGLE_THREAD_MAX_TOKENS or setter is None:
        yield
        return
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    setter(1)
    try:
        yield
    finally:
        setter(n)
