"""Paged InfLLM ops on the native CPU kernels (`csrc/cpu/`), same signatures as `torch_ops`.

    attend        one fused pass per (chunk, KV head, query tile) over the paged cache,
                  reading K/V in place through the block table (csrc/cpu/attend.cpp): a
                  per-row micro-kernel for decode, a tiled one (rows across the vector lanes)
                  for prefill (a 512-query chunk, SmolLM2 geometry, 2 threads, the 2-core dev
                  machine: 27 ms at 4K dense, where the torch op takes 102; 15 ms at 32K with
                  n_local 1024 / topk 4)
    seal_units    native: the new candidates' representatives, each unit once (csrc/cpu/select.cpp);
                  unit_score "exact" and "sketch": the torch op
    select_units  native: q̄, every candidate's score per selection group, the topk by the
                  same ranking rule (contiguity included), each chunk in parallel; "sketch":
                  each key's 4-bit codes unpacked once for the query heads that share them
    select_units_exact
                  native: the exact score (unit_score="exact", retrieval_layer) over every
                  candidate's keys where they lie (pool or store), each key un-rotated once for
                  the query heads that share it; candidates in parallel
    write_kv, hold_selections
                  native: the K/V scatter (and the reset of reused blocks), and chunking="aligned"'s
                  stored selections, without index tensors

`torch_ops` stays the reference: tests/core/test_native_ops.py checks this module against it
and the whole runtime against the oracle. Built and loaded by `native.py`.
"""

from __future__ import annotations

import torch

from ..config import InfLLMConfig
from ..offload import StoreView
from ..plan import ChunkBatch, LayerMemory
from . import cpu_threads, native, torch_ops

_UNIT_SCORES = {"mean_topk": 0, "minmax": 1, "max_topk": 2, "sketch": 4}  # csrc/cpu/select.cpp's UnitScore

#: Queries per work item (rows = queries x the G heads of a KV head); 4 and 32 measured within
#: 10% of it on the prefill above (with the per-row kernel, before the tiled one).
QUERY_TILE = 16

_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _fp32_table(t: torch.Tensor) -> torch.Tensor:
    """The rotary table as the kernel reads it: fp32 with contiguous rows (vLLM's may be bf16,
    or a strided half of its cos|sin cache, which is fine). Converted once per table."""
    if t.dtype == torch.float32 and t.stride(1) == 1:
        return t
    key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
    hit = _tables.get(key)
    if hit is None:
        if len(_tables) > 16:
            _tables.clear()
        hit = _tables[key] = (t, t.float().contiguous())  # holds `t`: its address stays ours
    return hit[1]


def attend(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    memory: LayerMemory,
    block_table: torch.Tensor,
    chunks: ChunkBatch,
    selected: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: InfLLMConfig,
    scale: float,
    out: torch.Tensor,
    *,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    store: StoreView | None = None,
) -> None:
    """InfLLM attention for every query of the wave; writes `out`, accumulates `memory.scores`.
    Arguments as `torch_ops.attend`."""
    if chunks.n == 0:
        return
    mod = native.load()
    dtype = kv_cache.dtype
    q = query if query.dtype == dtype and query.stride(2) == 1 else query.to(dtype).contiguous()
    o = out if out.dtype == dtype and out.stride(2) == 1 else torch.empty(out.shape, dtype=dtype)
    bt = _table32(block_table)
    topk = config.topk if selected is not None else 0
    sel = selected.contiguous() if topk else None
    mod.attend(
        q, kv_cache, bt,
        chunks.req.contiguous(), chunks.c0.contiguous(), chunks.length.contiguous(), chunks.q0.contiguous(),
        chunks.num_cand.contiguous(), sel, _fp32_table(cos), _fp32_table(sin), memory.scores, o,
        None if sinks is None else sinks.float().contiguous(),
        config.block_size, config.n_init, config.n_local, topk, config.positions == "ordered",
        config.accumulates_scores, float(scale), float(softcap), QUERY_TILE, cpu_threads(),
        *_store_args(store, "kv"),
    )
    if o is not out:  # only the wave's rows were written
        rows = torch.cat([torch.arange(a, a + n) for a, n in zip(chunks.host["q0"], chunks.host["length"],
                                                                  strict=True)])
        out.index_copy_(0, rows, o.index_select(0, rows).to(out.dtype))


def _store_args(store: StoreView | None, part: str) -> tuple:
    """The kernels' store arguments: slot table, slabs (`part`: "kv" or "reprs"), units per slab."""
    if store is None:
        return None, [], 1
    return _table32(store.slots), getattr(store, part), store.slab_units


def _fields(chunks: ChunkBatch, *names: str) -> list[torch.Tensor]:
    return [getattr(chunks, name).contiguous() for name in names]


