"""Paged InfLLM ops in plain torch: the CPU path, and the reference the Triton kernels must match.

Four ops, driven wave by wave by `runtime.infllm_forward`:
  write_kv      scatter new K/V into the paged cache; reset side state of blocks started afresh
  seal_units    compute representative keys of units that just became candidates
  select_units  score candidate units against the chunk's mean query, keep the topk
  attend        local window + (init, selected units, remainder) in one softmax; accumulate the
                fp32 representative scores of local keys

All arithmetic is fp32. Work is tiled so temporaries stay bounded (vLLM does not count them).
"""

from __future__ import annotations

import torch

from ..config import InfLLMConfig
from ..rope import global_query_shift, rotate
from ..runtime import ChunkBatch, LayerMemory

# Upper bound on elements of one padded logits tensor (tiles x heads x queries x keys).
_LOGITS_BUDGET = 1 << 24
_QUERY_TILE = 128


def write_kv(kv_cache, key, value, slot_mapping, memory: LayerMemory | None) -> None:
    """kv_cache[block, :, offset] = (K, V) for every slot >= 0; slot = block * B + offset."""
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


def _gather_kv(kv_cache, block_table, req, pos):
    """K and V at logical positions `pos` [n, L] of requests `req` [n] -> two [n, L, Hkv, D] fp32."""
    B = kv_cache.shape[2]
    D = kv_cache.shape[3] // 2
    phys = block_table[req[:, None], pos // B].to(torch.long)
    kv = kv_cache[phys, :, pos % B].float()  # [n, L, Hkv, 2D]
    return kv[..., :D], kv[..., D:], phys


def seal_units(kv_cache, memory, block_table, chunks: ChunkBatch, cos, sin, config: InfLLMConfig):
    """Seal every not-yet-sealed unit among each chunk's candidates.

    Only the last `chunk // B + 2` candidates can be unsealed: the previous chunk of the request
    (this step or an earlier one) sealed all units that were candidates at its start, at most
    `chunk` positions earlier.
    """
    B, Hq = config.block_size, memory.reprs.shape[1]
    Hkv, D = kv_cache.shape[1], kv_cache.shape[3] // 2
    window = config.chunk // B + 2
    units = chunks.num_cand[:, None] - window + torch.arange(window, device=chunks.req.device)
    phys = block_table[chunks.req[:, None], config.init_blocks + units.clamp(min=0)].to(torch.long)
    need = (units >= 0) & ~memory.sealed[phys]
    phys, units = phys[need], units[need]
    if phys.numel() == 0:
        return
    top = memory.scores[phys].topk(config.repr_topk, dim=-1).indices  # [m, Hq, r]
    kv_head = (torch.arange(Hq, device=phys.device) // (Hq // Hkv))[None, :, None]
    keys = kv_cache[phys[:, None, None], kv_head, top, :D]  # [m, Hq, r, D]
    pos = config.n_init + units[:, None, None] * B + top
    raw = rotate(keys, cos, sin, -pos)  # undo the model's RoPE: representatives are raw keys
    memory.reprs[phys] = raw.mean(dim=2).to(memory.reprs.dtype)
    memory.sealed[phys] = True


def _chunk_mean_query(query, chunks: ChunkBatch, cos, sin, config: InfLLMConfig):
    """q̄ = mean over the chunk of R(n_local-1)·q_raw = R(n_local-1-p)·q(p); [n, Hq, D] fp32."""
    i = torch.arange(chunks.max_len, device=query.device)
    valid = i[None, :] < chunks.length[:, None]
    rows = torch.where(valid, chunks.q0[:, None] + i, chunks.q0[:, None])
    pos = chunks.c0[:, None] + i
    q = rotate(query[rows], cos, sin, global_query_shift(pos, config.n_local))  # [n, L, Hq, D]
    q = q * valid[..., None, None]
    return q.sum(1) / chunks.length[:, None, None]


def select_units(query, memory, block_table, chunks: ChunkBatch, cos, sin, config: InfLLMConfig):
    """The topk candidates of each chunk by sum_h <q̄_h, r_{U,h}>; [n, topk] unit ids, -1 = none."""
    n, topk, max_k = chunks.n, config.topk, chunks.max_cand
    device = query.device
    selected = torch.full((n, topk), -1, dtype=torch.long, device=device)
    if max_k == 0:
        return selected
    units = torch.arange(max_k, device=device)
    if max_k <= topk:  # every chunk takes all its candidates
        selected[:, :max_k] = torch.where(units < chunks.num_cand[:, None], units, -1)
        return selected
    q_bar = _chunk_mean_query(query, chunks, cos, sin, config).flatten(1)  # [n, Hq*D]
    step = max(1, _LOGITS_BUDGET // (max_k * q_bar.shape[1]))
    for s in range(0, n, step):
        e = min(n, s + step)
        phys = block_table[chunks.req[s:e, None], config.init_blocks + units].to(torch.long)
        reprs = memory.reprs[phys].flatten(2).float()  # [m, K, Hq*D]
        score = torch.einsum("mkx,mx->mk", reprs, q_bar[s:e])
        score = score.masked_fill(units >= chunks.num_cand[s:e, None], float("-inf"))
        top = score.topk(topk, dim=-1).indices  # sorted: valid candidates first
        selected[s:e] = torch.where(torch.arange(topk, device=device) < chunks.num_cand[s:e, None], top, -1)
    return selected


def _tiles(chunks: ChunkBatch):
    """Split chunks into query tiles: (chunk index, first query offset, tile length)."""
    for j, length in enumerate(chunks.host["length"]):
        for s in range(0, length, _QUERY_TILE):
            yield j, s, min(_QUERY_TILE, length - s)


def attend(query, kv_cache, memory, block_table, chunks: ChunkBatch, selected, cos, sin,
           config: InfLLMConfig, scale: float, out) -> None:
    """InfLLM attention for every query of the wave; writes `out`, accumulates `memory.scores`."""
    tiles = list(_tiles(chunks))
    Hq = query.shape[1]
    span = config.n_local + _QUERY_TILE + config.max_attended()
    group = max(1, _LOGITS_BUDGET // (Hq * min(_QUERY_TILE, chunks.max_len) * span))
    for s in range(0, len(tiles), group):
        _attend_tiles(query, kv_cache, memory, block_table, chunks, selected, cos, sin, config,
                      scale, out, tiles[s : s + group])


def _attend_tiles(query, kv_cache, memory, block_table, chunks, selected, cos, sin, config,
                  scale, out, tiles) -> None:
    device = query.device
    B, n_init, n_local = config.block_size, config.n_init, config.n_local
    Hq, D = query.shape[1], query.shape[2]
    Hkv = kv_cache.shape[1]
    G = Hq // Hkv

    j = torch.tensor([t[0] for t in tiles], device=device)
    first = torch.tensor([t[1] for t in tiles], device=device)
    tlen = torch.tensor([t[2] for t in tiles], device=device)
    Qt = max(t[2] for t in tiles)
    req, c0 = chunks.req[j], chunks.c0[j]
    i = torch.arange(Qt, device=device)
    qvalid = i[None, :] < tlen[:, None]  # [n, Qt]
    pos = c0[:, None] + first[:, None] + i  # [n, Qt]
    rows = torch.where(qvalid, chunks.q0[j][:, None] + first[:, None] + i, 0)
    win = (pos - n_local + 1).clamp(min=0)  # w(p)
    q = query[rows].float()  # [n, Qt, Hq, D], post-RoPE

    # Local window: positions [w(first query), last query], causal and windowed per query.
    lstart = win[:, 0]
    n_loc = max(int(((c0 + first + tlen) - lstart).max()), 1)
    lpos = lstart[:, None] + torch.arange(n_loc, device=device)  # [n, Lloc]
    lmask = (lpos[:, None, :] >= win[..., None]) & (lpos[:, None, :] <= pos[..., None]) & qvalid[..., None]
    lpos_c = torch.minimum(lpos, (c0 + first + tlen - 1)[:, None])  # stay inside written tokens
    k_loc, v_loc, phys_loc = _gather_kv(kv_cache, block_table, req, lpos_c)

    # Global keys: init, selected units, remainder [R0, w(p)); all at relative distance n_local-1.
    R0 = n_init + chunks.num_cand[j] * B
    gparts, gvalid = [torch.arange(n_init, device=device).expand(len(tiles), n_init)], []
    gvalid.append(gparts[0][:, None, :] < win[..., None])
    if selected is not None and config.topk > 0:
        units = selected[j]  # [n, topk]
        upos = (n_init + units.clamp(min=0) * B)[..., None] + torch.arange(B, device=device)
        gparts.append(upos.flatten(1))
        gvalid.append((units >= 0).repeat_interleave(B, dim=1)[:, None, :].expand(-1, Qt, -1))
    n_rem = max(int((win.max(dim=1).values - R0).max()), 0)
    if n_rem:
        rpos = R0[:, None] + torch.arange(n_rem, device=device)
        gparts.append(rpos)
        gvalid.append(rpos[:, None, :] < win[..., None])
    gpos = torch.cat(gparts, dim=1)
    gmask = torch.cat(gvalid, dim=2) & qvalid[..., None]
    gpos_c = torch.where(gmask.any(dim=1), gpos, 0)
    k_glob, v_glob, _ = _gather_kv(kv_cache, block_table, req, gpos_c)
    k_glob = rotate(k_glob, cos, sin, -gpos_c)  # raw keys
    q_glob = rotate(q, cos, sin, global_query_shift(pos, n_local))  # R(n_local-1) q_raw

    # Two partial attentions merged by log-sum-exp == one softmax over local + global.
    # GQA: the G query heads of a KV head are folded into the query axis (no K/V copies).
    n = len(tiles)

    def fold(x):  # [n, Qt, Hq, D] -> [n, Hkv, G*Qt, D]
        return x.view(n, Qt, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(n, Hkv, G * Qt, D)

    q_loc = fold(q)
    o_loc, lse_loc = _partial_attention(q_loc, k_loc.transpose(1, 2), v_loc.transpose(1, 2), lmask, scale, G)
    o_glob, lse_glob = _partial_attention(
        fold(q_glob), k_glob.transpose(1, 2), v_glob.transpose(1, 2), gmask, scale, G
    )
    lse = torch.logaddexp(lse_loc, lse_glob)  # [n, Hkv, G*Qt]; local is never empty
    o = o_loc * (lse_loc - lse).exp()[..., None] + o_glob * (lse_glob - lse).exp()[..., None]
    o = o.view(n, Hkv, G, Qt, D).permute(0, 3, 1, 2, 4).reshape(n, Qt, Hq, D)
    out[rows[qvalid]] = o[qvalid].to(out.dtype)

    if config.topk > 0:  # representative scores: fp32 mass each local key received
        s_loc = torch.matmul(q_loc, k_loc.permute(0, 2, 3, 1)) * scale  # [n, Hkv, G*Qt, Lloc]
        p_loc = (s_loc - lse[..., None]).exp().masked_fill(~_fold_mask(lmask, G), 0.0)
        mass = p_loc.view(n, Hq, Qt, n_loc).sum(dim=2).transpose(1, 2)  # [n, Lloc, Hq]
        heads = torch.arange(Hq, device=device)[None, None, :]
        index = (phys_loc[..., None], heads, (lpos_c % B)[..., None])
        memory.scores.index_put_(index, mass, accumulate=True)


def _fold_mask(mask, G):
    """[n, Qt, L] -> [n, 1, G*Qt, L], matching the folded query axis."""
    n, Qt, L = mask.shape
    return mask[:, None].expand(n, G, Qt, L).reshape(n, 1, G * Qt, L)


def _partial_attention(q, k, v, mask, scale, G):
    """Softmax attention over a masked key set: (out, lse); rows with no key get lse = -inf.

    q: [n, Hkv, G*Qt, D], k, v: [n, Hkv, L, D], mask: [n, Qt, L] bool (shared by the G heads).
    On CPU this is torch's fused flash kernel, which also returns the LSE we merge with.
    """
    fmask = _fold_mask(mask, G)
    if q.device.type == "cpu" and k.shape[2] > 0:
        bias = torch.zeros(fmask.shape, dtype=q.dtype, device=q.device).masked_fill_(~fmask, float("-inf"))
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )[:2]
    else:
        s = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~fmask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        o = torch.matmul((s - lse[..., None]).exp().nan_to_num(0.0), v)
    empty = ~fmask.any(dim=-1)  # [n, 1, G*Qt]
    return o.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))
