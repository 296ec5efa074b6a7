"""Paged InfLLM ops as Triton kernels: the CUDA path. Same signatures and semantics as torch_ops.

  write_kv      one program per token: scatter K/V through the cache's strides; a token written at
                offset 0 also resets its block's scores and sealed flag
  seal_units    one program per unit of the scan window, all query heads at once (so the `sealed`
                flag is written by the only program that writes the unit's representatives)
  select_units  q̄ kernel + one-pass scoring kernel over the representatives, then torch.topk
                (select_units_exact: the exact score over every candidate's keys, one program
                per candidate and selection group)
  attend        flash attention per (chunk, query tile, KV head) with the tile's rows = (query,
                query head of that KV head), so K/V are read once for all G heads; local window and
                global keys (RoPE remapped in-kernel) share one online softmax; a second pass over
                the local keys adds exp(s - lse) into memory.scores (needs the final LSE)

No host synchronisation: launch sizes come from Python ints of the plan (`max_len`, `max_cand`)
and the config; per-chunk bounds are read on the device and surplus programs exit at once.

Conventions: every tile is upcast to fp32 right after its load (the Triton interpreter's bf16
arithmetic is wrong, and the RoPE remap wants fp32 anyway); tl.dot operands go back to the input
dtype for tensor cores, or stay fp32 with IEEE precision for fp32 inputs (tf32 would cost ~1e-3).
Offsets that involve a physical block index are int64: a 1M-token cache exceeds 2^31 elements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..config import InfLLMConfig
from ..plan import ChunkBatch, LayerMemory
from .ranking import hold_selections as hold_selections  # device ops, no host sync
from .ranking import top_units

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def _table(t: torch.Tensor) -> torch.Tensor:
    """cos/sin tables are read as [row, d]: the kernels assume unit stride along d."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is the default: unused for 16-bit