def _table32(block_table: torch.Tensor) -> torch.Tensor:
    if block_table.dtype == torch.int32 and block_table.stride(1) == 1:
        return block_table
    return block_table.to(torch.int32).contiguous()


def seal_units(
    kv_cache: torch.Tensor,
    memory: LayerMemory,
    block_table: torch.Tensor,
    chunks: ChunkBatch,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: InfLLMConfig,
) -> None:
    """Arguments and semantics as `torch_ops.seal_units`."""
    if chunks.n == 0 or chunks.max_cand == 0:
        return
    if config.unit_score in ("exact", "sketch"):  # flags only, or box + codes: the torch op
        torch_ops.seal_units(kv_cache, memory, block_table, chunks, cos, sin, config)
        return
    native.load().seal_units(
        kv_cache, memory.reprs, memory.scores, memory.sealed, _table32(block_table),
        *_fields(chunks, "req", "num_cand"), _fp32_table(cos), _fp32_table(sin), config.block_size, config.n_init,
        config.chunk, config.repr_topk, _UNIT_SCORES[config.unit_score], cpu_threads(),
    )


def select_units(
    query: torch.Tensor,
    memory: LayerMemory,
    block_table: torch.Tensor,
    chunks: ChunkBatch,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: InfLLMConfig,
    num_kv_heads: int,
    *,
    store: StoreView | None = None,
) -> torch.Tensor:
    """Arguments and result as `torch_ops.select_units`."""
    S = config.selection_groups(num_kv_heads)
    selected = torch.empty(chunks.n, S, config.topk, dtype=torch.long)
    if chunks.n == 0:
        return selected
    reprs = memory.reprs
    q = query if query.dtype == reprs.dtype and query.stride(2) == 1 else query.to(reprs.dtype).contiguous()
    native.load().select_units(
        q, reprs, _table32(block_table), *_fields(chunks, "req", "c0", "length", "q0", "num_cand"),
        _fp32_table(cos), _fp32_table(sin), selected, num_kv_heads, config.block_size, config.n_init,
        config.n_local, config.topk, config.repr_topk, _UNIT_SCORES[config.unit_score], S, config.contiguity,
        config.select_queries, config.chunking == "aligned", cpu_threads(), *_store_args(store, "reprs"),
    )
    return selected


def select_units_exact(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    chunks: ChunkBatch,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: InfLLMConfig,
    num_kv_heads: int,
    *,
    store: StoreView | None = None,
) -> torch.Tensor:
    """Arguments and result as `torch_ops.select_units_exact`."""
    S = config.selection_groups(num_kv_heads)
    selected = torch.empty(chunks.n, S, config.topk, dtype=torch.long)
    if chunks.n == 0:
        return selected
    q = query if query.dtype == kv_cache.dtype and query.stride(2) == 1 else query.to(kv_cache.dtype).contiguous()
    native.load().select_units_exact(
        q, kv_cache, _table32(block_table), *_fields(chunks, "req", "c0", "length", "q0", "num_cand"),
        _fp32_table(cos), _fp32_table(sin), selected, config.n_init, config.n_local, config.topk, S,
        config.contiguity, config.select_queries, config.chunking == "aligned", cpu_threads(),
        *_store_args(store, "kv"),
    )
    return selected


def write_kv(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    memory: LayerMemory | None,
) -> None:
    """Arguments and semantics as `torch_ops.write_kv`."""
    n = slot_mapping.shape[0]
    k, v = key[:n], value[:n]
    if k.dtype != kv_cache.dtype or k.stride(-1) != 1:
        k = k.to(kv_cache.dtype).contiguous()
    if v.dtype != kv_cache.dtype or v.stride(-1) != 1:
        v = v.to(kv_cache.dtype).contiguous()
    native.load().write_kv(kv_cache, k, v, slot_mapping.to(torch.long).contiguous(),
                           None if memory is None else memory.scores, None if memory is None else memory.sealed)


def hold_selections(
    selected: torch.Tensor,
    memory: LayerMemory,
    block_table: torch.Tensor,
    chunks: ChunkBatch,
    config: InfLLMConfig,
) -> torch.Tensor:
    """Arguments and semantics as `ranking.hold_selections` (in place; returns `selected`)."""
    if config.chunking != "aligned" or config.topk == 0:
        return selected
    if memory.chosen is None:
        return torch_ops.hold_selections(selected, memory, block_table, chunks, config)  # raises its error
    native.load().hold_selections(selected, memory.chosen, _table32(block_table),
                                  *_fields(chunks, "req", "c0", "length", "a0"), config.block_size, config.chunk)
    return selected
