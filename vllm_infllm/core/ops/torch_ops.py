"""Paged InfLLM ops in plain torch: the CPU path, and the reference the Triton kernels must match.

Four ops, driven wave by wave by `core.runtime.infllm_forward` (docs/design.md section 3.4):
  write_kv      scatter new K/V into the paged cache; reset side state of blocks started afresh
  seal_units    compute representative keys of units that just became candidates
  select_units  score candidate units against the chunk's mean query, keep the topk
                (select_units_exact: retrieval_layer's exact score over every key)
  attend        local window + (init, selected units, remainder) in one softmax; accumulate the
                fp32 representative scores of local keys

All arithmetic is fp32. Work is tiled so temporaries stay bounded (vLLM does not count them).
"""

from __future__ import annotations

import torch

from ..config import InfLLMConfig
from ..offload import StoreView
from ..plan import ChunkBatch, LayerMemory
from ..rope import global_query_shift, rotate, rotate_rows
from .ranking import hold_selections as hold_selections  # the op of every module (chunking="aligned")
from .ranking import top_units

# Upper bound on elements of one padded logits tensor (tiles x heads x queries x keys).
#: Decode-sized steps run these ops on one thread (core.runtime._cpu_threads): dozens of small
#: torch ops per layer each pay an OpenMP fork/join. The native kernels fork once per layer and
#: take every thread, so they do not ask for it.
SMALL_STEPS_ON_ONE_THREAD = True

_LOGITS_BUDGET = 1 << 24
_QUERY_TILE = 128


def write_kv(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    memory: LayerMemory | None,
) -> None:
    """kv_cache[block, :, offset] = (K, V) for every slot >= 0; slot = block * B + offset.

    kv_cache:      [num_blocks, Hkv, B, 2*D] (K then V; any strides)
    key, value:    [>= T, Hkv, D] post-RoPE keys and values (rows past T are ignored)
    slot_mapping:  [T] int, -1 = padding (skipped)
    memory:        side state whose blocks written at offset 0 are reset (None: no reset)
    """
    B, D = kv_cache.shape[2], key.shape[-1]
    n = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.long)
    valid = slots >= 0
    slots = slots[valid]
    blk, off = slots // B, slots % B
    kv_cache[blk, :, off, :D] = key[:n][valid].to(kv_cache.dtype)
    kv_cache[blk, :, off, D:] = value[:n][valid].to(kv_cache.dtype)
    if memory is not None:
        # A block written from offset 0 holds a new sequence's tokens: forget its old state.
        fresh = blk[off == 0]
        memory.scores[fresh] = 0.0
        memory.sealed[fresh] = False


