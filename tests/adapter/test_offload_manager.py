"""The block manager side of offload (adapter/kv_cache.py), driven without an engine: a real
vLLM BlockPool, the InfLLM manager, requests that grow step by step. Units leave the pool as
core/offload.py's rule says, each one queued once for the worker's copy, a request never holds
more than the admission cap, and every block returns to the pool."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_infllm.adapter.kv_cache import InfLLMAttentionSpec, InfLLMKVCacheManager
from vllm_infllm.core.config import InfLLMConfig, OffloadConfig
from vllm_infllm.core.offload import max_blocks_held, units_to_release

CFG = InfLLMConfig.paper(n_local=1024, topk=4)
B = 128


def manager(offload: OffloadConfig | None, in_flight: int = 512, blocks: int = 400) -> InfLLMKVCacheManager:
    base = FullAttentionSpec(block_size=B, num_kv_heads=3, head_size=64, dtype=torch.float32)
    spec = InfLLMAttentionSpec.from_spec(base, CFG, offload, in_flight)
    pool = BlockPool(num_gpu_blocks=blocks, enable_caching=False, hash_block_size=B)
    return InfLLMKVCacheManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                                scheduler_block_size=B)


def grow(m: InfLLMKVCacheManager, rid: str, prompt: int, total: int, step: int) -> list[tuple[str, int, int]]:
    """Schedule a request like vLLM: free what it may release, then allocate the step's slots."""
    taken, P = [], 0
    while P < total:
        n = min(step, prompt - P) if P < prompt else 1
        m.remove_skipped_blocks(rid, P, prompt)
        m.allocate_new_blocks(rid, P + n, P + n)
        cap = m.max_admission_blocks_per_request
        assert cap is None or m.held_blocks(rid) <= cap
        taken += m.take_offloads()
        P += n
    return taken


def test_units_leave_once_in_order_under_the_cap_and_blocks_return():
    off = OffloadConfig(cache_units=8)
    m = manager(off)
    assert m.max_admission_blocks_per_request == max_blocks_held(CFG, 8, 512)
    free0 = m.block_pool.get_num_free_blocks()
    taken = grow(m, "a", prompt=30_000, total=30_100, step=512)
    released = units_to_release(30_099, 30_000, CFG, 8)
    assert [x[1] for x in taken] == list(range(CFG.init_blocks, CFG.init_blocks + released))
    assert all(x[0] == "a" for x in taken)
    # Released blocks went back to the pool and came back for later tokens: few distinct ids.
    assert len({x[2] for x in taken}) <= m.max_admission_blocks_per_request < len(taken)
    assert m.held_blocks("a") == -(-30_100 // B) - released  # the rest is in the pool
    assert m.peak_held <= m.max_admission_blocks_per_request
    m.free("a")
    assert m.block_pool.get_num_free_blocks() == free0  # every block back (nulls not double-freed)


def test_freed_request_leaves_no_pending_copy_and_offload_off_frees_nothing():
    m = manager(OffloadConfig(cache_units=0))
    grow(m, "a", prompt=8000, total=8000, step=512)
    m.remove_skipped_blocks("a", 8000, 8000)  # releases more, then the request finishes
    assert m.pending_offloads
    m.free("a")
    assert m.take_offloads() == []
    plain = manager(None)
    assert plain.max_admission_blocks_per_request is None
    assert grow(plain, "b", prompt=8000, total=8010, step=1000) == []
    assert plain.held_blocks("b") == -(-8010 // B)


def test_the_spec_sizes_memory_by_the_cap():
    class Model:
        max_model_len = 131072

    class Parallel:
        decode_context_parallel_size = 1

    class Config:
        model_config, parallel_config = Model, Parallel

    spec = manager(OffloadConfig(cache_units=8)).kv_cache_spec
    plain = manager(None).kv_cache_spec
    assert plain.max_memory_usage_bytes(Config) == 1024 * plain.page_size_bytes
    assert spec.max_memory_usage_bytes(Config) == spec.infllm_offload_max_blocks * spec.page_size_bytes
    assert spec.infllm_offload_max_blocks < 64
    with pytest.raises(ValueError, match="disagree"):
        InfLLMAttentionSpec.merge([spec, plain])
