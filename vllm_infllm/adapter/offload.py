"""Offload in vLLM: memory units leave the KV pool for the worker's store (docs/design.md 3.7).

The block manager (`kv_cache.InfLLMKVCacheManager.remove_skipped_blocks`) frees the blocks of
units that may leave, in the scheduler. The worker must copy them out before anything can
overwrite them: vLLM's sanctioned hook for that is a KV connector's `handle_preemptions`, which
the model runner calls before it zeroes or copies blocks and before the forward ("Handle
preempted requests or evicted blocks BEFORE they are overwritten"). So offload is a small KV
connector, `InfLLMOffloadConnector`, set up by the engine-args hook when the InfLLM config asks
for offload:

* scheduler side: `build_connector_meta` (end of every `schedule()`, after every allocation)
  drains the managers' released units and adds the requests that finished or were preempted;
* worker side: `handle_preemptions` drops those requests' units from the store (a preempted
  request recomputes from 0), then copies the released units of every InfLLM layer into the
  store, one gather per layer. The builder then gives each step a slot table for its requests
  (`slot_table`), and each layer reads selected units from the store (`view`).

vLLM's worker-side block table only grows, so the table still names a released unit's old block
(which may serve another request): the slot table, not the block table, says where a unit is.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from ..core.offload import StoreView, UnitReadTally, UnitStore
from .metrics import OffloadStats

logger = logging.getLogger("vllm.infllm")

CONNECTOR = "InfLLMOffloadConnector"
MODULE = __name__


@dataclasses.dataclass
class InfLLMOffloadMetadata(KVConnectorMetadata):
    offloads: list[tuple[str, int, int]]  # (request, logical block, pool block) released this step
    dropped: list[str]  # requests finished or preempted: their units leave the store
    pool_blocks: int = 0  # KV-pool blocks the InfLLM layers' requests hold (the statistics)


class _WorkerStore:
    """The worker's store and how its layers map to the store's layer index (one per process)."""

    def __init__(self) -> None:
        self.store: UnitStore | None = None
        self.layer_index: dict[str, int] = {}
        # The statistics: the layers' selections (counted when stats() is read) and the
        # scheduler's pool count.
        self.unit_reads = UnitReadTally()
        self.pool_blocks = 0

    def reset(self) -> None:
        self.__init__()

    def stats(self) -> OffloadStats:
        store = self.store
        selected, from_store = self.unit_reads.flush()
        return OffloadStats(
            pool_blocks=self.pool_blocks,
            store_units=0 if store is None else store.num_units,
            store_bytes=0 if store is None else store.num_units * store.unit_nbytes,
            units_offloaded=0 if store is None else store.units_offloaded_total,
            unit_reads=selected,
            store_reads=from_store,
        )

    def view(self, layer_name: str, slots: torch.Tensor) -> StoreView:
        return self.store.view(self.layer_index[layer_name], slots)

    def slot_table(self, req_ids: list[str], width: int, device) -> torch.Tensor | None:
        """The step's slot table (None when no unit of these requests is in the store)."""
        if self.store is None or not any(self.store.holds(r) for r in req_ids if r is not None):
            return None
        return self.store.slot_table(req_ids, width, device)


WORKER = _WorkerStore()


class InfLLMOffloadConnector(KVConnectorBase_V1, SupportsHMA):
    """Copies released memory units out of the KV pool before a step can overwrite them.

    SupportsHMA: vLLM turns its hybrid KV-cache manager off for connectors without it, which
    would change how a hybrid model's sliding-window layers keep their blocks."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._managers: list[Any] = []
        self._layers: dict[str, Any] = {}  # worker: layer name -> (impl, kv_cache)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # nothing is handed off when a request completes

    # ------------------------------------------------------------------ scheduler side

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        from .kv_cache import InfLLMKVCacheManager

        self._managers = [m for m in kv_cache_manager.coordinator.single_type_managers
                          if isinstance(m, InfLLMKVCacheManager)]

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False  # not a cache: no tokens to load

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        offloads = [x for m in self._managers for x in m.take_offloads()]
        dropped = sorted(set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ()))
        pool = sum(m.held_blocks(r) for m in self._managers for r in list(m.req_to_blocks))
        return InfLLMOffloadMetadata(offloads=offloads, dropped=dropped, pool_blocks=pool)

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        return False, None  # blocks are freed at once; the store drops the request next step

    def request_finished_all_groups(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from .backend import InfLLMAttentionImpl

        context = self._vllm_config.compilation_config.static_forward_context
        for name, kv in kv_caches.items():
            impl = getattr(context.get(name), "impl", None)
            if isinstance(impl, InfLLMAttentionImpl) and impl.window_impl is None:
                self._layers[name] = (impl, kv)
        if not self._layers:  # the manager would free blocks no one copies: never run like that
            raise RuntimeError(
                "infllm offload: no InfLLM attention layer among the KV caches vLLM registered "
                f"({len(kv_caches)} caches), so released memory units could not be copied out. Use "
                "--attention-backend infllm, or drop 'offload' from the infllm config."
            )
        impl, kv = next(iter(self._layers.values()))
        slots, memory = impl._layer_state(kv)
        offload = impl.offload_config
        WORKER.reset()
        WORKER.layer_index = {name: i for i, name in enumerate(self._layers)}
        WORKER.store = UnitStore(len(self._layers), slots.shape[1], slots.shape[2], slots.shape[3] // 2,
                                 memory.reprs.shape[1], slots.dtype, path=offload.path if offload else None)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        meta = kv_connector_metadata
        if not isinstance(meta, InfLLMOffloadMetadata):
            return
        if WORKER.store is None:
            if meta.offloads:  # freed blocks that nothing would copy out: stop, never read them
                raise RuntimeError("infllm offload: memory units left the KV pool but this worker has no "
                                   "store (vLLM never registered its KV caches with the connector)")
            return
        store = WORKER.store
        WORKER.pool_blocks = meta.pool_blocks
        for rid in meta.dropped:
            store.drop(rid)
        if not meta.offloads:
            return
        by_req: dict[str, tuple[list[int], list[int]]] = {}
        for rid, logical, block in meta.offloads:
            if rid in meta.dropped:
                continue
            logicals, blocks = by_req.setdefault(rid, ([], []))
            logicals.append(logical)
            blocks.append(block)
        slots, blocks = [], []
        for rid, (logicals, blks) in by_req.items():
            slots += store.allocate(rid, logicals)
            blocks += blks
        for name, (impl, kv) in self._layers.items():
            kv_slots, memory = impl._layer_state(kv)
            store.write(WORKER.layer_index[name], slots, kv_slots, memory.reprs, blocks)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return


def kv_transfer_config() -> dict[str, Any]:
    """The `kv_transfer_config` that installs the connector (engine-args hook)."""
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": MODULE, "kv_role": "kv_both"}