# ------------------------------------------------------------------------------------- write_kv
@triton.jit
def _write_kv_kernel(
    kv_ptr,  # [num_blocks, Hkv, B, 2*D] cache dtype, strides s_cb, s_ch, s_co, s_cd
    k_ptr,  # [T, Hkv, D] strides s_kt, s_kh, s_kd
    v_ptr,  # [T, Hkv, D] strides s_vt, s_vh, s_vd
    slot_ptr,  # [T] int, -1 = padding
    scores_ptr,  # [num_blocks, Hq, B] fp32, strides s_sb, s_sh, s_so (written only when RESET)
    sealed_ptr,  # [num_blocks] uint8, stride s_z (written only when RESET)
    s_cb, s_ch, s_co, s_cd,
    s_kt, s_kh, s_kd,
    s_vt, s_vh, s_vd,
    s_sb, s_sh, s_so, s_z,
    HKV: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, B: tl.constexpr,
    RESET: tl.constexpr,  # reset scores and sealed flag of blocks written at offset 0
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program per token."""
    t = tl.program_id(0).to(tl.int64)  # t * s_kt exceeds 2^31 in a long step of a wide model
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    blk = slot // B
    off = slot % B
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    m = (h < HKV) & (d < D)
    k = tl.load(k_ptr + t * s_kt + h * s_kh + d * s_kd, mask=m)
    v = tl.load(v_ptr + t * s_vt + h * s_vh + d * s_vd, mask=m)
    dst = kv_ptr + blk * s_cb + h * s_ch + off * s_co
    tl.store(dst + d * s_cd, k.to(kv_ptr.dtype.element_ty), mask=m)
    tl.store(dst + (d + D) * s_cd, v.to(kv_ptr.dtype.element_ty), mask=m)
    if RESET:
        if off == 0:  # the block starts a new sequence: forget its scores and sealing
            hq = tl.arange(0, BLOCK_HQ)[:, None]
            b = tl.arange(0, BLOCK_B)[None, :]
            tl.store(scores_ptr + blk * s_sb + hq * s_sh + b * s_so,
                     tl.zeros([BLOCK_HQ, BLOCK_B], dtype=tl.float32), mask=(hq < HQ) & (b < B))
            tl.store(sealed_ptr + blk * s_z, tl.zeros([], dtype=tl.uint8))


def write_kv(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    memory: LayerMemory | None,
) -> None:
    """kv_cache[block, :, offset] = (K, V) for every slot >= 0; slot = block * B + offset.

    kv_cache:      [num_blocks, Hkv, B, 2*D] (K then V; any strides)
    key, value:    [T, Hkv, D] post-RoPE keys and values
    slot_mapping:  [T] int, -1 = padding (skipped)
    memory:        side state whose blocks written at offset 0 are reset (None: no reset)
    """
    n = slot_mapping.shape[0]
    if n == 0:
        return
    Hkv, B = kv_cache.shape[1], kv_cache.shape[2]
    D = key.shape[-1]
    reset = memory is not None
    scores = memory.scores if reset else kv_cache
    sealed = memory.sealed.view(torch.uint8) if reset else kv_cache
    Hq = scores.shape[1] if reset else 1
    s_cb, s_ch, s_co, s_cd = kv_cache.stride()
    s_kt, s_kh, s_kd = key.stride()
    s_vt, s_vh, s_vd = value.stride()
    s_sb, s_sh, s_so = scores.stride() if reset else (0, 0, 0)
    # In vLLM the flags are one byte per KV page (adapter/side_state.py): index by their stride.
    s_z = sealed.stride(0) if reset else 0
    _write_kv_kernel[(n,)](
        kv_ptr=kv_cache, k_ptr=key, v_ptr=value, slot_ptr=slot_mapping,
        scores_ptr=scores, sealed_ptr=sealed,
        s_cb=s_cb, s_ch=s_ch, s_co=s_co, s_cd=s_cd,
        s_kt=s_kt, s_kh=s_kh, s_kd=s_kd,
        s_vt=s_vt, s_vh=s_vh, s_vd=s_vd,
        s_sb=s_sb, s_sh=s_sh, s_so=s_so, s_z=s_z,
        HKV=Hkv, HQ=Hq, D=D, B=B,
        RESET=reset, BLOCK_H=_p2(Hkv), BLOCK_D=_p2(D), BLOCK_HQ=_p2(Hq), BLOCK_B=_p2(B),
    )


# ----------------------------------------------------------------------------------- seal_units
@triton.jit
def _seal_kernel(
    kv_ptr,  # [num_blocks, Hkv, B, 2*D] strides s_cb, s_ch, s_co, s_cd
    bt_ptr,  # [num_reqs, max_blocks] int block table, row stride s_bt
    req_ptr,  # [n] int32 block-table row of each chunk
    ncand_ptr,  # [n] int32 candidate units of each chunk
    scores_ptr,  # [num_blocks, Hq, B] fp32, strides s_sb, s_sh, s_so
    reprs_ptr,  # [num_blocks, Hq, D] out (APART: [num_blocks, Hq*R, D]), strides s_rb, s_rh, s_rd
    sealed_ptr,  # [num_blocks] uint8, stride s_z; in/out
    cos_ptr, sin_ptr,  # [rows, D/2] rotary table, row strides s_cos, s_sin
    s_cb, s_ch, s_co, s_cd, s_bt, s_sb, s_sh, s_so, s_rb, s_rh, s_rd, s_z, s_cos, s_sin,
    HQ: tl.constexpr, D2: tl.constexpr, B: tl.constexpr, N_INIT: tl.constexpr,
    INIT_BLOCKS: tl.constexpr,
    G: tl.constexpr,  # query heads per KV head
    WINDOW: tl.constexpr,  # candidates scanned per chunk (the last WINDOW ones)
    R: tl.constexpr,  # repr_topk
    APART: tl.constexpr,  # unit_score="max_topk": store the R keys (row h*R + i), not their mean
    BLOCK_HQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """One program per (chunk, scanned candidate); all query heads of the unit at once."""
    pid = tl.program_id(0)
    c = pid // WINDOW
    unit = tl.load(ncand_ptr + c) - WINDOW + pid % WINDOW
    if unit < 0:
        return
    req = tl.load(req_ptr + c).to(tl.int64)
    phys = tl.load(bt_ptr + req * s_bt + INIT_BLOCKS + unit).to(tl.int64)
    if tl.load(sealed_ptr + phys * s_z) != 0:
        return
    h = tl.arange(0, BLOCK_HQ)
    b = tl.arange(0, BLOCK_B)
    hm = h < HQ
    sc = tl.load(scores_ptr + phys * s_sb + h[:, None] * s_sh + b[None, :] * s_so,
                 mask=hm[:, None] & (b[None, :] < B), other=float("-inf"))
    d = tl.arange(0, BLOCK_D2)[None, :]
    km = hm[:, None] & (d < D2)
    kbase = kv_ptr + phys * s_cb + (h // G)[:, None] * s_ch
    acc_a = tl.zeros([BLOCK_HQ, BLOCK_D2], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_HQ, BLOCK_D2], dtype=tl.float32)
    for i in range(R):
        # Per head: the best remaining token (lowest index among ties), then mask it out.
        mx = tl.max(sc, 1)
        idx = tl.min(tl.where(sc == mx[:, None], b[None, :], BLOCK_B), 1)
        sc = tl.where(b[None, :] == idx[:, None], float("-inf"), sc)
        ptr = kbase + idx[:, None] * s_co
        ka = tl.load(ptr + d * s_cd, mask=km, other=0.0).to(tl.float32)
        kb = tl.load(ptr + (d + D2) * s_cd, mask=km, other=0.0).to(tl.float32)
        # Undo the model's RoPE: rotate by -pos = table row pos with the sine negated.
        pos = (N_INIT + unit * B + idx)[:, None]
        cs = tl.load(cos_ptr + pos * s_cos + d, mask=km, other=1.0).to(tl.float32)
        sn = tl.load(sin_ptr + pos * s_sin + d, mask=km, other=0.0).to(tl.float32)
        ra = ka * cs + kb * sn
        rb = kb * cs - ka * sn
        if APART:  # head h's i-th most-attended key goes to row h*R + i
            dst = reprs_ptr + phys * s_rb + (h * R + i)[:, None] * s_rh
            tl.store(dst + d * s_rd, ra.to(reprs_ptr.dtype.element_ty), mask=km)
            tl.store(dst + (d + D2) * s_rd, rb.to(reprs_ptr.dtype.element_ty), mask=km)
        else:
            acc_a += ra
            acc_b += rb
    if not APART:
        dst = reprs_ptr + phys * s_rb + h[:, None] * s_rh
        tl.store(dst + d * s_rd, (acc_a / R).to(reprs_ptr.dtype.element_ty), mask=km)
        tl.store(dst + (d + D2) * s_rd, (acc_b / R).to(reprs_ptr.dtype.element_ty), mask=km)
    tl.store(sealed_ptr + phys * s_z, tl.full([], 1, tl.uint8))


#: Tokens per tile of _seal_minmax_kernel (tests lower it to run its loop on small blocks).
SEAL_TOKENS = 32


@triton.jit
def _seal_minmax_kernel(
    kv_ptr,  # [num_blocks, Hkv, B, 2*D] strides s_cb, s_ch, s_co, s_cd
    bt_ptr, req_ptr, ncand_ptr,  # as _seal_kernel
    reprs_ptr,  # [num_blocks, 2*Hkv, D] out: rows 2g, 2g+1 = min, max raw key of KV head g
    codes_ptr,  # SKETCH: the code rows of reprs as bytes, [Hkv, B, D/2] per block, block stride s_kb
    sealed_ptr,  # [num_blocks] uint8, stride s_z; in/out
    cos_ptr, sin_ptr,  # [rows, D/2] rotary table, row strides s_cos, s_sin
    s_cb, s_ch, s_co, s_cd, s_bt, s_rb, s_rh, s_rd, s_kb, s_z, s_cos, s_sin,
    HKV: tl.constexpr, D2: tl.constexpr, B: tl.constexpr, N_INIT: tl.constexpr,
    INIT_BLOCKS: tl.constexpr, WINDOW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D2: tl.constexpr,
    SKETCH: tl.constexpr,  # unit_score="sketch": also each key's 4-bit codes within the box
):
    """unit_score="minmax" and "sketch": one program per (chunk, scanned candidate); per KV head,
    the per-channel min and max of the unit's B raw keys (RoPE undone: rotation by -pos); with
    SKETCH, a second pass over the keys stores each channel's nearest of 16 levels between the
    box's min and max as stored (as torch_ops.seal_units: low nibble channel i, high i + D/2)."""
    pid = tl.program_id(0)
    c = pid // WINDOW
    unit = tl.load(ncand_ptr + c) - WINDOW + pid % WINDOW
    if unit < 0:
        return
    req = tl.load(req_ptr + c).to(tl.int64)
    phys = tl.load(bt_ptr + req * s_bt + INIT_BLOCKS + unit).to(tl.int64)
    if tl.load(sealed_ptr + phys * s_z) != 0:
        return
    d = tl.arange(0, BLOCK_D2)[None, :]
    dd = tl.arange(0, BLOCK_D2)
    ty = reprs_ptr.dtype.element_ty
    for g in range(HKV):
        lo_a = tl.full([BLOCK_D2], float("inf"), tl.float32)
        lo_b = tl.full([BLOCK_D2], float("inf"), tl.float32)
        hi_a = tl.full([BLOCK_D2], float("-inf"), tl.float32)
        hi_b = tl.full([BLOCK_D2], float("-inf"), tl.float32)
        for b0 in range(0, B, BLOCK_B):  # BLOCK_B tokens at a time: [B, D/2] fp32 x 4 spilled at D 256
            b = b0 + tl.arange(0, BLOCK_B)[:, None]
            m = (b < B) & (d < D2)
            ra, rb = _raw_key_halves(kv_ptr + phys * s_cb + g * s_ch, cos_ptr, sin_ptr, b, d, m, unit,
                                     s_co, s_cd, s_cos, s_sin, D2, B, N_INIT)
            lo_a = tl.minimum(lo_a, tl.min(tl.where(m, ra, float("inf")), 0))
            lo_b = tl.minimum(lo_b, tl.min(tl.where(m, rb, float("inf")), 0))
            hi_a = tl.maximum(hi_a, tl.max(tl.where(m, ra, float("-inf")), 0))
            hi_b = tl.maximum(hi_b, tl.max(tl.where(m, rb, float("-inf")), 0))
        dst = reprs_ptr + phys * s_rb + 2 * g * s_rh
        tl.store(dst + dd * s_rd, lo_a.to(ty), mask=dd < D2)
        tl.store(dst + (dd + D2) * s_rd, lo_b.to(ty), mask=dd < D2)
        tl.store(dst + s_rh + dd * s_rd, hi_a.to(ty), mask=dd < D2)
        tl.store(dst + s_rh + (dd + D2) * s_rd, hi_b.to(ty), mask=dd < D2)
        if SKETCH:  # codes relative to the box as stored (in the cache dtype), as the score reads it
            lo_a, lo_b = lo_a.to(ty).to(tl.float32)[None, :], lo_b.to(ty).to(tl.float32)[None, :]
            step_a = tl.div_rn(hi_a.to(ty).to(tl.float32)[None, :] - lo_a, 15.0)
            step_b = tl.div_rn(hi_b.to(ty).to(tl.float32)[None, :] - lo_b, 15.0)
            for b0 in range(0, B, BLOCK_B):
                b = b0 + tl.arange(0, BLOCK_B)[:, None]
                m = (b < B) & (d < D2)
                ra, rb = _raw_key_halves(kv_ptr + phys * s_cb + g * s_ch, cos_ptr, sin_ptr, b, d, m, unit,
                                         s_co, s_cd, s_cos, s_sin, D2, B, N_INIT)
                code = _level(ra, lo_a, step_a) | (_level(rb, lo_b, step_b) << 4)
                tl.store(codes_ptr + phys * s_kb + (g * B + b) * D2 + d, code.to(tl.uint8), mask=m)
    tl.store(sealed_ptr + phys * s_z, tl.full([], 1, tl.uint8))


@triton.jit
def _raw_key_halves(kv_head_ptr, cos_ptr, sin_ptr, b, d, m, unit, s_co, s_cd, s_cos, s_sin,
                    D2: tl.constexpr, B: tl.constexpr, N_INIT: tl.constexpr):
    """Tokens b [BLOCK_B, 1] of memory unit `unit` of one KV head, raw (RoPE undone: rotation by
    -pos), fp32 NeoX halves [BLOCK_B, BLOCK_D2] each."""
    pos = N_INIT + unit * B + b
    cs = tl.load(cos_ptr + pos * s_cos + d, mask=m, other=1.0).to(tl.float32)
    sn = tl.load(sin_ptr + pos * s_sin + d, mask=m, other=0.0).to(tl.float32)
    ptr = kv_head_ptr + b * s_co
    ka = tl.load(ptr + d * s_cd, mask=m, other=0.0).to(tl.float32)
    kb = tl.load(ptr + (d + D2) * s_cd, mask=m, other=0.0).to(tl.float32)
    return ka * cs + kb * sn, kb * cs - ka * sn


@triton.jit
def _level(x, lo, step):
    """The 4-bit code of x in the box [lo, lo + 15 step]: the nearest level, ties to even (as
    torch.round), 0 where the box is flat; int32 in [0, 15]."""
    t = tl.where(step > 0, tl.div_rn(x - lo, tl.where(step > 0, step, 1.0)), 0.0)
    f = tl.floor(t)
    r = t - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    t = f + tl.where((r > 0.5) | ((r == 0.5) & odd), 1.0, 0.0)
    return tl.minimum(tl.maximum(t, 0.0), 15.0).to(tl.int32)


@triton.jit
def _seal_flags_kernel(
    bt_ptr, req_ptr, ncand_ptr, sealed_ptr,  # as _seal_kernel
    s_bt, s_z, INIT_BLOCKS: tl.constexpr, WINDOW: tl.constexpr,
):
    """unit_score="exact": sealing stores nothing (the score reads the unit's keys); one program
    per unit of the scan window sets its flag."""
    pid = tl.program_id(0)
    c = pid // WINDOW
    unit = tl.load(ncand_ptr + c) - WINDOW + pid % WINDOW
    if unit < 0:
        return
    req = tl.load(req_ptr + c).to(tl.int64)
    phys = tl.load(bt_ptr + req * s_bt + INIT_BLOCKS + unit).to(tl.int64)
    tl.store(sealed_ptr + phys * s_z, 1)


def seal_units(
    kv_cache: torch.Tensor,
    memory: LayerMemory,
    block_table: torch.Tensor,
    chunks: ChunkBatch,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: InfLLMConfig,
) -> None:
    """Seal every not-yet-sealed unit among the last `chunk // B + 2` candidates of each chunk
    (the earlier ones were sealed by the request's previous chunk; see torch_ops).

    kv_cache:     [num_blocks, Hkv, B, 2*D]
    memory:       reads `scores` [num_blocks, Hq, B], writes `reprs` [num_blocks, Hq, D], `sealed`
    block_table:  [num_reqs, max_blocks] int
    cos, sin:     [rows, D/2] rotary table (rows > every sealed token's position)
    """
    if chunks.n == 0 or chunks.max_cand == 0:
        return
    B, Hq = config.block_size, memory.scores.shape[1]
    Hkv, D = kv_cache.shape[1], kv_cache.shape[3] // 2
    window = config.chunk // B + 2
    cos, sin = _table(cos), _table(sin)
    s_cb, s_ch, s_co, s_cd = kv_cache.stride()
    s_sb, s_sh, s_so = memory.scores.stride()
    s_rb, s_rh, s_rd = memory.reprs.stride()
    sealed = memory.sealed.view(torch.uint8)  # one byte per KV page in vLLM: index by its stride
    if config.unit_score == "exact":
        _seal_flags_kernel[(chunks.n * window,)](
            bt_ptr=block_table, req_ptr=chunks.req, ncand_ptr=chunks.num_cand, sealed_ptr=sealed,
            s_bt=block_table.stride(0), s_z=sealed.stride(0), INIT_BLOCKS=config.init_blocks, WINDOW=window,
        )
        return
    if config.unit_score in ("minmax", "sketch"):
        sketch = config.unit_score == "sketch"
        codes = _sketch_codes(memory.reprs, Hkv) if sketch else sealed  # (unused without SKETCH)
        _seal_minmax_kernel[(chunks.n * window,)](
            kv_ptr=kv_cache, bt_ptr=block_table, req_ptr=chunks.req, ncand_ptr=chunks.num_cand,
            reprs_ptr=memory.reprs, codes_ptr=codes, sealed_ptr=sealed, cos_ptr=cos, sin_ptr=sin,
            s_cb=s_cb, s_ch=s_ch, s_co=s_co, s_cd=s_cd, s_bt=block_table.stride(0),
            s_rb=s_rb, s_rh=s_rh, s_rd=s_rd, s_kb=codes.stride(0), s_z=sealed.stride(0),
            s_cos=cos.stride(0), s_sin=sin.stride(0),
            HKV=Hkv, D2=D // 2, B=B, N_INIT=config.n_init, INIT_BLOCKS=config.init_blocks,
            WINDOW=window, BLOCK_B=min(_p2(B), SEAL_TOKENS), BLOCK_D2=_p2(D // 2), SKETCH=sketch,
            num_warps=4 if D <= 128 else 8,
        )
        return
    _seal_kernel[(chunks.n * window,)](
        kv_ptr=kv_cache, bt_ptr=block_table, req_ptr=chunks.req, ncand_ptr=chunks.num_cand,
        scores_ptr=memory.scores, reprs_ptr=memory.reprs, sealed_ptr=sealed,
        cos_ptr=cos, sin_ptr=sin,
        s_cb=s_cb, s_ch=s_ch, s_co=s_co, s_cd=s_cd, s_bt=block_table.stride(0),
        s_sb=s_sb, s_sh=s_sh, s_so=s_so, s_rb=s_rb, s_rh=s_rh, s_rd=s_rd, s_z=sealed.stride(0),
        s_cos=cos.stride(0), s_sin=sin.stride(0),
        HQ=Hq, D2=D // 2, B=B, N_INIT=config.n_init, INIT_BLOCKS=config.init_blocks,
        G=Hq // Hkv, WINDOW=window, R=config.repr_topk, APART=config.unit_score == "max_topk",
        BLOCK_HQ=_p2(Hq), BLOCK_B=_p2(B), BLOCK_D2=_p2(D // 2),
        num_warps=4 if D <= 128 else 8,  # [Hq, D/2] tiles: 4 warps spilled at D 256 (compile_check)
    )


# --------------------------------------------------------------------------------- select_units
@triton.jit
def _qbar_kernel(
    q_ptr,  # [T, Hq, D] post-RoPE queries, strides s_qt, s_qh, s_qd
    qbar_ptr,  # [n, X = Hq*D] fp32 out
    c0_ptr, len_ptr, q0_ptr,  # [n] int32: first position, queries, first query row of each chunk
    cos_ptr, sin_ptr,  # [rows, D/2] rotary table, row strides s_cos, s_sin
    s_qt, s_qh, s_qd, s_cos, s_sin,
    SELECT_QUERIES,  # 0: every query of the chunk; m > 0: its last m
    FIRST_ONLY,  # 1: the chunk's first query alone (chunking="aligned"); 0: as SELECT_QUERIES
    D2: tl.constexpr, X: tl.constexpr, N_LOCAL: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """One program per (chunk, query head): q̄[c, h] = mean over the chunk (or its last
    SELECT_QUERIES queries, or its first query) of R(n_local-1-p)·q(p), fp32, stored at
    [c, h*D : (h+1)*D]."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    length = tl.load(len_ptr + c)
    c0 = tl.load(c0_ptr + c)
    q0 = tl.load(q0_ptr + c)
    first = tl.where(SELECT_QUERIES > 0, tl.maximum(length - SELECT_QUERIES, 0), 0)
    length = tl.where(FIRST_ONLY > 0, tl.minimum(length, 1), length)
    d = tl.arange(0, BLOCK_D2)[None, :]
    acc_a = tl.zeros([BLOCK_D2], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D2], dtype=tl.float32)
    for t in range(first, length, BLOCK_Q):
        i = t + tl.arange(0, BLOCK_Q)[:, None]
        m = (i < length) & (d < D2)
        ptr = q_ptr + (q0 + i).to(tl.int64) * s_qt + h * s_qh  # rows x stride can pass 2^31
        qa = tl.load(ptr + d * s_qd, mask=m, other=0.0).to(tl.float32)
        qb = tl.load(ptr + (d + D2) * s_qd, mask=m, other=0.0).to(tl.float32)
        # signed rotation: row |a|, sine negated when a < 0. Queries before n_local have no
        # global keys: angle 0 keeps reads inside tables shorter than n_local (rope.py).
        a = tl.where(c0 + i >= N_LOCAL, N_LOCAL - 1 - (c0 + i), 0)
        cs = tl.load(cos_ptr + tl.abs(a) * s_cos + d, mask=m, other=1.0).to(tl.float32)
        sn = tl.load(sin_ptr + tl.abs(a) * s_sin + d, mask=m, other=0.0).to(tl.float32)
        sn = tl.where(a < 0, -sn, sn)
        acc_a += tl.sum(qa * cs - qb * sn, 0)
        acc_b += tl.sum(qb * cs + qa * sn, 0)
    dd = tl.arange(0, BLOCK_D2)
    dst = qbar_ptr + c * X + h * 2 * D2
    n = tl.maximum(length - first, 1)  # padding chunks of a static decode plan have no queries
    tl.store(dst + dd, acc_a / n, mask=dd < D2)
    tl.store(dst + D2 + dd, acc_b / n, mask=dd < D2)


@triton.jit(do_not_specialize=["MAX_CAND"])  # MAX_CAND changes every step: one build for all
def _score_kernel(
    qbar_ptr,  # [n, X = Hq*D] fp32
    reprs_ptr,  # [num_blocks, Hq, D] with each block's [Hq, D] contiguous, block stride s_rb
    bt_ptr,  # [num_reqs, max_blocks] int block table, row stride s_bt
    req_ptr, ncand_ptr,  # [n] int32: block-table row and candidate count of each chunk
    score_ptr,  # [n, S, MAX_CAND] fp32 out
    s_bt, s_rb, MAX_CAND, X: tl.constexpr, XG: tl.constexpr, INIT_BLOCKS: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """One program per (chunk, BLOCK_U candidates, selection group g): score[c, g, u] =
    <q̄_c, r_u> over the group's run [g*XG, (g+1)*XG) of the flattened (head, dim) axis (XG = X:
    all heads; XG = G*D: the query heads of KV head g); -inf for u >= num_cand. Each unit's
    representatives are one contiguous run of Hq*D elements: a single streaming pass."""
    c = tl.program_id(0)
    u = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    g = tl.program_id(2)
    dst = score_ptr + (c * tl.num_programs(2) + g) * MAX_CAND + u
    ncand = tl.load(ncand_ptr + c)
    if tl.program_id(1) * BLOCK_U >= ncand:  # past this chunk's candidates (MAX_CAND is a bound)
        tl.store(dst, tl.full([BLOCK_U], float("-inf"), tl.float32), mask=u < MAX_CAND)
        return
    req = tl.load(req_ptr + c).to(tl.int64)
    um = u < ncand
    phys = tl.load(bt_ptr + req * s_bt + INIT_BLOCKS + u, mask=um, other=0).to(tl.int64)
    rbase = reprs_ptr + phys[:, None] * s_rb + g * XG
    qbase = qbar_ptr + c * X + g * XG
    acc = tl.zeros([BLOCK_U], dtype=tl.float32)
    for x0 in range(0, XG, BLOCK_X):
        x = x0 + tl.arange(0, BLOCK_X)
        qb = tl.load(qbase + x, mask=x < XG, other=0.0)
        r = tl.load(rbase + x[None, :], mask=um[:, None] & (x[None, :] < XG), other=0.0)
        acc += tl.sum(r.to(tl.float32) * qb[None, :], 1)
    acc = tl.where(um, acc, float("-inf"))
    tl.store(dst, acc, mask=u < MAX_CAND)


@triton.jit(do_not_specialize=["MAX_CAND"])
def _score_minmax_kernel(
    qbar_ptr,  # [n, Hq*D] fp32
    reprs_ptr,  # [num_blocks, 2*Hkv, D], each block's rows contiguous, block stride s_rb
    bt_ptr, req_ptr, ncand_ptr,  # as _score_kernel
    score_ptr,  # [n, S, MAX_CAND] fp32 out
    s_bt, s_rb, MAX_CAND, HQ: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    HEADS: tl.constexpr,  # query heads per selection group (Hq or G)
    INIT_BLOCKS: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """unit_score="minmax": score[c, g, u] = sum over the group's query heads h of
    sum_d max(q̄_hd lo_d, q̄_hd hi_d), lo/hi the rows 2*(h//G), 2*(h//G)+1 of the unit."""
    c = tl.program_id(0)
    u = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    grp = tl.program_id(2)
    dst = score_ptr + (c * tl.num_programs(2) + grp) * MAX_CAND + u
    ncand = tl.load(ncand_ptr + c)
    if tl.program_id(1) * BLOCK_U >= ncand:
        tl.store(dst, tl.full([BLOCK_U], float("-inf"), tl.float32), mask=u < MAX_CAND)
        return
    req = tl.load(req_ptr + c).to(tl.int64)
    um = u < ncand
    phys = tl.load(bt_ptr + req * s_bt + INIT_BLOCKS + u, mask=um, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    rm = um[:, None] & (d[None, :] < D)
    acc = tl.zeros([BLOCK_U], dtype=tl.float32)
    for i in range(HEADS):
        h = grp * HEADS + i
        qb = tl.load(qbar_ptr + c * HQ * D + h * D + d, mask=d < D, other=0.0)[None, :]
        rbase = reprs_ptr + phys[:, None] * s_rb + (2 * (h // G)) * D + d[None, :]
        lo = tl.load(rbase, mask=rm, other=0.0).to(tl.float32)
        hi = tl.load(rbase + D, mask=rm, other=0.0).to(tl.float32)
        acc += tl.sum(tl.maximum(qb * lo, qb * hi), 1)
    acc = tl.where(um, acc, float("-inf"))
    tl.store(dst, acc, mask=u < MAX_CAND)


@triton.jit(do_not_specialize=["MAX_CAND"])
def _score_max_kernel(
    qbar_ptr,  # [n, Hq*D] fp32
    reprs_ptr,  # [num_blocks, Hq*R, D], each block's rows contiguous, block stride s_rb
    bt_ptr, req_ptr, ncand_ptr,  # as _score_kernel
    score_ptr,  # [n, S, MAX_CAND] fp32 out
    s_bt, s_rb, MAX_CAND, HQ: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
    HEADS: tl.constexpr,  # query heads per selection group (Hq or G)
    INIT_BLOCKS: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """unit_score="max_topk": score[c, g, u] = sum over the group's query heads h of
    max_i <q̄_h, r_{u, h*R + i}>, the best of head h's R representative keys."""
    c = tl.program_id(0)
    u = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    grp = tl.program_id(2)
    dst = score_ptr + (c * tl.num_programs(2) + grp) * MAX_CAND + u
    ncand = tl.load(ncand_ptr + c)
    if tl.program_id(1) * BLOCK_U >= ncand:
        tl.store(dst, tl.full([BLOCK_U], float("-inf"), tl.float32), mask=u < MAX_CAND)
        return
    req = tl.load(req_ptr + c).to(tl.int64)
    um = u < ncand
    phys = tl.load(bt_ptr + req * s_bt + INIT_BLOCKS + u, mask=um, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    rm = um[:, None] & (d[None, :] < D)
    acc = tl.zeros([BLOCK_U], dtype=tl.float32)
    for j in range(HEADS):
        h = grp * HEADS + j
        qb = tl.load(qbar_ptr + c * HQ * D + h * D + d, mask=d < D, other=0.0)[None, :]
        best = tl.full([BLOCK_U], float("-inf"), tl.float32)
        for i in range(R):
            r = tl.load(reprs_ptr + phys[:, None] * s_rb + (h * R + i) * D + d[None, :], mask=rm, other=0.0)
            best = tl.maximum(best, tl.sum(r.to(tl.float32) * qb, 1))
        acc += best
    acc = tl.where(um, acc, float("-inf"))
    tl.store(dst, acc, mask=u < MAX_CAND)


@triton.jit
def _fold_best_key(qa, qb, ka, kb, valid, best, nan):
    """One tile of the best-key scores: the dots of the G heads' q̄ halves qa, qb [BLOCK_G,
    BLOCK_D2] with keys ka, kb [BLOCK_B, BLOCK_D2] (valid: [BLOCK_B]) folded into each head's
    running max `best` and NaN count `nan` [BLOCK_G] (a NaN dot makes the score NaN, as torch's
    amax)."""
    dots = tl.sum(qa[:, None, :] * ka[None, :, :], 2) + tl.sum(qb[:, None, :] * kb[None, :, :], 2)
    dots = tl.where(valid[None, :], dots, float("-inf"))  # [BLOCK_G, BLOCK_B]
    return tl.maximum(best, tl.max(dots, 1)), nan + tl.sum((dots != dots).to(tl.int32), 1)


@triton.jit(do_not_specialize=["MAX_CAND"])
def _score_exact_kernel(
    qbar_ptr,  # [n, Hq*D] fp32
    kv_ptr,  # [num_blocks, Hkv, B, 2*D] (K in [..., :D]), strides s_cb, s_ch, s_co, s_cd
    bt_ptr, req_ptr, ncand_ptr,  # as _score_kernel
    cos_ptr, sin_ptr,  # [rows, D/2] rotary table, row strides s_cos, s_sin
    score_ptr,  # [n, S, MAX_CAND] fp32 out
    s_bt, s_cb, s_ch, s_co, s_cd, s_cos, s_sin, MAX_CAND,
    HQ: tl.constexpr, D2: tl.constexpr, G: tl.constexpr,
    KV_HEADS: tl.constexpr,  # KV heads per selection group (Hkv or 1)
    B: tl.constexpr, N_INIT: tl.constexpr, INIT_BLOCKS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """unit_score="exact" and the retrieval layer: one program per (chunk, candidate, selection
    group); score[c, grp, u] = sum over the group's query heads h of max_k <q̄_h, k_raw>, every
    key of the unit (of h's KV head), each un-rotated once (raw = R(-j) k at position j) for
    the G heads that share it. A NaN dot makes the score NaN (as torch's amax): it ranks first."""
    c = tl.program_id(0)
    u = tl.program_id(1)
    grp = tl.program_id(2)
    dst = score_ptr + (c * tl.num_programs(2) + grp) * MAX_CAND + u
    ncand = tl.load(ncand_ptr + c)
    if u >= ncand:  # past this chunk's candidates (MAX_CAND is a bound)
        tl.store(dst, float("-inf"))
        return
    req = tl.load(req_ptr + c).to(tl.int64)
    phys = tl.load(bt_ptr + req * s_bt + INIT_BLOCKS + u).to(tl.int64)
    i = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D2)
    qm = (i[:, None] < G) & (d[None, :] < D2)
    total = 0.0
    for kk in range(KV_HEADS):
        kvh = grp * KV_HEADS + kk
        qrow = qbar_ptr + c * HQ * 2 * D2 + (kvh * G + i[:, None]) * 2 * D2 + d[None, :]
        qa = tl.load(qrow, mask=qm, other=0.0)  # [BLOCK_G, BLOCK_D2]: the G heads' halves
        qb = tl.load(qrow + D2, mask=qm, other=0.0)
        best = tl.full([BLOCK_G], float("-inf"), tl.float32)
        nan = tl.zeros([BLOCK_G], tl.int32)
        for o0 in range(0, B, BLOCK_B):
            o = o0 + tl.arange(0, BLOCK_B)
            km = (o[:, None] < B) & (d[None, :] < D2)
            kbase = kv_ptr + phys * s_cb + kvh * s_ch + o[:, None] * s_co + d[None, :] * s_cd
            ka = tl.load(kbase, mask=km, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_D2]
            kb = tl.load(kbase + D2 * s_cd, mask=km, other=0.0).to(tl.float32)
            j = N_INIT + u * B + o  # the keys' positions
            cs = tl.load(cos_ptr + j[:, None] * s_cos + d[None, :], mask=km, other=1.0).to(tl.float32)
            sn = tl.load(sin_ptr + j[:, None] * s_sin + d[None, :], mask=km, other=0.0).to(tl.float32)
            # R(-j) k in NeoX halves
            best, nan = _fold_best_key(qa, qb, ka * cs + kb * sn, kb * cs - ka * sn, o < B, best, nan)
        best = tl.where(nan > 0, float("nan"), best)
        total += tl.sum(tl.where(i < G, best, 0.0), 0)
    tl.store(dst, total)


@triton.jit(do_not_specialize=["MAX_CAND"])
def _score_sketch_kernel(
    qbar_ptr,  # [n, Hq*D] fp32
    reprs_ptr,  # [num_blocks, R, D]: rows 2g, 2g+1 = the box of KV head g; block stride s_rb
    codes_ptr,  # the code rows of reprs as bytes, [Hkv, B, D/2] per block, block stride s_kb
    bt_ptr, req_ptr, ncand_ptr,  # as _score_kernel
    score_ptr,  # [n, S, MAX_CAND] fp32 out
    s_bt, s_rb, s_kb, MAX_CAND,
    HQ: tl.constexpr, D2: tl.constexpr, G: tl.constexpr,
    KV_HEADS: tl.constexpr,  # KV heads per selection group (Hkv or 1)
    B: tl.constexpr, INIT_BLOCKS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """unit_score="sketch": _score_exact_kernel's score of the keys the unit's sealing sketched,
    each decoded to lo + code * (hi - lo) / 15 per channel (the box as stored); no rotary table,
    the sketch is of the raw keys. Reads 2*D box values and B*D/2 code bytes per KV head."""
    c = tl.program_id(0)
    u = tl.program_id(1)
    grp = tl.program_id(2)
    dst = score_ptr + (c * tl.num_programs(2) + grp) * MAX_CAND + u
    ncand = tl.load(ncand_ptr + c)
    if u >= ncand:  # past this chunk's candidates (MAX_CAND is a bound)
        tl.store(dst, float("-inf"))
        return
    req = tl.load(req_ptr + c).to(tl.int64)
    phys = tl.load(bt_ptr + req * s_bt + INIT_BLOCKS + u).to(tl.int64)
    i = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D2)
    qm = (i[:, None] < G) & (d[None, :] < D2)
    dm = d < D2
    total = 0.0
    for kk in range(KV_HEADS):
        kvh = grp * KV_HEADS + kk
        qrow = qbar_ptr + c * HQ * 2 * D2 + (kvh * G + i[:, None]) * 2 * D2 + d[None, :]
        qa = tl.load(qrow, mask=qm, other=0.0)  # [BLOCK_G, BLOCK_D2]: the G heads' halves
        qb = tl.load(qrow + D2, mask=qm, other=0.0)
        box = reprs_ptr + phys * s_rb + 2 * kvh * 2 * D2 + d
        lo_a = tl.load(box, mask=dm, other=0.0).to(tl.float32)[None, :]
        lo_b = tl.load(box + D2, mask=dm, other=0.0).to(tl.float32)[None, :]
        step_a = tl.div_rn(tl.load(box + 2 * D2, mask=dm, other=0.0).to(tl.float32)[None, :] - lo_a, 15.0)
        step_b = tl.div_rn(tl.load(box + 3 * D2, mask=dm, other=0.0).to(tl.float32)[None, :] - lo_b, 15.0)
        best = tl.full([BLOCK_G], float("-inf"), tl.float32)
        nan = tl.zeros([BLOCK_G], tl.int32)
        for o0 in range(0, B, BLOCK_B):
            o = o0 + tl.arange(0, BLOCK_B)
            km = (o[:, None] < B) & dm[None, :]
            code = tl.load(codes_ptr + phys * s_kb + (kvh * B + o[:, None]) * D2 + d[None, :], mask=km, other=0)
            ka = lo_a + (code & 15).to(tl.float32) * step_a  # [BLOCK_B, BLOCK_D2]
            kb = lo_b + (code >> 4).to(tl.float32) * step_b
            best, nan = _fold_best_key(qa, qb, ka, kb, o < B, best, nan)
        best = tl.where(nan > 0, float("nan"), best)
        total += tl.sum(tl.where(i < G, best, 0.0), 0)
    tl.store(dst, total)


def _sketch_codes(reprs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """unit_score="sketch": the code rows of reprs (after the 2*Hkv box rows) as bytes, [num_blocks,
    rows, D * element size], each block's codes one contiguous run (the kernels index them flat)."""
    codes = reprs[:, 2 * num_kv_heads :].view(torch.uint8)
    assert codes.stride(2) == 1 and codes.stride(1) == codes.shape[2], "reprs[block] must be a contiguous [R, D]"
    return codes


def _no_store(store) -> None:
    if store is not None:
        raise NotImplementedError(
            "infllm: offloaded memory units (a store) are read by the CPU ops only; the Triton path "
            "would read them from pinned host memory in the kernel (docs/offload-plan.md), not built "
            "yet. Fix: leave 'offload' out of the infllm config on CUDA."
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
    store=None,
) -> torch.Tensor:
    """The topk candidates of each chunk and selection group by sum_h <q̄_h, r_{U,h}>
    (unit_score "minmax", "max_topk" and "sketch": as torch_ops.select_units).

    query:        [T, Hq, D] post-RoPE
    memory:       reads `reprs` [num_blocks, R, D] (each block's [R, D] contiguous; R =
                  config.repr_rows(Hq, Hkv))
    num_kv_heads: Hkv of the layer
    returns:      [n, S, topk] int64 memory-unit ids (not block ids), ascending, then -1 = none;
                  S = config.selection_groups(Hkv) (as torch_ops.select_units)
    """
    _no_store(store)
    n, topk, max_k = chunks.n, config.topk, chunks.max_cand
    device = query.device
    S = config.selection_groups(num_kv_heads)
    selected = torch.full((n, S, topk), -1, dtype=torch.long, device=device)
    if n == 0 or max_k == 0:
        return selected
    units = torch.arange(max_k, device=device)
    if max_k <= topk:  # every chunk takes all its candidates
        selected[:, :, :max_k] = torch.where(units < chunks.num_cand[:, None], units, -1)[:, None]
        return selected
    T, Hq, D = query.shape
    reprs = memory.reprs
    assert reprs.stride(2) == 1 and reprs.stride(1) == D, "reprs[block] must be a contiguous [R, D]"
    qbar = _qbar(query, chunks, _table(cos), _table(sin), config)
    score = torch.empty(n, S, max_k, dtype=torch.float32, device=device)
    block_u = 64 if _INTERPRET else 16
    XG = Hq * D // S
    if config.unit_score == "minmax":
        _score_minmax_kernel[(n, triton.cdiv(max_k, block_u), S)](
            qbar_ptr=qbar, reprs_ptr=reprs, bt_ptr=block_table, req_ptr=chunks.req,
            ncand_ptr=chunks.num_cand, score_ptr=score,
            s_bt=block_table.stride(0), s_rb=reprs.stride(0), MAX_CAND=max_k, HQ=Hq, D=D,
            G=Hq // num_kv_heads, HEADS=Hq // S, INIT_BLOCKS=config.init_blocks,
            BLOCK_U=block_u, BLOCK_D=_p2(D),
        )
    elif config.unit_score == "sketch":  # one program per candidate, as the exact score
        G = Hq // num_kv_heads
        codes = _sketch_codes(reprs, num_kv_heads)
        _score_sketch_kernel[(n, max_k, S)](
            qbar_ptr=qbar, reprs_ptr=reprs, codes_ptr=codes, bt_ptr=block_table, req_ptr=chunks.req,
            ncand_ptr=chunks.num_cand, score_ptr=score,
            s_bt=block_table.stride(0), s_rb=reprs.stride(0), s_kb=codes.stride(0), MAX_CAND=max_k,
            HQ=Hq, D2=D // 2, G=G, KV_HEADS=num_kv_heads // S, B=config.block_size,
            INIT_BLOCKS=config.init_blocks, BLOCK_B=exact_block_b(G, D, config.block_size),
            BLOCK_G=_p2(G), BLOCK_D2=_p2(D // 2),
        )
    elif config.unit_score == "max_topk":
        _score_max_kernel[(n, triton.cdiv(max_k, block_u), S)](
            qbar_ptr=qbar, reprs_ptr=reprs, bt_ptr=block_table, req_ptr=chunks.req,
            ncand_ptr=chunks.num_cand, score_ptr=score,
            s_bt=block_table.stride(0), s_rb=reprs.stride(0), MAX_CAND=max_k, HQ=Hq, D=D,
            R=config.repr_topk, HEADS=Hq // S, INIT_BLOCKS=config.init_blocks,
            BLOCK_U=block_u, BLOCK_D=_p2(D),
        )
    else:
        _score_kernel[(n, triton.cdiv(max_k, block_u), S)](
            qbar_ptr=qbar, reprs_ptr=reprs, bt_ptr=block_table, req_ptr=chunks.req,
            ncand_ptr=chunks.num_cand, score_ptr=score,
            s_bt=block_table.stride(0), s_rb=reprs.stride(0), X=Hq * D, XG=XG,
            INIT_BLOCKS=config.init_blocks, MAX_CAND=max_k,
            BLOCK_U=block_u, BLOCK_X=min(_p2(XG), 1024 if _INTERPRET else 256),
        )
    return top_units(score, chunks.num_cand, config)  # ascending: slot k is the unit's rank


def _qbar(query: torch.Tensor, chunks: ChunkBatch, cos: torch.Tensor, sin: torch.Tensor,
          config: InfLLMConfig) -> torch.Tensor:
    """q̄ of every chunk, [n, Hq*D] fp32 (_qbar_kernel)."""
    n, (_, Hq, D) = chunks.n, query.shape
    qbar = torch.empty(n, Hq * D, dtype=torch.float32, device=query.device)
    s_qt, s_qh, s_qd = query.stride()
    _qbar_kernel[(n, Hq)](
        q_ptr=query, qbar_ptr=qbar, c0_ptr=chunks.c0, len_ptr=chunks.length, q0_ptr=chunks.q0,
        cos_ptr=cos, sin_ptr=sin,
        s_qt=s_qt, s_qh=s_qh, s_qd=s_qd, s_cos=cos.stride(0), s_sin=sin.stride(0),
        SELECT_QUERIES=config.select_queries, FIRST_ONLY=int(config.chunking == "aligned"),
        D2=D // 2, X=Hq * D, N_LOCAL=config.n_local,
        # Two builds only (decode, prefill): a block sized by each step's longest chunk would
        # compile anew for every power of two it meets.
        BLOCK_Q=1 if chunks.max_len == 1 else (128 if _INTERPRET else 32), BLOCK_D2=_p2(D // 2),
    )
    return qbar


def exact_block_b(G: int, D: int, B: int) -> int:
    """Keys per iteration of _score_exact_kernel: about 4K elements of the [G, keys, D/2]
    products (registers on a GPU), at most the block."""
    return max(1, min(_p2(B), 4096 // (_p2(G) * _p2(D // 2))))


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
    store=None,
) -> torch.Tensor:
    """unit_score="exact" and config.retrieval_layer's selection: the topk candidates by
    sum_h max_k <q̄_h, k_raw> over every raw key of the unit (as torch_ops.select_units_exact),
    one program per (chunk, candidate, selection group) reading the unit's keys in place.
    Static launch sizes for a static plan (chunks.max_cand a bound): a CUDA graph replays it."""
    _no_store(store)
    n, topk, max_k = chunks.n, config.topk, chunks.max_cand
    device = query.device
    S = config.selection_groups(num_kv_heads)
    selected = torch.full((n, S, topk), -1, dtype=torch.long, device=device)
    if n == 0 or max_k == 0:
        return selected
    units = torch.arange(max_k, device=device)
    if max_k <= topk:  # every chunk takes all its candidates
        selected[:, :, :max_k] = torch.where(units < chunks.num_cand[:, None], units, -1)[:, None]
        return selected
    T, Hq, D = query.shape
    G, B = Hq // num_kv_heads, config.block_size
    cos, sin = _table(cos), _table(sin)
    qbar = _qbar(query, chunks, cos, sin, config)
    score = torch.empty(n, S, max_k, dtype=torch.float32, device=device)
    s_cb, s_ch, s_co, s_cd = kv_cache.stride()
    _score_exact_kernel[(n, max_k, S)](
        qbar_ptr=qbar, kv_ptr=kv_cache, bt_ptr=block_table, req_ptr=chunks.req, ncand_ptr=chunks.num_cand,
        cos_ptr=cos, sin_ptr=sin, score_ptr=score,
        s_bt=block_table.stride(0), s_cb=s_cb, s_ch=s_ch, s_co=s_co, s_cd=s_cd,
        s_cos=cos.stride(0), s_sin=sin.stride(0), MAX_CAND=max_k,
        HQ=Hq, D2=D // 2, G=G, KV_HEADS=num_kv_heads // S, B=B, N_INIT=config.n_init,
        INIT_BLOCKS=config.init_blocks, BLOCK_B=exact_block_b(G, D, B), BLOCK_G=_p2(G), BLOCK_D2=_p2(D // 2),
    )
    return top_units(score, chunks.num_cand, config)  # ascending: slot k is the unit's rank


# --------------------------------------------------------------------------------------- attend
@triton.jit
def _load_k(kv_ptr, bt_row, j, col_ok, kvh_off, s_cb, s_co, s_cd, B: tl.constexpr, D2: tl.constexpr,
            BLOCK_D2: tl.constexpr):
    """K of logical positions j (int32), as two transposed halves [D/2, N] (fp32), and the row
    bases. Only the physical block index is widened to int64: it multiplies the page stride."""
    phys = tl.load(bt_row + j // B, mask=col_ok, other=0).to(tl.int64)
    base = kv_ptr + phys * s_cb + kvh_off + (j % B) * s_co
    d = tl.arange(0, BLOCK_D2)[:, None]
    m = (d < D2) & col_ok[None, :]
    ka = tl.load(base[None, :] + d * s_cd, mask=m, other=0.0).to(tl.float32)
    kb = tl.load(base[None, :] + (d + D2) * s_cd, mask=m, other=0.0).to(tl.float32)
    return ka, kb, base, phys


@triton.jit
def _rotate_q(qa, qb, cos_ptr, sin_ptr, row, s_cos, s_sin, D2: tl.constexpr, BLOCK_D2: tl.constexpr):
    """R(-row)·q for query halves [M, D/2]: <R(-s) q, k> = <q, R(s) k>, so a key shift that is
    the same for a whole tile costs one rotation of the (smaller) query tile."""
    d = tl.arange(0, BLOCK_D2)[None, :]
    cs = tl.load(cos_ptr + row * s_cos + d, mask=d < D2, other=1.0).to(tl.float32)
    sn = tl.load(sin_ptr + row * s_sin + d, mask=d < D2, other=0.0).to(tl.float32)
    a = qa.to(tl.float32)
    b = qb.to(tl.float32)
    return (a * cs + b * sn).to(qa.dtype), (b * cs - a * sn).to(qb.dtype)


@triton.jit
def _logits(s, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """Base-2 logits of raw dot products s: scale * log2(e) * s, or with the model's soft-capping
    log2(e) * cap * tanh(scale * s / cap), tanh(x) = 1 - 2 / (e^2x + 1) from exp2 (cap_in =
    2 * scale * log2(e) / cap, cap_out = cap * log2(e); overflow gives tanh 1, as it should)."""
    if SOFTCAP:
        return cap_out * (1.0 - 2.0 / (tl.exp2(s * cap_in) + 1.0))
    return s * qk_scale


@triton.jit
def _attn_tile(
    acc, m_i, l_i, qa, qb, j, col_ok, mask,
    kv_ptr, bt_row, cos_ptr, sin_ptr, kvh_off, s_cb, s_co, s_cd, s_cos, s_sin, qk_scale,
    cap_in, cap_out, SOFTCAP: tl.constexpr, B: tl.constexpr, D2: tl.constexpr, D: tl.constexpr,
    ROTATE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, DOT_PREC: tl.constexpr,
    rot=None,
):
    """One online-softmax step over keys at logical positions j (masked by `mask` [M, N]).
    ROTATE 0: keys as stored; 1: un-rotated by -j (table row j, sine negated) to raw keys
    (positions="fixed"); positions="ordered": 2, rotated forward by table row `rot` [N] (a tile
    may straddle two units), 3, by the one row `rot` (a scalar) of the whole tile."""
    ka, kb, base, phys = _load_k(kv_ptr, bt_row, j, col_ok, kvh_off, s_cb, s_co, s_cd, B, D2, BLOCK_D2)
    if ROTATE != 0:
        d = tl.arange(0, BLOCK_D2)[:, None]
        if ROTATE == 3:
            cs = tl.load(cos_ptr + rot * s_cos + d, mask=d < D2, other=1.0).to(tl.float32)
            sn = tl.load(sin_ptr + rot * s_sin + d, mask=d < D2, other=0.0).to(tl.float32)
        else:
            m = (d < D2) & col_ok[None, :]
            row = j if ROTATE == 1 else rot
            cs = tl.load(cos_ptr + row[None, :] * s_cos + d, mask=m, other=1.0).to(tl.float32)
            sn = tl.load(sin_ptr + row[None, :] * s_sin + d, mask=m, other=0.0).to(tl.float32)
        if ROTATE == 1:
            sn = -sn
        ka, kb = ka * cs - kb * sn, kb * cs + ka * sn
    s = tl.dot(qa, ka.to(qa.dtype), input_precision=DOT_PREC)
    s += tl.dot(qb, kb.to(qb.dtype), input_precision=DOT_PREC)
    s = tl.where(mask, _logits(s, qk_scale, cap_in, cap_out, SOFTCAP), float("-inf"))
    # m_i starts finite (-1e30): fully masked rows keep alpha = 1 and p = 0, never NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    dv = tl.arange(0, BLOCK_D)[None, :]
    v = tl.load(base[:, None] + (dv + 2 * D2) * s_cd, mask=col_ok[:, None] & (dv < D), other=0.0)
    v = v.to(tl.float32).to(qa.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(qa.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


# The batch size sets SPLITS; s_selh is 0 or topk by the selection mode: one build for all.
@triton.jit(do_not_specialize=["SPLITS", "s_selh"])
def _attend_kernel(
    q_ptr,  # [T, Hq, D] post-RoPE queries, strides s_qt, s_qh, s_qd
    kv_ptr,  # [num_blocks, Hkv, B, 2*D] strides s_cb, s_ch, s_co, s_cd
    out_ptr,  # [T, Hq, D] out, strides s_ot, s_oh, s_od
    bt_ptr,  # [num_reqs, max_blocks] int block table, row stride s_bt
    sel_ptr,  # [n, S, TOPK] int64 selected unit ids (-1 = none), strides s_sel, s_selh (0 when
    #          S = 1: every KV head reads the layer's set); unused if TOPK == 0
    scores_ptr,  # [num_blocks, Hq, B] fp32, strides s_sb, s_sh, s_so (accumulated when SCORES)
    lse_ptr,  # [T, Hq] fp32 out, row stride s_lt: each query row's LSE (base 2), when LSE_OUT
    cos_ptr, sin_ptr,  # [rows, D/2] rotary table, row strides s_cos, s_sin
    req_ptr, c0_ptr, len_ptr, q0_ptr, ncand_ptr,  # [n] int32 per chunk (see ChunkBatch)
    ws_acc_ptr,  # [n*Hkv*SPLITS*BLOCK_M, BLOCK_D] fp32 split workspace (SPLITS > 1 only)
    ws_ml_ptr,  # [n*Hkv*SPLITS*BLOCK_M, 2] fp32 split workspace: (max, sum), then the LSE
    sinks_ptr,  # [Hq] fp32 the model's sink logits times log2(e) (SINKS only)
    s_qt, s_qh, s_qd, s_ot, s_oh, s_od, s_cb, s_ch, s_co, s_cd,
    s_bt, s_sel, s_selh, s_sb, s_sh, s_so, s_lt, s_cos, s_sin,
    SPLITS,  # key-range splits per (chunk, KV head); 1 outside flash-decoding
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    cap_in, cap_out,  # soft-capping constants (SOFTCAP only; see _logits)
    D: tl.constexpr, B: tl.constexpr, N_INIT: tl.constexpr, N_LOCAL: tl.constexpr,
    G: tl.constexpr,  # query heads per KV head
    QT: tl.constexpr,  # queries per program (BLOCK_M // G)
    TOPK: tl.constexpr,  # attend the selected units (0: none)
    ORDERED: tl.constexpr,  # positions="ordered": global blocks moved forward by whole blocks
    SCORES: tl.constexpr,  # add the local keys' softmax mass into `scores` here (one query tile)
    LSE_OUT: tl.constexpr,  # write the LSE for _window_scores_kernel instead (several tiles)
    SOFTCAP: tl.constexpr,  # the model's logit soft-capping
    SINKS: tl.constexpr,  # the model's sink logits join each row's softmax (not its values)
    PHASE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (chunk, query tile x split, KV head). PHASE 0: whole key set in one program,
    writes `out`, then the score pass (SCORES) or the LSE (LSE_OUT).
    Flash-decoding (SPLITS > 1, one query tile per chunk): PHASE 1 runs key tiles
    split, split+SPLITS, ... of every segment and writes partial (acc, m, l) to the workspace;
    _merge_kernel combines them into `out` and the LSE; PHASE 2 is the split score pass.

    Positions, lengths and loop bounds are int32 (the plan's tensors are): 64-bit division by a
    run-time block size cost ~95 div.s64 and spilled registers. B is a constexpr (a power of
    two: // and % are shifts). Each score is added by exactly one program, so the sums do not
    depend on scheduling."""
    c = tl.program_id(0)
    t0 = (tl.program_id(1) // SPLITS) * QT
    split = tl.program_id(1) % SPLITS
    kvh = tl.program_id(2)
    length = tl.load(len_ptr + c)
    if t0 >= length:  # the grid is sized by the wave's longest chunk
        return
    c0 = tl.load(c0_ptr + c)
    q0 = tl.load(q0_ptr + c)
    req = tl.load(req_ptr + c).to(tl.int64)
    ncand = tl.load(ncand_ptr + c)
    bt_row = bt_ptr + req * s_bt
    kvh_off = kvh * s_ch
    D2: tl.constexpr = D // 2
    STEP = BLOCK_N * SPLITS
    first = split * BLOCK_N

    # Rows are (query, head of this KV head): row r = query t0 + r // G, head kvh*G + r % G.
    r = tl.arange(0, BLOCK_M)
    qi = r // G
    row_ok = (qi < QT) & (t0 + qi < length)
    p = c0 + t0 + qi  # absolute positions
    w = tl.maximum(p - N_LOCAL + 1, 0)  # w(p): first token of p's window
    n_q = tl.minimum(length - t0, QT)
    p_first = c0 + t0
    p_last = p_first + n_q - 1
    w_first = tl.maximum(p_first - N_LOCAL + 1, 0)
    w_last = tl.maximum(p_last - N_LOCAL + 1, 0)

    d = tl.arange(0, BLOCK_D2)[None, :]
    qm = row_ok[:, None] & (d < D2)
    q_row = (q0 + t0 + qi).to(tl.int64)
    qptr = q_ptr + q_row[:, None] * s_qt + (kvh * G + r % G)[:, None] * s_qh
    dot_t = q_ptr.dtype.element_ty
    # Local queries as stored (ordinary RoPE); kept for the score pass.
    la = tl.load(qptr + d * s_qd, mask=qm, other=0.0).to(tl.float32).to(dot_t)
    lb = tl.load(qptr + (d + D2) * s_qd, mask=qm, other=0.0).to(tl.float32).to(dot_t)
    # Workspace row of this (chunk, KV head, split): [BLOCK_M, BLOCK_D] acc and [BLOCK_M, 2] (m, l).
    ws = ((c * tl.num_programs(2) + kvh) * SPLITS + split) * BLOCK_M

    if PHASE != 2:
        if ORDERED:  # the query as stored; the keys move (docs/design.md section 2.7)
            ga = la
            gb = lb
        else:
            # Global queries: R(n_local-1)·q_raw = R(n_local-1-p)·q, a signed rotation per row.
            # Rows before n_local have no global keys: angle 0 keeps reads inside short tables.
            a = tl.where(p >= N_LOCAL, N_LOCAL - 1 - p, 0)[:, None]
            cs = tl.load(cos_ptr + tl.abs(a) * s_cos + d, mask=qm, other=1.0).to(tl.float32)
            sn = tl.load(sin_ptr + tl.abs(a) * s_sin + d, mask=qm, other=0.0).to(tl.float32)
            sn = tl.where(a < 0, -sn, sn)
            qa = la.to(tl.float32)
            qb = lb.to(tl.float32)
            ga = (qa * cs - qb * sn).to(dot_t)
            gb = (qb * cs + qa * sn).to(dot_t)
        # ordered: init moves forward by the (K - nsel) unselected candidates' blocks, the unit
        # of rank k by (K - nsel + k - u) blocks, the remainder not at all (true distances).
        gap = (ncand - tl.minimum(ncand, TOPK)) * B
        # ordered, per tile: in decode (16 rows) the query rotates back by the tile's shift
        # (`_rotate_q`, cheaper than BLOCK_N keys); in prefill the keys rotate forward, by one
        # row when no tile straddles two units (BLOCK_N divides B; tiles start at multiples of
        # BLOCK_N), else by a row per column. Chosen with compile_check: no variant spills.
        TILE_SHIFT: tl.constexpr = B % BLOCK_N == 0
        Q_SHIFT: tl.constexpr = ORDERED and TILE_SHIFT and BLOCK_M <= 16
        ROT_I: tl.constexpr = (0 if Q_SHIFT else 3) if ORDERED else 1
        ROT_U: tl.constexpr = (0 if Q_SHIFT else (3 if TILE_SHIFT else 2)) if ORDERED else 1
        ROT_R: tl.constexpr = 0 if ORDERED else 1

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if SINKS and PHASE == 0:  # the sink starts each row's softmax (split: _merge_kernel adds it)
            m_i = tl.load(sinks_ptr + kvh * G + r % G)
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        cols = tl.arange(0, BLOCK_N)

        # Local window [w(p), p]: keys and queries as stored (ordinary RoPE).
        for k0 in range(w_first + first, p_last + 1, STEP):
            j = k0 + cols
            ok = j <= p_last
            mask = row_ok[:, None] & (j[None, :] >= w[:, None]) & (j[None, :] <= p[:, None])
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, la, lb, j, ok, mask, kv_ptr, bt_row, cos_ptr,
                                       sin_ptr, kvh_off, s_cb, s_co, s_cd, s_cos, s_sin, qk_scale,
                                       cap_in, cap_out, SOFTCAP, B, D2, D, False, BLOCK_D, BLOCK_D2, DOT_PREC)
        # Init [0, min(n_init, w(p))).
        n_init = tl.minimum(w_last, N_INIT)
        if Q_SHIFT:  # init: one shift for all its blocks
            ia, ib = _rotate_q(la, lb, cos_ptr, sin_ptr, gap, s_cos, s_sin, D2, BLOCK_D2)
        else:
            ia = ga
            ib = gb
        for k0 in range(first, n_init, STEP):
            j = k0 + cols
            ok = j < n_init
            mask = row_ok[:, None] & ok[None, :] & (j[None, :] < w[:, None])
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, ia, ib, j, ok, mask, kv_ptr, bt_row, cos_ptr,
                                       sin_ptr, kvh_off, s_cb, s_co, s_cd, s_cos, s_sin, qk_scale,
                                       cap_in, cap_out, SOFTCAP, B, D2, D, ROT_I, BLOCK_D, BLOCK_D2, DOT_PREC, gap)
        # Selected units (valid ids come first in each row of `selected`): whole units.
        if TOPK > 0:
            n_sel = tl.minimum(ncand, TOPK) * B
            for v0 in range(first, n_sel, STEP):
                v = v0 + cols
                u = tl.load(sel_ptr + c * s_sel + kvh * s_selh + v // B, mask=v < n_sel,
                            other=-1).to(tl.int32)
                ok = (v < n_sel) & (u >= 0)
                j = N_INIT + u * B + v % B
                mask = row_ok[:, None] & ok[None, :]
                # ids ascend, so slot v // B is the unit's rank
                ua = ga
                ub = gb
                if TILE_SHIFT:
                    u0 = tl.load(sel_ptr + c * s_sel + kvh * s_selh + v0 // B).to(tl.int32)
                    rot = tl.where(u0 >= 0, gap + (v0 // B - u0) * B, 0)
                else:
                    rot = tl.where(ok, gap + (v // B - u) * B, 0)
                if Q_SHIFT:
                    ua, ub = _rotate_q(la, lb, cos_ptr, sin_ptr, rot, s_cos, s_sin, D2, BLOCK_D2)
                acc, m_i, l_i = _attn_tile(acc, m_i, l_i, ua, ub, j, ok, mask, kv_ptr, bt_row,
                                           cos_ptr, sin_ptr, kvh_off, s_cb, s_co, s_cd, s_cos,
                                           s_sin, qk_scale, cap_in, cap_out, SOFTCAP, B, D2, D,
                                           ROT_U, BLOCK_D, BLOCK_D2,
                                           DOT_PREC, rot)
        # Remainder [R0, w(p)): left the window but not yet a candidate when the chunk started.
        r0 = N_INIT + ncand * B
        for k0 in range(r0 + first, w_last, STEP):
            j = k0 + cols
            ok = j < w_last
            mask = row_ok[:, None] & ok[None, :] & (j[None, :] < w[:, None])
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, ga, gb, j, ok, mask, kv_ptr, bt_row, cos_ptr,
                                       sin_ptr, kvh_off, s_cb, s_co, s_cd, s_cos, s_sin, qk_scale,
                                       cap_in, cap_out, SOFTCAP, B, D2, D, ROT_R, BLOCK_D, BLOCK_D2, DOT_PREC)

        dv = tl.arange(0, BLOCK_D)[None, :]
        if PHASE == 1:
            tl.store(ws_acc_ptr + (ws + r)[:, None] * BLOCK_D + dv, acc)
            tl.store(ws_ml_ptr + (ws + r) * 2, m_i)
            tl.store(ws_ml_ptr + (ws + r) * 2 + 1, l_i)
            return
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        optr = out_ptr + q_row[:, None] * s_ot + (kvh * G + r % G)[:, None] * s_oh
        tl.store(optr + dv * s_od, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dv < D))
        lse = m_i + tl.log2(l_safe)
        if LSE_OUT:
            tl.store(lse_ptr + q_row * s_lt + kvh * G + r % G, lse, mask=row_ok)
    else:
        lse = tl.load(ws_ml_ptr + (ws - split * BLOCK_M + r) * 2)  # the merge kernel's LSE

    if SCORES:
        # Representative scores: the joint-softmax probability of each local key, summed over
        # this tile's queries per head. Needs the final LSE, hence a second pass over the window.
        g = r % G
        cols = tl.arange(0, BLOCK_N)
        for k0 in range(w_first + first, p_last + 1, STEP):
            j = k0 + cols
            ok = j <= p_last
            mask = row_ok[:, None] & (j[None, :] >= w[:, None]) & (j[None, :] <= p[:, None])
            ka, kb, base, phys = _load_k(kv_ptr, bt_row, j, ok, kvh_off, s_cb, s_co, s_cd, B, D2,
                                         BLOCK_D2)
            s = tl.dot(la, ka.to(dot_t), input_precision=DOT_PREC)
            s += tl.dot(lb, kb.to(dot_t), input_precision=DOT_PREC)
            prob = tl.exp2(tl.where(mask, _logits(s, qk_scale, cap_in, cap_out, SOFTCAP) - lse[:, None],
                                    float("-inf")))
            sptr = scores_ptr + phys * s_sb + (j % B) * s_so + kvh * G * s_sh
            for gg in tl.static_range(G):
                mass = tl.sum(tl.where((g == gg)[:, None], prob, 0.0), 0)
                # One writer per score in this launch (relaxed: no ordering needed); atomic only
                # because two requests can share a prefix-cached block.
                tl.atomic_add(sptr + gg * s_sh, mass, mask=ok, sem="relaxed")


@triton.jit
def _window_scores_kernel(
    q_ptr,  # [T, Hq, D] post-RoPE queries, strides s_qt, s_qh, s_qd
    kv_ptr,  # [num_blocks, Hkv, B, 2*D] strides s_cb, s_ch, s_co, s_cd
    bt_ptr,  # [num_reqs, max_blocks] int block table, row stride s_bt
    scores_ptr,  # [num_blocks, Hq, B] fp32, strides s_sb, s_sh, s_so; accumulated
    lse_ptr,  # [T, Hq] fp32, row stride s_lt: the LSE of every query row (from _attend_kernel)
    req_ptr, c0_ptr, len_ptr, q0_ptr,  # [n] int32 per chunk (see ChunkBatch)
    s_qt, s_qh, s_qd, s_cb, s_ch, s_co, s_cd, s_bt, s_sb, s_sh, s_so, s_lt,
    qk_scale, cap_in, cap_out,
    D: tl.constexpr, B: tl.constexpr, N_LOCAL: tl.constexpr,
    G: tl.constexpr, QT: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D2: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (chunk, key tile, KV head): the representative scores of a prefill chunk's local
    keys. Each program owns BLOCK_N keys of the chunk's windows [w(first query), last query] and
    sums their joint-softmax probability over every query that sees them, query tile by query
    tile in order, then adds the per-head sums once: the totals do not depend on which program
    runs first (atomic adds from every query tile did)."""
    c = tl.program_id(0)
    kvh = tl.program_id(2)
    length = tl.load(len_ptr + c)
    c0 = tl.load(c0_ptr + c)
    p_last = c0 + length - 1
    k_first = tl.maximum(c0 - N_LOCAL + 1, 0) + tl.program_id(1) * BLOCK_N
    if k_first > p_last:  # the grid is sized by the longest chunk's span
        return
    q0 = tl.load(q0_ptr + c)
    req = tl.load(req_ptr + c).to(tl.int64)
    D2: tl.constexpr = D // 2
    dot_t = q_ptr.dtype.element_ty
    j = k_first + tl.arange(0, BLOCK_N)
    ok = j <= p_last
    ka, kb, base, phys = _load_k(kv_ptr, bt_ptr + req * s_bt, j, ok, kvh * s_ch, s_cb, s_co, s_cd,
                                 B, D2, BLOCK_D2)
    ka = ka.to(dot_t)
    kb = kb.to(dot_t)
    r = tl.arange(0, BLOCK_M)
    qi = r // G
    g = r % G
    d = tl.arange(0, BLOCK_D2)[None, :]
    mass = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # The queries that see a key of this tile: p in [k_first, j_max + N_LOCAL - 1].
    j_max = tl.minimum(k_first + BLOCK_N - 1, p_last)
    t_end = tl.minimum(length, j_max + N_LOCAL - c0)
    for t0 in range(tl.maximum(k_first - c0, 0), t_end, QT):
        row_ok = (qi < QT) & (t0 + qi < t_end)
        p = c0 + t0 + qi
        w = tl.maximum(p - N_LOCAL + 1, 0)
        q_row = (q0 + t0 + qi).to(tl.int64)
        qptr = q_ptr + q_row[:, None] * s_qt + (kvh * G + g)[:, None] * s_qh
        qm = row_ok[:, None] & (d < D2)
        qa = tl.load(qptr + d * s_qd, mask=qm, other=0.0).to(tl.float32).to(dot_t)
        qb = tl.load(qptr + (d + D2) * s_qd, mask=qm, other=0.0).to(tl.float32).to(dot_t)
        lse = tl.load(lse_ptr + q_row * s_lt + kvh * G + g, mask=row_ok, other=0.0)
        s = tl.dot(qa, ka, input_precision=DOT_PREC)
        s += tl.dot(qb, kb, input_precision=DOT_PREC)
        mask = row_ok[:, None] & ok[None, :] & (j[None, :] >= w[:, None]) & (j[None, :] <= p[:, None])
        mass += tl.exp2(tl.where(mask, _logits(s, qk_scale, cap_in, cap_out, SOFTCAP) - lse[:, None],
                                 float("-inf")))
    sptr = scores_ptr + phys * s_sb + (j % B) * s_so + kvh * G * s_sh
    for gg in tl.static_range(G):
        # Atomic only because two requests can share a prefix-cached block; relaxed: no ordering.
        tl.atomic_add(sptr + gg * s_sh, tl.sum(tl.where((g == gg)[:, None], mass, 0.0), 0), mask=ok,
                      sem="relaxed")


@triton.jit(do_not_specialize=["SPLITS"])
def _merge_kernel(
    out_ptr,  # [T, Hq, D] out, strides s_ot, s_oh, s_od
    q0_ptr, len_ptr,  # [n] int32: first query row and queries of each chunk
    ws_acc_ptr, ws_ml_ptr,  # the split workspaces of _attend_kernel (PHASE 1)
    sinks_ptr,  # [Hq] fp32 sink logits times log2(e) (SINKS only)
    s_ot, s_oh, s_od, SPLITS,
    D: tl.constexpr, G: tl.constexpr, QT: tl.constexpr, SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Combine the SPLITS partial softmaxes of one (chunk, KV head) by log-sum-exp, and the
    sink logit when the model has one; write `out` and leave the LSE in split 0's (m) slot for
    the score pass."""
    c = tl.program_id(0)
    kvh = tl.program_id(1)
    length = tl.load(len_ptr + c)
    if length == 0:  # a padding chunk: its splits wrote nothing
        return
    r = tl.arange(0, BLOCK_M)
    dv = tl.arange(0, BLOCK_D)[None, :]
    base = (c * tl.num_programs(1) + kvh) * SPLITS * BLOCK_M
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(ws_ml_ptr + (base + s * BLOCK_M + r) * 2))
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SINKS:
        sink = tl.load(sinks_ptr + kvh * G + r % G)
        m = tl.maximum(m, sink)
        l_sum = tl.exp2(sink - m)
    for s in range(SPLITS):
        row = base + s * BLOCK_M + r
        f = tl.exp2(tl.load(ws_ml_ptr + row * 2) - m)
        l_sum += f * tl.load(ws_ml_ptr + row * 2 + 1)
        acc += f[:, None] * tl.load(ws_acc_ptr + row[:, None] * BLOCK_D + dv)
    l_safe = tl.where(l_sum > 0, l_sum, 1.0)
    qi = r // G
    row_ok = (qi < QT) & (qi < length)
    q_row = (tl.load(q0_ptr + c) + qi).to(tl.int64)
    optr = out_ptr + q_row[:, None] * s_ot + (kvh * G + r % G)[:, None] * s_oh
    tl.store(optr + dv * s_od, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv < D))
    tl.debug_barrier()
    tl.store(ws_ml_ptr + (base + r) * 2, m + tl.log2(l_safe))


# Key-range splits for decode waves (flash-decoding); None = enough programs to fill the GPU.
# Splits take every SPLITS-th key tile of each segment (local, init, units, remainder).
DECODE_SPLITS: int | None = None
MAX_DECODE_SPLITS = 16
# Key tile; None = by head size (`_tiling`). Tests shrink it so small windows span several splits.
BLOCK_N: int | None = None


def multiprocessors(device: torch.device) -> int | None:
    """SMs of a CUDA device (None elsewhere: the interpreter gains nothing from splits)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_splits(n: int, Hkv: int, device) -> int:
    if DECODE_SPLITS is not None:
        return DECODE_SPLITS
    sms = multiprocessors(device)
    if sms is None:
        return 1
    return max(1, min(MAX_DECODE_SPLITS, triton.cdiv(2 * sms, n * Hkv)))


def _tiling(D: int, G: int, decode: bool, dtype: torch.dtype, ordered: bool = False,
            scores: bool = True) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the attend kernels.

    A decode tile is the G heads of one query (tl.dot needs 16 rows); a prefill tile is 64 rows
    of (query, head). The rest was chosen with benchmarks/ops/compile_check.py so that variants
    do not spill registers or exceed Hopper's 227 KB of shared memory per block, at head sizes
    64, 128 and 256: from D 128 on, 8 warps share the [D/2, N] key tiles (re-rotated in fp32,
    the register peak); at D 256 prefill also drops the software pipelining (two stages spilled
    with every key tile from 16 to 64). fp32 caches have no tensor-core dot (an FMA loop with
    larger register fragments): smaller tiles, and no pipelining except in D-256 decode, where
    one stage spilled and two did not. positions="ordered" at D 256 prefill re-rotates its key
    tiles by one row per tile (not per key): 32 keys spilled 12 B there, 16 do not.
    A D-128 one-program decode without the score pass (unit_score="minmax"; `scores` False)
    spilled 40 B with two stages, where the split decode did not: one stage there only (the
    split decode spills with one).
    """
    if dtype == torch.float32:
        if decode:
            block_m, block_n, num_warps, num_stages = (16, 32, 8, 1) if D <= 128 else (16, 16, 8, 2)
        else:
            block_m, block_n, num_warps, num_stages = 32 if D <= 128 else 16, 32, 4 if D <= 64 else 8, 1
    elif D <= 64:
        block_m, block_n, num_warps, num_stages = 16 if decode else 64, 64, 4, 2
    elif D <= 128 or decode:
        block_m, block_n, num_warps, num_stages = 16 if decode else 64, 64, 8, 2
        if decode and not scores and D <= 128:
            num_stages = 1
    else:
        block_m, block_n, num_warps, num_stages = 64, 16 if ordered else 32, 8, 1
    return max(block_m, _p2(G)), BLOCK_N or block_n, num_warps, num_stages


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
    store=None,
) -> None:
    """InfLLM attention for every query of the wave; writes `out`, accumulates `memory.scores`.

    query:        [T, Hq, D] post-RoPE
    kv_cache:     [num_blocks, Hkv, B, 2*D] with this step's K/V written
    memory:       `scores` [num_blocks, Hq, B] gain the local softmax mass (config.accumulates_scores)
    selected:     [n, S, topk] unit ids from `select_units` (-1 = none; S = 1 or Hkv, as in
                  torch_ops.attend), or None when topk == 0
    out:          [T, Hq, D]; only the wave's query rows are written
    softcap:      logits s -> softcap * tanh(s / softcap) before the softmax (0: none)
    sinks:        [Hq] one logit per query head added to the softmax's denominator (None: none)

    Launches: decode waves run one program per (chunk, KV head) with the score pass inline, or
    flash-decoding (attend splits, merge, split score pass) when that leaves SMs idle; prefill
    waves run query tiles that write the LSE, then `_window_scores_kernel`.
    """
    _no_store(store)
    n = chunks.n
    if n == 0:
        return
    T, Hq, D = query.shape
    Hkv = kv_cache.shape[1]
    G = Hq // Hkv
    assert D % 2 == 0 and kv_cache.shape[3] == 2 * D
    decode = chunks.max_len == 1
    splits = _decode_splits(n, Hkv, query.device) if decode else 1
    block_m, block_n, num_warps, num_stages = _tiling(D, G, decode, query.dtype, config.positions == "ordered",
                                                       config.accumulates_scores or splits > 1)
    qt = block_m // G
    topk = config.topk if (selected is not None and config.topk > 0) else 0
    scores_on = config.accumulates_scores
    sel = selected if topk else chunks.num_cand
    if topk and sel.shape[1] not in (1, Hkv):
        raise ValueError(f"selected {tuple(sel.shape)}: one unit set per layer or per KV head ({Hkv})")
    s_selh = sel.stride(1) if topk and sel.shape[1] > 1 else 0
    scores = memory.scores
    cos, sin = _table(cos), _table(sin)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=query.device) if scores_on and not decode else scores
    if splits > 1:
        ws_acc = torch.empty(n * Hkv * splits * block_m, _p2(D), dtype=torch.float32, device=query.device)
        ws_ml = torch.empty(n * Hkv * splits * block_m, 2, dtype=torch.float32, device=query.device)
    else:
        ws_acc = ws_ml = scores  # unused
    s_qt, s_qh, s_qd = query.stride()
    s_ot, s_oh, s_od = out.stride()
    s_cb, s_ch, s_co, s_cd = kv_cache.stride()
    s_sb, s_sh, s_so = scores.stride()
    B = config.block_size
    # The model's softmax variants: base-2 constants (see _logits) and sinks in base 2.
    cap_in = 2.0 * scale * _LOG2E / softcap if softcap else 0.0
    cap_out = softcap * _LOG2E
    sinks2 = (sinks.float() * _LOG2E).contiguous() if sinks is not None else scores  # unused if None
    args = dict(
        q_ptr=query, kv_ptr=kv_cache, out_ptr=out, bt_ptr=block_table, sel_ptr=sel,
        scores_ptr=scores, lse_ptr=lse, cos_ptr=cos, sin_ptr=sin,
        req_ptr=chunks.req, c0_ptr=chunks.c0, len_ptr=chunks.length, q0_ptr=chunks.q0,
        ncand_ptr=chunks.num_cand, ws_acc_ptr=ws_acc, ws_ml_ptr=ws_ml, sinks_ptr=sinks2,
        s_qt=s_qt, s_qh=s_qh, s_qd=s_qd, s_ot=s_ot, s_oh=s_oh, s_od=s_od,
        s_cb=s_cb, s_ch=s_ch, s_co=s_co, s_cd=s_cd,
        s_bt=block_table.stride(0), s_sel=sel.stride(0), s_selh=s_selh, s_sb=s_sb, s_sh=s_sh, s_so=s_so,
        s_lt=lse.stride(0), s_cos=cos.stride(0), s_sin=sin.stride(0),
        SPLITS=splits, qk_scale=scale * _LOG2E, cap_in=cap_in, cap_out=cap_out,
        D=D, B=B, N_INIT=config.n_init, N_LOCAL=config.n_local,
        G=G, QT=qt, TOPK=topk, ORDERED=config.positions == "ordered",
        SCORES=scores_on and decode, LSE_OUT=scores_on and not decode,
        SOFTCAP=bool(softcap), SINKS=sinks is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_p2(D), BLOCK_D2=_p2(D // 2),
        DOT_PREC=_dot_prec(query.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    grid = (n, triton.cdiv(chunks.max_len, qt) * splits, Hkv)
    if splits == 1:
        _attend_kernel[grid](**args, PHASE=0)
        if scores_on and not decode:
            span = chunks.max_len + config.n_local - 1  # keys of the longest chunk's windows
            _window_scores_kernel[(n, triton.cdiv(span, block_n), Hkv)](
                q_ptr=query, kv_ptr=kv_cache, bt_ptr=block_table, scores_ptr=scores, lse_ptr=lse,
                req_ptr=chunks.req, c0_ptr=chunks.c0, len_ptr=chunks.length, q0_ptr=chunks.q0,
                s_qt=s_qt, s_qh=s_qh, s_qd=s_qd, s_cb=s_cb, s_ch=s_ch, s_co=s_co, s_cd=s_cd,
                s_bt=block_table.stride(0), s_sb=s_sb, s_sh=s_sh, s_so=s_so, s_lt=lse.stride(0),
                qk_scale=scale * _LOG2E, cap_in=cap_in, cap_out=cap_out, D=D, B=B,
                N_LOCAL=config.n_local, G=G, QT=qt, SOFTCAP=bool(softcap),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D2=_p2(D // 2), DOT_PREC=_dot_prec(query.dtype),
                num_warps=num_warps, num_stages=num_stages,
            )
        return
    _attend_kernel[grid](**args, PHASE=1)
    _merge_kernel[(n, Hkv)](
        out_ptr=out, q0_ptr=chunks.q0, len_ptr=chunks.length, ws_acc_ptr=ws_acc, ws_ml_ptr=ws_ml,
        sinks_ptr=sinks2, s_ot=s_ot, s_oh=s_oh, s_od=s_od, SPLITS=splits, D=D,
        G=G, QT=qt, SINKS=sinks is not None, BLOCK_M=block_m, BLOCK_D=_p2(D),
    )
    if scores_on:
        _attend_kernel[grid](**args, PHASE=2)
