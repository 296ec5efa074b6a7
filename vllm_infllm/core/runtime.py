"""The InfLLM runtime: one layer's attention over a paged KV cache for a varlen batch.

vLLM-free. The adapter (adapter/backend.py) turns vLLM's metadata into a `StepPlan` once per
step (`core/plan.py`, shared by all layers) and calls `infllm_forward` per layer; tests and
benchmarks drive the same code directly (`vllm_infllm.testing`).

Data model (docs/design.md section 3):
  kv_cache     [num_blocks, Hkv, block_size, 2*D]  K then V, post-RoPE keys, any strides
  block_table  [num_reqs, max_blocks]              physical block of each logical block
  LayerMemory  per physical block: fp32 representative scores, representative keys, sealed flag

Each wave of the plan is seal -> select -> attend (docs/design.md section 2); the ops are
batched over the wave's chunks and come from `core/ops/` for the tensors' device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from . import ops as ops_pkg
from .config import InfLLMConfig
from .offload import StoreView, UnitReadTally
from .plan import LayerMemory, StepPlan


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
    ops: ModuleType | None = None,
    *,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    store: StoreView | None = None,
    unit_reads: UnitReadTally | None = None,
    layer: int | None = None,
) -> torch.Tensor:
    """InfLLM attention of one layer; writes `out[:plan.num_tokens]`, updates `memory`.

    query:        [T, Hq, D] post-RoPE (rotated at absolute positions by the model)
    kv_cache:     [num_blocks, Hkv, B, 2*D] with this step's K/V already written (`ops.write_kv`)
    block_table:  [num_reqs, max_blocks] int, rows indexed by the plan's `req`
    cos, sin:     [rows, D/2] the model's rotary table, full-width NeoX (rows >= every position
                  + 1); other layouts are permuted to it first (`core.rope.RopeLayout`)
    out:          [T, Hq, D], any float dtype
    ops:          the op module (default: `ops.for_device(query.device)`)
    softcap:      the model's logit soft-capping, s -> softcap * tanh(s / softcap) (0: none)
    sinks:        [Hq] the model's learned sink logits (None: none)
    store:        this layer's offloaded memory units (core/offload.py; None: every unit is in
                  the pool): selected units with a store slot are read from it
    unit_reads:   gains this layer's selections, to count the selected units and, of those,
                  the units read from `store` (`offload.UnitReadTally`; the adapter's offload
                  statistics); None: not counted
    layer:        the model's 0-based index of this layer; needed with config.retrieval_layer
                  (that layer selects by the exact score, `ops.select_units_exact`, and leaves its
                  choice in the plan's waves; the layers above read it, so a step must run its
                  layers in order, as a forward pass does)
    """
    if sinks is not None and sinks.shape != (query.shape[1],):
        raise ValueError(f"infllm: sinks {tuple(sinks.shape)} must hold one logit per query head "
                         f"({query.shape[1]})")
    rows = config.repr_rows(query.shape[1], kv_cache.shape[1], kv_cache.dtype.itemsize)
    if memory.reprs.shape[1] != rows:
        raise ValueError(
            f"infllm: LayerMemory.reprs has {memory.reprs.shape[1]} rows per block, unit_score="
            f"{config.unit_score!r} needs {rows}: allocate it with config.repr_rows(Hq, Hkv, dtype.itemsize)"
        )
    if ops is None:
        ops = ops_pkg.for_device(query.device)
    role = config.layer_role(layer) if config.topk > 0 else "own"
    exact = config.selects_exactly(layer)
    if exact and not hasattr(ops, "select_units_exact"):
        raise ValueError(f"infllm: the exact unit score (unit_score='exact' or retrieval_layer) has no op "
                         f"on {ops.__name__} (device {query.device.type}) yet; run on the CPU path, or use "
                         "another unit_score and no retrieval_layer")
    where = {} if store is None else {"store": store}  # only the ops that read units take it
    if store is not None and store.slots.shape != block_table.shape:
        raise ValueError(f"infllm: the store's slot table {tuple(store.slots.shape)} must be shaped as the "
                         f"block table {tuple(block_table.shape)} (UnitStore.slot_table with its width)")
    one_thread = getattr(ops, "SMALL_STEPS_ON_ONE_THREAD", False)
    with _cpu_threads(query.device, plan.num_tokens) if one_thread else contextlib.nullcontext():
        for wave in plan.waves:
            if config.topk > 0:
                ops.seal_units(kv_cache, memory, block_table, wave, cos, sin, config)
                if role == "reader":  # the retrieval layer chose for this wave earlier in the step
                    if wave.retrieved is None:
                        raise RuntimeError(
                            f"infllm: layer {layer} reads the units of retrieval_layer="
                            f"{config.retrieval_layer}, which has not selected in this step (it is "
                            "not an InfLLM layer of this model, e.g. a sliding-window layer, or the "
                            "layers ran out of order): set retrieval_layer to an InfLLM layer")
                    selected = wave.retrieved
                else:
                    if exact:  # every candidate's keys, no representatives
                        selected = ops.select_units_exact(
                            query, kv_cache, block_table, wave, cos, sin, config, kv_cache.shape[1], **where
                        )
                    else:
                        selected = ops.select_units(
                            query, memory, block_table, wave, cos, sin, config, kv_cache.shape[1], **where
                        )
                    selected = ops.hold_selections(selected, memory, block_table, wave, config)
                    if role == "retrieval":
                        wave.retrieved = selected
                if unit_reads is not None:
                    unit_reads.add(selected, wave.req, config.init_blocks, None if store is None else store.slots)
            else:
                selected = None
            ops.attend(query, kv_cache, memory, block_table, wave, selected, cos, sin, config, scale, out,
                       softcap=softcap, sinks=sinks, **where)
    return out


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be an integer (e.g. {name}={default})") from None


#: Steps with at most this many query tokens run the CPU ops on one thread
#: (VLLM_INFLLM_SINGLE_THREAD_MAX_TOKENS overrides; 0 = never).
SINGLE_THREAD_MAX_TOKENS = _env_int("VLLM_INFLLM_SINGLE_THREAD_MAX_TOKENS", 16)


@contextlib.contextmanager
def _cpu_threads(device: torch.device, num_tokens: int) -> Iterator[None]:
    """Run a small step's CPU ops on one thread, then restore the thread count (the torch ops:
    `torch_ops.SMALL_STEPS_ON_ONE_THREAD`).

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
    ops_pkg._step_threads = n  # for the native kernels (ops.cpu_threads)
    try:
        yield
    finally:
        ops_pkg._step_threads = None
        setter(n)
