"""Memory units outside the KV pool: which may leave it, where they go, how the ops read them.

vLLM-free (docs/design.md section 3.7). InfLLM's memory story is offloading: a sealed memory
unit that has left the local window is read only when a chunk selects it, so it need not stay
in vLLM's KV pool. Three pieces:

    offloadable_units  the rule: how many of a request's units (from unit 0) no op will read
                       through the block table again, given the tokens it has processed
                       (units_to_release keeps a cache of the last ones; max_blocks_held
                       bounds what a request then holds in the pool)
    UnitStore          the store: the offloaded units' K/V (process memory, or files under a
                       directory) and their representative keys (always in memory, so
                       selection never touches the K/V store), in slots grouped into slabs
                       that are released when they empty
    StoreView          one layer's view for the ops: a slot table, the block table's twin, and
                       the slabs; `select_units` reads an offloaded unit's representatives and
                       `attend` its K/V from the store instead of the pool
    UnitReadTally      the statistics: how many selected units the waves read, and how many
                       of them came from the store rather than the pool (the cache's hit rate)

The data are copied, not transformed, so the attention with units in the store is bitwise the
attention with them in the pool (tests/core/test_offload.py).
"""

from __future__ import annotations

import dataclasses
import heapq
import os
from collections.abc import Hashable, Sequence

import torch

from .config import InfLLMConfig