def seal_units(
    kv_cache: torch.Tensor,
    memory: LayerMemory,
    block_table: torch.Tensor,
    chunks: ChunkBatch,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: InfLLMConfig,
) -> None:
    """Seal every not-yet-sealed unit among each chunk's candidates: its representative keys
    become the mean raw key of its `repr_topk` top-scored tokens, per query head
    (unit_score="minmax": the per-channel min and max of its raw keys, per KV head;
    unit_score="max_topk": those repr_topk raw keys themselves, most-attended first;
    unit_score="exact": nothing, only the flag).

    kv_cache:     [num_blocks, Hkv, B, 2*D]
    memory:       reads `scores` [num_blocks, Hq, B], writes `reprs` [num_blocks, Hq, D], `sealed`
    block_table:  [num_reqs, max_blocks] int
    cos, sin:     [rows, D/2] rotary table (rows > every sealed token's position)

    Only the last `chunk // B + 2` candidates can be unsealed: the previous chunk of the request
    (this step or an earlier one) sealed all units that were candidates at its start, at most
    `chunk` positions earlier.
    """
    B, Hq = config.block_size, memory.scores.shape[1]
    Hkv, D = kv_cache.shape[1], kv_cache.shape[3] // 2
    window = config.chunk // B + 2
    units = chunks.num_cand[:, None] - window + torch.arange(window, device=chunks.req.device)
    phys = block_table[chunks.req[:, None], config.init_blocks + units.clamp(min=0)].to(torch.long)
    need = (units >= 0) & ~memory.sealed[phys]
    phys, units = phys[need], units[need]
    if phys.numel() == 0:
        return
    if config.unit_score == "exact":  # scored from its keys: nothing to store
        memory.sealed[phys] = True
        return
    if config.unit_score in ("minmax", "sketch"):  # per KV head: per-channel min and max of the raw keys
        pos = config.n_init + units[:, None, None] * B + torch.arange(B, device=phys.device)[:, None]
        raw = rotate(kv_cache[phys, :, :, :D].transpose(1, 2), cos, sin, -pos)  # [m, B, Hkv, D]
        box = torch.stack((raw.amin(1), raw.amax(1)), dim=2).to(memory.reprs.dtype)  # [m, Hkv, 2, D]
        memory.reprs[phys, : 2 * Hkv] = box.view(-1, 2 * Hkv, D)
        if config.unit_score == "sketch":  # the codes, relative to the box as stored
            lo, hi = box.float().unsqueeze(1).unbind(3)  # [m, 1, Hkv, D]
            step = (hi - lo) / 15
            code = torch.where(step > 0, (raw - lo) / step, 0.0).round_().clamp_(0, 15).to(torch.uint8)
            half = D // 2
            packed = (code[..., :half] | (code[..., half:] << 4)).transpose(1, 2)  # [m, Hkv, B, D/2]
            codes = _sketch_bytes(memory.reprs, Hkv)  # a byte view of reprs' code rows
            codes[phys] = packed.reshape(len(phys), *codes.shape[1:])
        memory.sealed[phys] = True
        return
    top = memory.scores[phys].topk(config.repr_topk, dim=-1).indices  # [m, Hq, r]
    kv_head = (torch.arange(Hq, device=phys.device) // (Hq // Hkv))[None, :, None]
    keys = kv_cache[phys[:, None, None], kv_head, top, :D]  # [m, Hq, r, D]
    pos = config.n_init + units[:, None, None] * B + top
    raw = rotate(keys, cos, sin, -pos)  # undo the model's RoPE: representatives are raw keys
    if config.unit_score == "max_topk":  # kept apart: rows h*r .. h*r + r-1 of the unit
        memory.reprs[phys] = raw.flatten(1, 2).to(memory.reprs.dtype)
    else:
        memory.reprs[phys] = raw.mean(dim=2).to(memory.reprs.dtype)
    memory.sealed[phys] = True


def _chunk_mean_query(query, chunks: ChunkBatch, cos, sin, config: InfLLMConfig):
    """q̄ = mean over the chunk (select_queries=m: its last m queries; chunking="aligned": its
    first query) of R(n_local-1)·q_raw = R(n_local-1-p)·q(p); [n, Hq*D] fp32."""
    key = ("qbar", cos.data_ptr())
    geo = chunks.scratch.get(key)
    if geo is None:  # layer-independent: rows, RoPE rows and weights, once per step
        L = chunks.max_len
        i = torch.arange(L, device=query.device)
        valid = i[None, :] < chunks.length[:, None]
        used = chunks.length
        if config.chunking == "aligned":  # the first query alone (every schedule has it)
            used = used.clamp(max=1)
            valid &= i[None, :] < 1
        elif config.select_queries:  # only the chunk's last m queries select
            used = used.clamp(max=config.select_queries)
            valid &= i[None, :] >= (chunks.length - used)[:, None]
        rows = torch.where(valid, chunks.q0[:, None] + i, chunks.q0[:, None])
        shift = global_query_shift(chunks.c0[:, None] + i, config.n_local)
        sign = torch.where(shift < 0, -1.0, 1.0)[..., None, None]
        c = cos.index_select(0, shift.abs().flatten()).view(-1, L, 1, cos.shape[1]).float()
        s = sin.index_select(0, shift.abs().flatten()).view(-1, L, 1, sin.shape[1]).float() * sign
        weight = (valid / used[:, None]).float()[..., None, None]  # mean over the selecting rows
        geo = chunks.scratch[key] = (rows.flatten(), c, s, weight, L)
    rows, c, s, weight, L = geo
    q = query.index_select(0, rows).float()
    q = rotate_rows(q.view(-1, L, *q.shape[1:]), c, s)  # [n, L, Hq, D]
    if L > 1:
        q = (q * weight).sum(1)
    else:
        q = q[:, 0]
    return q.flatten(1)


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
    """The topk candidates of each chunk and selection group by sum_h <q̄_h, r_{U,h}>
    (unit_score="minmax": by sum_h sum_d max(q̄_hd lo_d, q̄_hd hi_d), lo/hi of h's KV head;
    unit_score="max_topk": by sum_h max_i <q̄_h, r_{U,h,i}> over h's repr_topk keys).

    query:        [T, Hq, D] post-RoPE
    memory:       reads `reprs` [num_blocks, R, D] (R = config.repr_rows(Hq, Hkv))
    num_kv_heads: Hkv of the layer (query head h belongs to KV head h // (Hq / Hkv))
    store:        offloaded units (core/offload.py): a candidate with a store slot is scored by
                  the store's representatives, not the pool block's
    returns:      [n, S, topk] int64 memory-unit ids (not block ids), ascending, then -1 = none;
                  S = config.selection_groups(Hkv): 1 (one set for the layer, h over all query
                  heads) or Hkv (group g: the G query heads of KV head g)
    """
    n, topk, max_k = chunks.n, config.topk, chunks.max_cand
    device = query.device
    Hq, D = query.shape[1], query.shape[2]
    S = config.selection_groups(num_kv_heads)
    selected = torch.full((n, S, topk), -1, dtype=torch.long, device=device)
    if max_k == 0:
        return selected
    units = torch.arange(max_k, device=device)
    if max_k <= topk:  # every chunk takes all its candidates
        selected[:, :, :max_k] = torch.where(units < chunks.num_cand[:, None], units, -1)[:, None]
        return selected
    if config.unit_score == "sketch":
        score = sketch_unit_scores(query, memory, block_table, chunks, cos, sin, config, num_kv_heads, store=store)
        return top_units(score, chunks.num_cand, config)
    q_bar = _chunk_mean_query(query, chunks, cos, sin, config).view(n, S, -1, 1)  # [n, S, X/S, 1]
    ragged = min(chunks.host["num_cand"]) < max_k
    step = max(1, _LOGITS_BUDGET // (max_k * max(Hq, memory.reprs.shape[1]) * D))  # gathered reprs
    for s in range(0, n, step):
        e = min(n, s + step)
        phys = block_table[chunks.req[s:e], config.init_blocks : config.init_blocks + max_k]
        reprs = memory.reprs.index_select(0, phys.flatten().to(torch.long)).float()  # [m*K, R, D]
        if store is not None:  # offloaded candidates: the store's copy (the pool block is stale)
            slot = store.slots[chunks.req[s:e], config.init_blocks : config.init_blocks + max_k].flatten()
            at = (slot >= 0).nonzero().squeeze(1)
            if at.numel():
                reprs[at] = store.gather_reprs(slot[at]).float()
        if config.unit_score == "minmax":  # Quest: sum_d max(q̄ lo, q̄ hi) per query head
            Hkv = num_kv_heads
            box = reprs.view(e - s, max_k, Hkv, 1, 2, D)
            qb = q_bar[s:e].view(e - s, 1, Hkv, Hq // Hkv, D)
            per_head = torch.maximum(qb * box[..., 0, :], qb * box[..., 1, :]).sum(-1)  # [m, K, Hkv, G]
            score = per_head.view(e - s, max_k, S, -1).sum(-1).transpose(1, 2)  # [m, S, K]
        elif config.unit_score == "max_topk":  # per query head: its best key of the unit
            keys = reprs.view(e - s, max_k, Hq, config.repr_topk, D)
            qh = q_bar[s:e].view(e - s, 1, Hq, D, 1)
            per_head = torch.matmul(keys, qh).squeeze(-1).amax(-1)  # [m, K, Hq]
            score = per_head.view(e - s, max_k, S, -1).sum(-1).transpose(1, 2)  # [m, S, K]
        else:
            # [m, K, S, X/S] -> [m, S, K, X/S]: group g's heads are the contiguous run g*Hq/S ...
            reprs = reprs.view(e - s, max_k, S, -1).transpose(1, 2)
            score = torch.matmul(reprs, q_bar[s:e]).squeeze(3)  # [m, S, K]
        if ragged:  # pad slots of chunks with fewer candidates (their block ids may be stale)
            score.masked_fill_(units >= chunks.num_cand[s:e, None, None], float("-inf"))
        selected[s:e] = top_units(score, chunks.num_cand[s:e], config)
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
    """unit_score="exact" and config.retrieval_layer's selection (docs/design.md section 2.7):
    the topk candidates of each chunk and selection group by the exact score
    sum_h max_k <q̄_h, k_raw> over every raw key k of the unit (of h's KV head), ranked as
    `select_units` ranks.

    No representatives: every candidate's keys are read from the cache (from `store` for an
    offloaded unit) and un-rotated, a slice of units at a time. Arguments and result as
    `select_units`, with the layer's `kv_cache` [num_blocks, Hkv, B, 2*D] instead of its memory.
    """
    n, topk, max_k, device = chunks.n, config.topk, chunks.max_cand, query.device
    selected = torch.full((n, config.selection_groups(num_kv_heads), topk), -1, dtype=torch.long, device=device)
    if max_k == 0:
        return selected
    if max_k <= topk:  # every chunk takes all its candidates
        units = torch.arange(max_k, device=device)
        selected[:, :, :max_k] = torch.where(units < chunks.num_cand[:, None], units, -1)[:, None]
        return selected
    score = exact_unit_scores(query, kv_cache, block_table, chunks, cos, sin, config, num_kv_heads, store=store)
    return top_units(score, chunks.num_cand, config)


def exact_unit_scores(
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
    sketch_bits: int = 0,
) -> torch.Tensor:
    """The exact score of every candidate, [n, S, max_cand] fp32 (-inf past a chunk's
    candidates): what `select_units_exact` ranks (the retrieval probes read it too).

    sketch_bits b > 0 (a study: `passkey_probe.py --sketch-bits`): score each raw key's b-bit
    sketch instead, lo + code * (hi - lo) / (2^b - 1) with lo/hi the per-channel min and max of
    the unit's raw keys of that KV head (minmax's box) and code the nearest step, computed from
    the keys on the fly (unit_score="sketch" stores the 4-bit one: `sketch_unit_scores`)."""
    B, D = config.block_size, query.shape[2]
    half = D // 2
    offsets = torch.arange(B, device=query.device)
    key_rows = kv_cache[..., :D]  # a view: index_select copies the keys only

    def raw_halves(req: int, u0: int, u1: int) -> tuple[torch.Tensor, torch.Tensor]:
        logical = torch.arange(config.init_blocks + u0, config.init_blocks + u1, device=query.device)
        keys = key_rows.index_select(0, block_table[req, logical].long())  # [m, Hkv, B, D]
        if store is not None:  # offloaded units: the store's copy (the pool block is stale)
            slot = store.slots[req, logical]
            at = (slot >= 0).nonzero().squeeze(1)
            if at.numel():
                keys[at] = store.gather_kv(slot[at])[..., :D].to(keys.dtype)
        keys = keys.float()
        pos = (config.n_init + torch.arange(u0, u1, device=query.device)[:, None] * B + offsets).flatten()
        c = cos.index_select(0, pos).float().view(u1 - u0, 1, B, half)
        s_ = sin.index_select(0, pos).float().view(u1 - u0, 1, B, half)
        k1, k2 = keys[..., :half], keys[..., half:]
        # the raw key R(-j) k in NeoX halves, (k1 c + k2 s, k2 c - k1 s): the whole un-rotated
        # key is never materialised
        raw1 = torch.addcmul(k1 * c, k2, s_)
        raw2 = torch.addcmul(k2 * c, k1, s_, value=-1.0)
        if sketch_bits:
            raw1, raw2 = _sketch(raw1, sketch_bits), _sketch(raw2, sketch_bits)
        return raw1, raw2

    return _best_key_scores(query, chunks, cos, sin, config, num_kv_heads, raw_halves)


def sketch_unit_scores(
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
    """unit_score="sketch": every candidate's score from the sketch its sealing stored, [n, S,
    max_cand] fp32 (-inf past a chunk's candidates): the box rows and the 4-bit codes of
    `memory.reprs` (the store's copy for an offloaded unit) decoded to lo + code * (hi - lo) / 15
    per KV head and channel, then ranked by the best dot as the exact score is."""
    B, D, Hkv = config.block_size, query.shape[2], num_kv_heads
    half = D // 2

    def sketch_halves(req: int, u0: int, u1: int) -> tuple[torch.Tensor, torch.Tensor]:
        logical = torch.arange(config.init_blocks + u0, config.init_blocks + u1, device=query.device)
        rows = memory.reprs.index_select(0, block_table[req, logical].long())  # [m, R, D]
        if store is not None:
            slot = store.slots[req, logical]
            at = (slot >= 0).nonzero().squeeze(1)
            if at.numel():
                rows[at] = store.gather_reprs(slot[at]).to(rows.dtype)
        m = u1 - u0
        box = rows[:, : 2 * Hkv].float().view(m, Hkv, 2, 1, D)
        lo, step = box[:, :, 0], (box[:, :, 1] - box[:, :, 0]) / 15  # [m, Hkv, 1, D]
        codes = _sketch_bytes(rows, Hkv).reshape(m, Hkv, B, half)
        k1 = torch.addcmul(lo[..., :half], (codes & 15).float(), step[..., :half])
        k2 = torch.addcmul(lo[..., half:], (codes >> 4).float(), step[..., half:])
        return k1, k2

    return _best_key_scores(query, chunks, cos, sin, config, num_kv_heads, sketch_halves)


def _sketch_bytes(reprs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The code rows of reprs [..., R, D] (unit_score="sketch": after the 2*Hkv box rows) as a
    byte view [..., R - 2*Hkv, D * element size] (written through by sealing)."""
    return reprs[..., 2 * num_kv_heads :, :].view(torch.uint8)


def _best_key_scores(query, chunks: ChunkBatch, cos, sin, config: InfLLMConfig, num_kv_heads: int,
                     halves_of) -> torch.Tensor:
    """sum over each selection group's query heads h of max_k <q̄_h, k>, [n, S, max_cand] fp32
    (-inf past a chunk's candidates), with the keys of units [u0, u1) of block-table row `req`
    given by halves_of(req, u0, u1) as fp32 NeoX halves [m, Hkv, B, D/2] each."""
    n, max_k, device = chunks.n, chunks.max_cand, query.device
    Hq, D = query.shape[1], query.shape[2]
    B, Hkv = config.block_size, num_kv_heads
    S = config.selection_groups(Hkv)
    half = D // 2
    # q̄'s NeoX halves as [n, Hkv, D/2, G] matmul operands (query head h = g * G + i)
    q_bar = _chunk_mean_query(query, chunks, cos, sin, config).view(n, Hkv, Hq // Hkv, D).transpose(2, 3)
    q1, q2 = q_bar[:, :, :half], q_bar[:, :, half:]
    score = torch.full((n, S, max_k), float("-inf"), device=device)  # -inf: not a candidate
    step = max(1, _LOGITS_BUDGET // 4 // (B * Hkv * D))  # units whose keys are held at once
    for j, (req, nc) in enumerate(zip(chunks.host["req"], chunks.host["num_cand"], strict=True)):
        for u0 in range(0, nc, step):
            u1 = min(nc, u0 + step)
            k1, k2 = halves_of(req, u0, u1)
            dots = torch.matmul(k1, q1[j]).add_(torch.matmul(k2, q2[j]))  # [m, Hkv, B, G]
            best = dots.amax(2)  # [m, Hkv, G]: each query head's best key of each unit
            score[j, :, u0:u1] = best.reshape(u1 - u0, S, -1).sum(-1).T
    return score


def _sketch(raw: torch.Tensor, bits: int) -> torch.Tensor:
    """raw [m, Hkv, B, c] keys rounded to `bits`-bit codes between each channel's min and max
    over the unit's B keys (`exact_unit_scores`' sketch_bits)."""
    lo, hi = raw.amin(2, keepdim=True), raw.amax(2, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    code = torch.where(step > 0, (raw - lo) / step, 0.0).round_()
    return lo + code * step


def _tiles(chunks: ChunkBatch):
    """Split chunks into query tiles: (chunk index, first query offset, tile length)."""
    for j, length in enumerate(chunks.host["length"]):
        for s in range(0, length, _QUERY_TILE):
            yield j, s, min(_QUERY_TILE, length - s)


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

    query:        [T, Hq, D] post-RoPE
    kv_cache:     [num_blocks, Hkv, B, 2*D] with this step's K/V written
    memory:       `scores` [num_blocks, Hq, B] gain the local softmax mass (config.accumulates_scores)
    selected:     [n, S, topk] unit ids from `select_units` (-1 = none; S = 1: the same units for
                  every KV head, S = Hkv: KV head g reads row g), or None when topk == 0
    out:          [T, Hq, D]; only the wave's query rows are written
    softcap:      logits s -> softcap * tanh(s / softcap) before the softmax (0: none)
    sinks:        [Hq] one logit per query head added to the softmax's denominator (None: none)
    store:        offloaded units (core/offload.py): a selected unit with a store slot is read
                  from the store (only selected units can be offloaded: `offloadable_units`)
    """
    tiles = list(_tiles(chunks))
    Hq = query.shape[1]
    span = config.n_local + _QUERY_TILE + config.max_attended() + 2 * config.block_size
    group = max(1, _LOGITS_BUDGET // (Hq * min(_QUERY_TILE, chunks.max_len) * span))
    for s in range(0, len(tiles), group):
        _attend_tiles(query, kv_cache, memory, block_table, chunks, selected, cos, sin, config,
                      scale, out, tiles[s : s + group], softcap, sinks, store)


def _gather_blocks(kv_cache, phys, n, slots=None, store=None):
    """Whole KV blocks -> K, V [Hkv, n, m*B, D] fp32 (strided views of one copy).

    phys: [n*m] block ids read by every KV head, or [1 | Hkv, n*m] (one row per KV head).
    slots, store: the blocks' store slots, shaped as phys (-1 = in the pool), and the store
    (StoreView) that holds those with a slot: their rows are overwritten with the store's copy.

    index_select copies whole blocks (contiguous rows of the cache), far cheaper on CPU than
    gathering token by token; the head-major copy makes (Hkv, n) one batch axis for bmm.
    Positions a query must not see are masked by the caller: vLLM zero-fills the cache and
    recycled blocks hold old finite K/V, so the arithmetic on masked slots stays finite.
    """
    Hkv, B, D2 = kv_cache.shape[1:]
    phys = phys.view(1, -1) if phys.dim() == 1 else phys
    m = phys.shape[1] // n
    kv = kv_cache.new_empty(Hkv, n * m, B, D2)
    for h in range(Hkv):  # per head: whole-row copies straight into the head-major layout
        torch.index_select(kv_cache[:, h], 0, phys[h % phys.shape[0]], out=kv[h])
    if slots is not None:
        for h in range(Hkv):
            if h < slots.shape[0]:  # one row for every head, or one per head
                at = (slots[h] >= 0).nonzero().squeeze(1)
                rows = store.gather_kv(slots[h][at]) if at.numel() else None
            if rows is not None:
                kv[h].index_copy_(0, at, rows[:, h])
    kv = kv.float().view(Hkv, n, m * B, D2)
    return kv[..., : D2 // 2], kv[..., D2 // 2 :]


def _tile_geometry(chunks: ChunkBatch, tiles, block_table, cos, sin, config, G):
    """Everything about a tile group that does not depend on the layer: query rows, local
    window blocks and mask, init/remainder blocks with their mask and RoPE rows, the query's
    global re-rotation. Computed at the first layer of a step, reused by the others.
    """
    device = block_table.device
    B, n_init, n_local = config.block_size, config.n_init, config.n_local
    n = len(tiles)
    host_c0, host_cand = chunks.host["c0"], chunks.host["num_cand"]

    # Host-side extents: local blocks [w(first query) // B, last query // B]; remainder blocks
    # from R0 = n_init + num_cand*B up to w(last query).
    Qt = max(t[2] for t in tiles)
    lo_blk, n_loc_blk, n_rem_blk = [], 0, 0
    for jj, f, L in tiles:
        p0, p1 = host_c0[jj] + f, host_c0[jj] + f + L - 1
        lo_blk.append(config.window_start(p0) // B)
        n_loc_blk = max(n_loc_blk, p1 // B - lo_blk[-1] + 1)
        rem = config.window_start(p1) - (n_init + host_cand[jj] * B)
        n_rem_blk = max(n_rem_blk, -(-rem // B))

    j = torch.tensor([t[0] for t in tiles], device=device)
    first = torch.tensor([t[1] for t in tiles], device=device)
    tlen = torch.tensor([t[2] for t in tiles], device=device)
    req, c0 = chunks.req[j], chunks.c0[j]
    i = torch.arange(Qt, device=device)
    qvalid = i[None, :] < tlen[:, None]  # [n, Qt]
    # Rows past a tile's length repeat its last query (no empty softmax rows); they are
    # dropped when writing `out` and weighted 0 in the representative scores.
    i_eff = torch.minimum(i[None, :], tlen[:, None] - 1)
    pos = c0[:, None] + first[:, None] + i_eff  # [n, Qt]
    rows = (chunks.q0[j][:, None] + first[:, None] + i_eff).flatten()
    win = (pos - n_local + 1).clamp(min=0)  # w(p)
    all_valid = all(t[2] == Qt for t in tiles)
    valid_idx = None if all_valid else qvalid.flatten().nonzero().squeeze(1)
    bt = block_table.index_select(0, req).to(torch.long)  # [n, max_blocks]
    last_blk = bt.shape[1] - 1

    def fold_mask(m):  # [n, Qt, L] -> [1, n, G*Qt, L] (the G heads of a KV head share it)
        return m[:, None].expand(n, G, Qt, m.shape[-1]).reshape(1, n, G * Qt, m.shape[-1])

    # Local window, causal and windowed per query.
    lblk = torch.tensor(lo_blk, device=device)[:, None] + torch.arange(n_loc_blk, device=device)
    lpos = (lblk[:, :, None] * B + torch.arange(B, device=device)).flatten(1)  # [n, Lloc]
    lmask = (lpos[:, None, :] >= win[..., None]) & (lpos[:, None, :] <= pos[..., None])

    # Global keys fixed for the step: init blocks, then remainder blocks [R0, w(p)).
    fblks = [torch.arange(config.init_blocks, device=device).expand(n, -1)]
    if n_rem_blk:
        fblks.append(config.init_blocks + chunks.num_cand[j][:, None] + torch.arange(n_rem_blk, device=device))
    fblk = torch.cat(fblks, dim=1)  # [n, F] logical
    fpos = (fblk[:, :, None] * B + torch.arange(B, device=device)).flatten(1)
    fmask = fpos[:, None, :] < win[..., None]
    # positions="ordered": each global block is rotated forward by a whole number of blocks,
    # the gap that removing the unselected candidates closes (docs/design.md section 2.7): init
    # by (K - nsel)*B, the remainder by 0. Units: see _attend_tiles.
    cand = chunks.num_cand[j].long()
    nsel = cand.clamp(max=config.topk)
    fshift = torch.zeros_like(fblk)
    fshift[:, : config.init_blocks] = ((cand - nsel) * B)[:, None]

    shift = global_query_shift(pos, n_local)  # R(n_local-1-p): q(p) -> R(n_local-1) q_raw
    sign = torch.where(shift < 0, -1.0, 1.0)[..., None]
    qc = cos.index_select(0, shift.abs().flatten()).view(n, 1, Qt, -1).float()
    qs = sin.index_select(0, shift.abs().flatten()).view(n, 1, Qt, -1).float() * sign.view(n, 1, Qt, 1)
    rows_in_table = cos.shape[0] // B
    return dict(
        n=n, Qt=Qt, chunk_of_tile=j, rows=rows, valid_idx=valid_idx,
        rows_valid=rows if all_valid else rows[valid_idx],
        req=req, bt=bt, num_cand_min=min(host_cand[t[0]] for t in tiles),
        loc_phys=bt.gather(1, lblk.clamp(max=last_blk)).flatten(), n_loc_blk=n_loc_blk,
        loc_masked=~fold_mask(lmask),
        fix_blk=fblk, fix_phys=bt.gather(1, fblk.clamp(max=last_blk)), fix_masked=~fold_mask(fmask),
        fix_shift=fshift, cand=cand, nsel=nsel,
        q_cos=qc, q_sin=qs,  # [n, 1, Qt, D/2], broadcast over [Hkv, n, G, Qt, D/2]
        cos_blocks=cos[: rows_in_table * B].view(rows_in_table, B, -1),
        sin_blocks=sin[: rows_in_table * B].view(rows_in_table, B, -1),
        table_last_blk=rows_in_table - 1,
        mass_weight=qvalid.float()[None, :, None, None, :],  # [1, n, 1, 1, Qt]
    )


def _softcap_(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """s -> softcap * tanh(s / softcap), in place (before masking: tanh(-inf) is -1)."""
    return s.div_(softcap).tanh_().mul_(softcap) if softcap else s


def _attend_tiles(query, kv_cache, memory, block_table, chunks, selected, cos, sin, config,
                  scale, out, tiles, softcap=0.0, sinks=None, store=None) -> None:
    """One softmax per query over its local window and its global keys (init, selected units,
    remainder [R0, w(p)), all at relative distance n_local-1), on whole gathered blocks.
    """
    B = config.block_size
    Hq, D = query.shape[1], query.shape[2]
    Hkv = kv_cache.shape[1]
    G = Hq // Hkv
    key = ("tiles", tiles[0][0], tiles[0][1], len(tiles), G, D, block_table.data_ptr(), cos.data_ptr())
    geo = chunks.scratch.get(key)
    if geo is None:
        geo = chunks.scratch[key] = _tile_geometry(chunks, tiles, block_table, cos, sin, config, G)
    n, Qt = geo["n"], geo["Qt"]

    # Queries, folded so the G query heads of a KV head share its K/V: [Hkv, n, G, Qt, D].
    q = query.index_select(0, geo["rows"]).view(n, Qt, Hkv, G, D).permute(2, 0, 3, 1, 4)
    q = q.float().contiguous().mul_(scale)
    ordered = config.positions == "ordered"
    # fixed: R(n_local-1) q_raw against raw keys; ordered: the query as stored, against keys
    # moved forward by whole blocks (relative distances are all that RoPE sees).
    q_glob = q if ordered else rotate_rows(q, geo["q_cos"], geo["q_sin"])
    q, q_glob = q.view(Hkv, n, G * Qt, D), q_glob.reshape(Hkv, n, G * Qt, D)

    # Local window, causal and windowed per query.
    k_loc, v_loc = _gather_blocks(kv_cache, geo["loc_phys"], n)
    s_loc = _softcap_(torch.matmul(q, k_loc.transpose(-1, -2)), softcap)
    s_loc.masked_fill_(geo["loc_masked"], float("-inf"))

    # Global keys: init + remainder blocks (fixed for the step), then this layer's selection:
    # one set for all KV heads (S = 1) or one per KV head (S = Hkv), as [S, n, blocks].
    blk, phys, shift = geo["fix_blk"][None], geo["fix_phys"][None], geo["fix_shift"][None]
    slots = None  # store slots of the global blocks (init and remainder are always in the pool)
    units = selected[geo["chunk_of_tile"]] if (selected is not None and config.topk > 0) else None
    if units is not None:
        units = units.transpose(0, 1)  # [S, n, topk], ascending per row, then -1
        S = units.shape[0]
        ublk = config.init_blocks + units.clamp(min=0)
        uphys = geo["bt"][None].expand(S, -1, -1).gather(2, ublk)
        blk = torch.cat((blk.expand(S, -1, -1), ublk), 2)
        phys = torch.cat((phys.expand(S, -1, -1), uphys), 2)
        if store is not None:
            # Empty slots (-1, masked) read unit 0 as the pool path does: from the store when
            # it left the pool, whose block may now hold anything, even NaN.
            uslot = store.slots.index_select(0, geo["req"]).long()[None].expand(S, -1, -1).gather(2, ublk)
            slots = torch.cat((torch.full_like(geo["fix_phys"][None], -1).expand(S, -1, -1), uslot), 2)
        if ordered:  # the unit of rank k moves forward by (K - nsel + k - u) blocks (>= 0)
            rank = torch.arange(units.shape[2], device=units.device)
            ushift = (geo["cand"][:, None] - geo["nsel"][:, None] + rank - units) * config.block_size
            ushift = torch.where(units >= 0, ushift, 0)
            shift = torch.cat((shift.expand(S, -1, -1), ushift), 2)
    s_glob = v_glob = None
    if blk.shape[2]:
        k_glob, v_glob = _gather_blocks(kv_cache, phys.flatten(1), n,
                                        None if slots is None else slots.flatten(1), store)
        if ordered:  # one rotation row per block: R(shift), a whole number of blocks
            rows = shift.flatten()
            c = cos.index_select(0, rows).float().view(*shift.shape, 1, D // 2)
            sn = sin.index_select(0, rows).float().view(*shift.shape, 1, D // 2)
            c = c.expand(-1, -1, -1, B, -1).reshape(shift.shape[0], n, -1, D // 2)
            sn = sn.expand(-1, -1, -1, B, -1).reshape(shift.shape[0], n, -1, D // 2)
            k_glob = rotate_rows(k_glob, c, sn)
        else:
            tb = blk.clamp(max=geo["table_last_blk"]).flatten()  # masked positions only beyond it
            c = geo["cos_blocks"].index_select(0, tb).view(blk.shape[0], n, -1, D // 2).float()
            sn = geo["sin_blocks"].index_select(0, tb).view(blk.shape[0], n, -1, D // 2).float()
            k_glob = rotate_rows(k_glob, c, -sn)  # R(-j): back to raw keys
        s_glob = _softcap_(torch.matmul(q_glob, k_glob.transpose(-1, -2)), softcap)  # [Hkv, n, G*Qt, Lg]
        F = geo["fix_blk"].shape[1] * B
        s_glob[..., :F].masked_fill_(geo["fix_masked"], float("-inf"))
        if units is not None and geo["num_cand_min"] < config.topk:  # some slots hold no unit
            empty = (units < 0).repeat_interleave(B, dim=2)[:, :, None, :]  # [S, n, 1, topk*B]
            s_glob[..., F:].masked_fill_(empty, float("-inf"))

    # One softmax over local + global (local is never empty), in place: these are big.
    m = s_loc.amax(dim=-1, keepdim=True)
    if s_glob is not None:
        m = torch.maximum(m, s_glob.amax(dim=-1, keepdim=True))
    if sinks is not None:  # one more logit per query head, in the denominator only
        Qt = geo["Qt"]
        sink = sinks.float().view(Hkv, 1, G, 1).expand(Hkv, 1, G, Qt).reshape(Hkv, 1, G * Qt, 1)
        m = torch.maximum(m, sink)
    p_loc = s_loc.sub_(m).exp_()
    denom = p_loc.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom += (sink - m).exp()
    o = torch.matmul(p_loc, v_loc)
    if s_glob is not None:
        p_glob = s_glob.sub_(m).exp_()
        denom += p_glob.sum(dim=-1, keepdim=True)
        o.add_(torch.matmul(p_glob, v_glob))
    o = o.div_(denom).view(Hkv, n, G, Qt, D).permute(1, 3, 0, 2, 4).reshape(n * Qt, Hq, D)
    if geo["valid_idx"] is not None:
        o = o.index_select(0, geo["valid_idx"])
    out.index_copy_(0, geo["rows_valid"], o.to(out.dtype))

    if config.accumulates_scores:  # representative scores: fp32 softmax mass each local key received
        w = geo["mass_weight"] / denom.view(Hkv, n, G, 1, Qt)
        mass = torch.matmul(w, p_loc.view(Hkv, n, G, Qt, -1))  # [Hkv, n, G, 1, Lloc]
        nb = geo["n_loc_blk"]
        mass = mass.view(Hkv, n, G, nb, B).permute(1, 3, 0, 2, 4).reshape(n * nb, Hq, B)
        memory.scores.index_add_(0, geo["loc_phys"], mass)
