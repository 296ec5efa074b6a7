"""InfLLM's KV-cache spec and block manager: prefix caching that hands out only blocks whose side
state the reader would have computed itself (docs/design.md section 3.2).

vLLM shares a cached block by the hash of the tokens up to the block's end. InfLLM's side state
in that block (3.2) depends on more than that:

* the representatives of a unit ending at `e` come from the attention mass of the queries
  `[e - B, e + n_local - 2]`, i.e. from up to `n_local - 2` tokens *after* the block, and they
  are fixed when the unit is sealed (the first chunk starting at or after `e + n_local - 1`);
* positions from a request's `L - 1` on (its last prompt query, its generated tokens) select
  alone, where a request with a longer prompt would compute them in aligned chunks.

So the manager caches a request's blocks only while they hold prompt positions below `L - 1`,
and a block may serve a hit only once it is *settled*: sealed in a step that has already run,
by a writer whose tokens up to `e + n_local - 2` were prompt tokens, recorded with the hash of
the writer's block holding `e + n_local - 2`. A reader gets the block only if its own hash there
is the same (its tokens up to the last query that weighed in are the writer's). A settled
block's scores are never read again, so the mass a reader adds to them changes nothing, and
the hit is exact. The price is the tail: a shared prefix is reused up to about
`n_local + chunk` tokens before its end. With `unit_score="minmax"` (or `topk` 0) the
representatives are a function of the block's own keys, and every cached block is settled.

The spec is FullAttentionSpec plus the InfLLM fields the manager needs; `customize_spec` returns
it, and the platform hook `register_custom_kv_cache_specs` registers the manager for it.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..core.config import InfLLMConfig, OffloadConfig
from ..core.offload import max_blocks_held, units_to_release


@dataclasses.dataclass(frozen=True, kw_only=True)
class InfLLMAttentionSpec(FullAttentionSpec):
    """FullAttentionSpec of an InfLLM layer, with what the block manager needs to know which
    cached blocks are settled. Its pages hold the side state (adapter/side_state.py): padded by
    `infllm_side_state_bytes` (128-token blocks; `page_size_padded`), or extra head slots
    (`num_head_slots`, other block sizes; `infllm_side_state_bytes` 0)."""

    infllm_n_local: int = 0
    infllm_chunk: int = 1
    # False when the representatives need no attention mass (minmax, or no memory at all).
    infllm_scores_matter: bool = True
    infllm_side_state_bytes: int = 0
    # Offload (docs/design.md section 3.7): units kept per request after they could leave the
    # pool (-1: offload off), and the blocks a request then holds at most (its admission cap).
    infllm_n_init: int = 0
    infllm_offload_cache: int = -1
    infllm_offload_max_blocks: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.infllm_side_state_bytes:
            return
        # A padded page fits one 128-token kernel block; vLLM cannot split it, so a spec copied
        # to another block size (hybrid page unification, --block-size) would lose the room.
        if self.block_size != 128:
            raise ValueError(
                f"infllm: KV blocks of {self.block_size} tokens with padded side-state pages; InfLLM's "
                "padded pages need 128-token blocks: use --block-size 128 (the default)"
            )
        need = self.unpadded_page_size_bytes + self.infllm_side_state_bytes
        if self.page_size_padded is None or self.page_size_padded < need:
            raise ValueError(f"infllm: page_size_padded {self.page_size_padded} < K/V + side state = {need} bytes")

    @property
    def offloads(self) -> bool:
        return self.infllm_offload_cache >= 0

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # With offload a request of any length holds at most the cap (start-up memory check,
        # concurrency estimate): units that left the window are in the store.
        full = super().max_memory_usage_bytes(vllm_config)
        if not self.offloads:
            return full
        return min(full, self.infllm_offload_max_blocks * self.page_size_bytes)

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec, config: InfLLMConfig, offload: OffloadConfig | None = None,
                  max_in_flight_tokens: int = 0, **changes: Any) -> InfLLMAttentionSpec:
        values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)}
        values.update(changes)
        off = {}
        if offload is not None:
            off = dict(infllm_offload_cache=offload.cache_units,
                       infllm_offload_max_blocks=max_blocks_held(config, offload.cache_units, max_in_flight_tokens))
        return cls(**values, infllm_n_local=config.n_local, infllm_chunk=config.chunk,
                   infllm_scores_matter=config.accumulates_scores, infllm_n_init=config.n_init, **off)

    @classmethod
    def merge(cls, specs: list[InfLLMAttentionSpec]) -> InfLLMAttentionSpec:
        if not all(isinstance(s, InfLLMAttentionSpec) for s in specs):
            raise ValueError("infllm: a KV cache group mixes InfLLM and other attention layers")
        infllm = {(s.infllm_n_local, s.infllm_chunk, s.infllm_scores_matter, s.infllm_side_state_bytes,
                   s.infllm_n_init, s.infllm_offload_cache, s.infllm_offload_max_blocks) for s in specs}
        if len(infllm) != 1:
            raise ValueError(f"infllm: the layers of one KV cache group disagree on the InfLLM config: {infllm}")
        base = FullAttentionSpec.merge(specs)  # checks every common field
        n_local, chunk, scores_matter, side, n_init, cache, max_blocks = infllm.pop()
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(FullAttentionSpec)}
        return cls(**values, infllm_n_local=n_local, infllm_chunk=chunk, infllm_scores_matter=scores_matter,
                   infllm_side_state_bytes=side, infllm_n_init=n_init, infllm_offload_cache=cache,
                   infllm_offload_max_blocks=max_blocks)

    def settling(self, block_end: int, prompt_len: int) -> tuple[int, int] | None:
        """For the block ending at `block_end` (exclusive) of a request with a prompt of
        `prompt_len` tokens: (the last position whose attention mass reaches the block, the
        position by which its writer has sealed it), or None if the writer's rule there is not
        the one a reader with a longer prompt uses (positions from `prompt_len - 1` on)."""
        if not self.infllm_scores_matter:
            return block_end - 1, block_end - 1
        last = block_end + self.infllm_n_local - 2
        if last >= prompt_len - 1:
            return None
        first_candidate = last + 1  # a chunk starting here or later has the unit as candidate
        chunk_start = -(-first_candidate // self.infllm_chunk) * self.infllm_chunk
        return last, min(chunk_start, prompt_len - 1)


class InfLLMKVCacheManager(FullAttentionManager):
    """FullAttentionManager whose prefix-cache hits stop at the first block that is not settled
    for the reader (module docstring)."""

    #: Per block pool (one per engine): physical block id -> (its block hash, the writer's block
    #: hash at the last position that weighed in). A block whose hash has changed since (evicted
    #: and reused) does not match. Engine-core state, like the block pool it belongs to.
    _settled_by_pool: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @classmethod
    def _settled(cls, block_pool) -> dict[int, tuple[Any, Any]]:
        return cls._settled_by_pool.setdefault(block_pool, {})

    def __init__(self, kv_cache_spec: InfLLMAttentionSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._checked: dict[str, int] = {}  # request id -> blocks already looked at
        # Offload: the units that leave the pool, freed here and copied out by the worker
        # (adapter/offload.py) before the step that could overwrite them.
        self._released: dict[str, int] = {}  # request id -> units [0, n) released
        self._nulls: dict[str, int] = {}  # request id -> blocks it gave back (null placeholders)
        self.pending_offloads: list[tuple[str, int, int]] = []  # (request, logical block, block id)
        self.peak_held = 0  # most pool blocks one request held after an allocation (the bound's check)
        spec = kv_cache_spec
        self._rule = None
        if spec.offloads:
            # A request of any length is admitted with the blocks it can hold at most.
            self.max_admission_blocks_per_request = spec.infllm_offload_max_blocks
            # The geometry offloadable_units reads (chunking does not change the rule).
            self._rule = InfLLMConfig(n_init=spec.infllm_n_init, n_local=spec.infllm_n_local,
                                      block_size=spec.block_size, chunk=spec.infllm_chunk, topk=1,
                                      repr_topk=1, chunking="step")

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        """Offload: free the blocks of the units that may leave the pool (core/offload.py:
        units_to_release), null placeholders in their slots, as vLLM's sliding window does, and
        queue them for the worker to copy out first."""
        if self._rule is None:
            return
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        spec: InfLLMAttentionSpec = self.kv_cache_spec
        init = spec.infllm_n_init // self.block_size
        want = units_to_release(processed_computed_tokens, num_prompt_tokens, self._rule, spec.infllm_offload_cache)
        done = self._released.get(request_id, 0)
        # A prefix hit's blocks join the table after this call: release only what it holds.
        upto = min(want, len(blocks) - init)
        freed = []
        for u in range(done, upto):
            blk = blocks[init + u]
            if blk.is_null:
                continue
            self.pending_offloads.append((request_id, init + u, blk.block_id))
            freed.append(blk)
            blocks[init + u] = self._null_block
        if freed:
            self.block_pool.free_blocks(freed)
            self._nulls[request_id] = self._nulls.get(request_id, 0) + len(freed)
        self._released[request_id] = max(done, upto)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        new = super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        if self._rule is not None:
            self.peak_held = max(self.peak_held, self.held_blocks(request_id))
        return new

    def held_blocks(self, request_id: str) -> int:
        """Pool blocks a request holds (null placeholders of released units not counted)."""
        return len(self.req_to_blocks.get(request_id, ())) - self._nulls.get(request_id, 0)

    def cache_blocks(self, request, num_tokens: int, retention_interval: int | None = None, *,
                     replay_boundaries: Sequence[int]) -> None:
        # Only blocks of prompt positions below L - 1: later ones were computed one query per
        # chunk, which a request that holds them in its prompt would not do.
        limit = max(0, request.num_prompt_tokens - 1)
        super().cache_blocks(request, min(num_tokens, limit), retention_interval,
                             replay_boundaries=replay_boundaries)
        self._record_settled(request)

    def _record_settled(self, request) -> None:
        """Record the request's cached blocks that became settled in the steps run so far."""
        spec: InfLLMAttentionSpec = self.kv_cache_spec
        blocks = self.req_to_blocks.get(request.request_id, [])
        hashes = resolve_block_hashes(request.block_hashes, self.block_pool.hash_block_size, self.block_size)
        done = request.num_computed_tokens  # scheduled in earlier steps, so run before any reader's
        bs = self.block_size
        start = self._checked.get(request.request_id, 0)
        settled = self._settled(self.block_pool)
        for i in range(start, self.num_cached_block.get(request.request_id, 0)):
            blk = blocks[i]
            if blk.is_null:  # offloaded (settled long before it left)
                self._checked[request.request_id] = i + 1
                continue
            record = settled.get(blk.block_id)
            if record is None or record[0] != blk.block_hash:  # not recorded (a hit's blocks are)
                settling = spec.settling((i + 1) * bs, request.num_prompt_tokens)
                if settling is None or settling[1] >= done or settling[0] // bs >= len(hashes):
                    break  # nor is any later block (each reaches further)
                settled[blk.block_id] = (blk.block_hash, hashes[settling[0] // bs])
            self._checked[request.request_id] = i + 1

    def free(self, request_id: str) -> None:
        self._checked.pop(request_id, None)
        self._nulls.pop(request_id, None)
        if self._released.pop(request_id, None) is not None:  # nothing left to copy out
            self.pending_offloads = [p for p in self.pending_offloads if p[0] != request_id]
        super().free(request_id)

    def take_offloads(self) -> list[tuple[str, int, int]]:
        """The units released since the last call (the connector sends them to the worker)."""
        out, self.pending_offloads = self.pending_offloads, []
        return out

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length: int, kv_cache_group_ids: list[int],
                               block_pool, kv_cache_spec, drop_eagle_block: bool, alignment_tokens: int,
                               dcp_world_size: int = 1, pcp_world_size: int = 1):
        computed, hit_length = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, drop_eagle_block,
            alignment_tokens, dcp_world_size, pcp_world_size,
        )
        bs = kv_cache_spec.block_size
        hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, bs)
        settled, records = 0, cls._settled(block_pool)
        for i, blk in enumerate(computed[0][: hit_length // bs]):
            record = records.get(blk.block_id)
            if record is None or record[0] != blk.block_hash:
                break
            last = kv_cache_spec.settling((i + 1) * bs, 1 << 62)[0]
            if last // bs >= len(hashes) or hashes[last // bs] != record[1]:
                break
            settled += 1
        hit_length = min(hit_length, settled * bs)
        hit_length -= hit_length % alignment_tokens
        for blocks in computed:
            del blocks[-(-hit_length // bs):]
        return computed, hit_length


def register_kv_cache_spec() -> None:
    """Register the InfLLM spec with its manager (idempotent); grouped as full attention."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry.register(InfLLMAttentionSpec, InfLLMKVCacheManager,
                                 uniform_type_base_spec=FullAttentionSpec)