def offloadable_units(processed: int, prompt_len: int | None, config: InfLLMConfig) -> int:
    """E: units [0, E) of a request may leave the pool once `processed` tokens (positions
    [0, processed)) are computed and returned; the ops then read them only as selected units.

    Every later query p >= processed selects from a0 >= a = selection_start(processed - 1) (it is
    non-decreasing in p; chunking="step" chunks start at or after it too), so its candidates are
    K' >= K = num_candidates(a), and:
      - its remainder [n_init + K'B, w(p)), local window and init are not memory units below K;
      - `seal_units` reads (through the block table) only its last chunk // B + 2 candidates,
        at K' - chunk // B - 2 or later; the chunk that processed position processed - 1 sealed
        every unit below its own candidates, which are at least K - chunk // B (a "step" chunk
        starts at most chunk - 1 positions before a), so the units below E are final;
      - representative scores are added to local blocks only, stored selections (aligned) are
        read at the chunk's first block, in its window.
    So E = K - (chunk // B + 2). A preempted request starts again from 0: drop its units.
    """
    if processed <= 0:
        return 0
    a = config.selection_start(processed - 1, prompt_len)
    return max(0, config.num_candidates(a) - (config.chunk // config.block_size + 2))


def units_to_release(processed: int, prompt_len: int | None, config: InfLLMConfig, cache_units: int) -> int:
    """R: units [0, R) of a request that leave the pool after `processed` tokens: every unit
    `offloadable_units` allows but the `cache_units` most recent, which stay as a cache of the
    units that left the window last (first in, first out)."""
    if cache_units < 0:
        raise ValueError(f"infllm offload: cache_units={cache_units} must be >= 0 (e.g. 2 x topk)")
    return max(0, offloadable_units(processed, prompt_len, config) - cache_units)


def max_blocks_held(config: InfLLMConfig, cache_units: int, max_new_tokens: int) -> int:
    """An upper bound on the KV-pool blocks one request holds at any step, whatever its length,
    when units leave as `units_to_release` says and a step adds at most `max_new_tokens` tokens
    (the scheduler's token budget): what vLLM's admission cap and the start-up memory check
    need (a request of any length is admitted with this many blocks).

    With P processed and T new tokens a request holds ceil((P + T) / B) - R blocks, and
    R >= K - W - c with W = chunk // B + 2, c = cache_units and K = num_candidates(a) for
    a >= P - chunk, so K >= (P - chunk - n_local - n_init - B + 2) / B. Hence
    held <= (T + chunk + n_local + n_init + 2B - 3) / B + W + c: init, window, one chunk, the
    step's tokens, the seal window and the cache.
    """
    B = config.block_size
    return ((max_new_tokens + config.chunk + config.n_local + config.n_init + 2 * B - 3) // B
            + config.chunk // B + 2 + cache_units)


@dataclasses.dataclass
class StoreView:
    """One layer's offloaded units as the ops read them.

    slots:      [num_reqs, max_blocks] int32, the block table's twin (same rows, same logical
                blocks): the store slot of each logical block, -1 = read it from the pool
    kv:         slabs [slab_units, Hkv, B, 2*D] in the cache dtype: slot s is row
                s % slab_units of slab s // slab_units (a released slab is an empty tensor
                no slot names)
    reprs:      slabs [slab_units, R, D], the representative keys, same slots
    slab_units: slots per slab
    """

    slots: torch.Tensor
    kv: list[torch.Tensor]
    reprs: list[torch.Tensor]
    slab_units: int

    def gather_kv(self, slots: torch.Tensor) -> torch.Tensor:
        """K/V of store slots [m] -> [m, Hkv, B, 2*D] (the torch ops' read)."""
        return _gather(self.kv, slots, self.slab_units)

    def gather_reprs(self, slots: torch.Tensor) -> torch.Tensor:
        """Representatives of store slots [m] -> [m, R, D]."""
        return _gather(self.reprs, slots, self.slab_units)


class UnitReadTally:
    """Unit reads: selected units, and of those, units read from the store (the pool cache's
    hit rate). A unit counts once per selection chunk (and per KV head with per-KV-head
    selection): the unit reads the kernels make, not one per query.

    Counting per layer would cost a dozen small ops per layer (~5 ms per decode step at 30
    layers on this CPU), so `add` only keeps the layer's selection (the ops allocate it per
    call) and `flush` counts every selection since the last flush in one pass per wave: the
    layers of a step share its chunks and slot table."""

    def __init__(self) -> None:
        self.selected = 0  # selected units counted so far
        self.from_store = 0  # of those, read from the store
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]] = []

    def add(self, selected: torch.Tensor, req: torch.Tensor, init_blocks: int, slots: torch.Tensor | None) -> None:
        """selected: [n, S, topk] unit ids (-1 = none), `select_units`/`hold_selections`;
        req: [n] the chunks' rows of the block table (and of `slots`); slots: the step's slot
        table (StoreView.slots), None when no unit is in the store."""
        self._pending.append((selected, req, init_blocks, slots))

    def flush(self) -> tuple[int, int]:
        """Count what `add` kept; returns the totals (selected, from_store)."""
        groups: dict[tuple[int, int], list] = {}
        # A wave's layers share its chunk rows and the step's slot table (the same tensors,
        # kept alive by _pending, so their ids cannot be reused before this pass).
        for item in self._pending:
            groups.setdefault((id(item[1]), id(item[3])), []).append(item)
        self._pending = []
        for items in groups.values():
            _, req, init_blocks, slots = items[0]
            selected = torch.cat([x[0] for x in items])  # [layers * n, S, topk]
            valid = selected >= 0
            self.selected += int(valid.sum())
            if slots is not None:
                rows = slots.index_select(0, req.long()).repeat(len(items), 1)  # [layers * n, width]
                blk = (init_blocks + selected.clamp(min=0)).flatten(1).long()
                in_store = rows.gather(1, blk).view_as(selected) >= 0
                self.from_store += int((valid & in_store).sum())
        return self.selected, self.from_store


def _gather(slabs: list[torch.Tensor], slots: torch.Tensor, per_slab: int) -> torch.Tensor:
    slots = slots.to(torch.long)
    live = next((s for s in slabs if s.numel()), None)
    if live is None:
        raise ValueError(f"StoreView: {slots.numel()} slots read from a store that holds no unit")
    out = live.new_empty(slots.shape[0], *live.shape[1:])
    slab, row = slots // per_slab, slots % per_slab
    for s in slab.unique().tolist():  # one index_select per slab the slots touch
        at = (slab == s).nonzero().squeeze(1)
        out[at] = slabs[s].index_select(0, row[at])
    return out


class UnitStore:
    """The offloaded units of every request of one worker, all layers.

    A unit leaves the pool for one slot (`allocate`), then each layer copies its K/V and
    representatives in (`write`). Slots come lowest first from slabs of `slab_units` units;
    a slab (its K/V and representatives for every layer) is allocated when no live slab has a
    free slot and released when its last unit leaves (`drop`), so memory follows the units held
    and returns to nothing when the requests are gone. `path`: keep the K/V slabs in files under
    this directory (sparse, memory-mapped, deleted on release) rather than in process memory;
    the representatives stay in memory either way.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, repr_rows: int,
                 dtype: torch.dtype, *, slab_units: int = 256, path: str | os.PathLike | None = None) -> None:
        if slab_units < 1:
            raise ValueError(f"UnitStore: slab_units={slab_units} must be >= 1 (e.g. 256)")
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"UnitStore: path={str(path)!r} is not a directory; create it, or leave path "
                             "out to keep offloaded units in process memory")
        self.num_layers, self.slab_units, self.dtype = num_layers, slab_units, dtype
        self.kv_shape = (num_kv_heads, block_size, 2 * head_dim)
        self.repr_shape = (repr_rows, head_dim)
        self.path = None if path is None else os.fspath(path)
        self._kv: list[list[torch.Tensor] | None] = []  # slab -> per layer [U, Hkv, B, 2D]
        self._reprs: list[list[torch.Tensor] | None] = []  # slab -> per layer [U, R, D]
        self._files: list[str | None] = []
        self._used: list[int] = []  # units held per slab
        self._free: list[int] = []  # heap of free slots of live slabs
        self._units: dict[Hashable, dict[int, int]] = {}  # request -> {logical block: slot}
        self._empty = torch.empty(0, dtype=dtype)
        self.units_offloaded_total = 0  # counters for the stats log

    # ---------------------------------------------------------------- bookkeeping

    @property
    def num_units(self) -> int:
        """Units held (slots in use)."""
        return sum(self._used)

    @property
    def num_slabs(self) -> int:
        return sum(s is not None for s in self._kv)

    @property
    def unit_nbytes(self) -> int:
        """Bytes of one unit: K/V and representatives, every layer."""
        return (_numel(self.kv_shape) + _numel(self.repr_shape)) * self.num_layers * self._empty.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of the live slabs (reserved; pages are touched only as units are written, so the
        memory used is nearer `num_units * unit_nbytes`; with `path` the K/V part is in files)."""
        return self.num_slabs * self.slab_units * self.unit_nbytes

    def requests(self) -> list[Hashable]:
        return list(self._units)

    def holds(self, req_id: Hashable) -> bool:
        """Whether the request has any unit in the store."""
        return bool(self._units.get(req_id))

    def units_of(self, req_id: Hashable) -> dict[int, int]:
        """{logical block: slot} of a request's offloaded units (a copy)."""
        return dict(self._units.get(req_id, {}))

    def allocate(self, req_id: Hashable, blocks: Sequence[int]) -> list[int]:
        """A slot for each of a request's logical blocks `blocks` (not yet held); returns them.
        Fill them with `write` for every layer before a step reads them."""
        blocks = [int(b) for b in blocks]
        held = self._units.get(req_id, {})
        twice = sorted({b for b in blocks if b in held or blocks.count(b) > 1})
        if twice:  # checked before any slot is taken
            raise ValueError(f"UnitStore: request {req_id!r} already holds logical block(s) {twice}")
        held = self._units.setdefault(req_id, {})
        slots = []
        for blk in blocks:
            slot = self._take_slot()
            held[blk] = slot
            slots.append(slot)
        self.units_offloaded_total += len(slots)
        return slots

    def drop(self, req_id: Hashable) -> int:
        """Forget every unit of a request (finished, aborted or preempted); releases slabs that
        empty. Returns the units freed (0 for a request the store does not know)."""
        held = self._units.pop(req_id, None)
        if not held:
            return 0
        for slot in held.values():
            s = slot // self.slab_units
            self._used[s] -= 1
            heapq.heappush(self._free, slot)
            if self._used[s] == 0:
                self._release(s)
        return len(held)

    def _take_slot(self) -> int:
        if not self._free:
            self._grow()
        slot = heapq.heappop(self._free)
        self._used[slot // self.slab_units] += 1
        return slot

    def _grow(self) -> None:
        s = next((i for i, kv in enumerate(self._kv) if kv is None), len(self._kv))
        if s == len(self._kv):
            self._kv.append(None)
            self._reprs.append(None)
            self._files.append(None)
            self._used.append(0)
        U, L = self.slab_units, self.num_layers
        kv_numel = U * _numel(self.kv_shape)
        if self.path is None:
            flat = torch.empty(L * kv_numel, dtype=self.dtype)
        else:  # a sparse file: pages are written (and take disk) only as units arrive
            name = os.path.join(self.path, f"infllm-store-{os.getpid()}-{id(self):x}-slab{s}.bin")
            flat = torch.from_file(name, shared=True, size=L * kv_numel, dtype=self.dtype)
            self._files[s] = name
        self._kv[s] = [flat[i * kv_numel : (i + 1) * kv_numel].view(U, *self.kv_shape) for i in range(L)]
        self._reprs[s] = [torch.empty(U, *self.repr_shape, dtype=self.dtype) for _ in range(L)]
        for slot in range(s * U, (s + 1) * U):
            heapq.heappush(self._free, slot)

    def _release(self, s: int) -> None:
        self._kv[s] = self._reprs[s] = None
        if self._files[s] is not None:
            os.unlink(self._files[s])  # the mapping goes with the last view of it
            self._files[s] = None
        lo, hi = s * self.slab_units, (s + 1) * self.slab_units
        self._free = [x for x in self._free if not lo <= x < hi]
        heapq.heapify(self._free)

    # ---------------------------------------------------------------- data

    def write(self, layer: int, slots: Sequence[int], kv_cache: torch.Tensor, reprs: torch.Tensor,
              blocks: Sequence[int]) -> None:
        """Copy physical blocks `blocks` of one layer's pool (kv_cache [num_blocks, Hkv, B, 2D],
        reprs [num_blocks, R, D], any strides) into `slots`: one gather and one scatter per slab."""
        if len(slots) != len(blocks):
            raise ValueError(f"UnitStore.write: {len(slots)} slots for {len(blocks)} blocks")
        if not slots:
            return
        slot_t = torch.tensor(slots, dtype=torch.long)
        src = torch.tensor(blocks, dtype=torch.long, device=kv_cache.device)
        slab, row = slot_t // self.slab_units, slot_t % self.slab_units
        for s in slab.unique().tolist():
            at = (slab == s).nonzero().squeeze(1)
            pick = src[at.to(src.device)]
            self._kv[s][layer].index_copy_(0, row[at], kv_cache.index_select(0, pick).to("cpu", self.dtype))
            self._reprs[s][layer].index_copy_(0, row[at], reprs.index_select(0, pick).to("cpu", self.dtype))

    def slot_table(self, req_ids: Sequence[Hashable | None], width: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """[len(req_ids), width] int32: row i holds request req_ids[i]'s slots by logical block,
        -1 for blocks in the pool (and for a None or unknown request): the twin of a block table
        whose rows are these requests."""
        table = torch.full((len(req_ids), width), -1, dtype=torch.int32)
        for i, rid in enumerate(req_ids):
            held = self._units.get(rid) if rid is not None else None
            if held:
                blocks = [b for b in held if b < width]
                table[i, blocks] = torch.tensor([held[b] for b in blocks], dtype=torch.int32)
        return table.to(device)

    def view(self, layer: int, slots: torch.Tensor) -> StoreView:
        """Layer `layer`'s view for the ops, with a slot table from `slot_table` (one per step,
        shared by the layers)."""
        kv = [self._empty if s is None else s[layer] for s in self._kv]
        reprs = [self._empty if s is None else s[layer] for s in self._reprs]
        return StoreView(slots, kv, reprs, self.slab_units)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n
