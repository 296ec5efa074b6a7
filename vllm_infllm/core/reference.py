"""The oracle: InfLLM attention (docs/design.md section 2) for one contiguous sequence, fp32, written for clarity.

Every other path (paged torch ops, Triton kernels, the vLLM backend) is tested against this.
It loops over selection chunks and queries in position order, exactly as the spec reads:

  for each selection chunk C = [c0, c1):
      seal every memory unit that just became a candidate (ends at or before w(c0))
      select the topk candidates by  sum_h <mean_{p in C} R(n_local-1) q_raw_h(p), r_{U,h}>
          (select_queries=m: the mean over the chunk's last m queries only)
          (chunking="aligned": by the chunk's first query alone; chunks are schedule-free)
          (contiguity=c: ranked by the best score within c units, then their own score)
          (unit_score="minmax": sum_h sum_d max(q̄_hd min_{U,d}, q̄_hd max_{U,d}), Quest's bound)
          (unit_score="max_topk": sum_h max_i <q̄_h, k_{U,h,i}>, the repr_topk keys kept apart)
          (unit_score="exact": sum_h max_{k in U} <q̄_h, k_raw>, every raw key of the unit)
          (unit_score="sketch": the same over each raw key's 4-bit sketch: per KV head and
           channel, lo + round((k - lo) / step) * step, step = (hi - lo) / 15, lo/hi the
           unit's per-channel min and max of that KV head's raw keys)
          (selection="layer": h over all query heads, one set shared by all heads;
           selection="kv_head": h over the G query heads of each KV head, one set per KV head)
          (retrieval_layer=L: layer L scores sum_h max_{k in U} <q̄_h, k_raw>, every raw key
           of the unit; the layers above L take L's units for the same chunk, scoring nothing)
      for each query p in C:
          local  = [w(p), p]                                  ordinary RoPE
          global = init [0, min(n_init, w(p)))  +  selected units of p's KV head  +  remainder [R0, w(p))
                   positions="fixed": all at relative distance n_local-1
                   positions="ordered": in their original order at compressed positions
                   0 .. Ng-1, the query at Ng + (p - w(p)) (distances n_local-ish .. < p + 1)
          one softmax over local + global
          every local key j gains P_h(p, j) in its fp32 representative score s_h(j)

Inputs are *before* RoPE; the oracle applies RoPE itself with the given table, laid out as the
model lays it out (`rope`: full-width NeoX by default; partial rotary, GPT-J pairs).

The model's softmax variants act on every logit, local and global alike: `softcap` (Gemma 2)
maps a logit s to softcap * tanh(s / softcap); `sinks` (GPT-OSS) adds one learned logit per query
head to the softmax's denominator only (the sink has no value). Selection scores are dot
products with the representatives, as without them.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from .config import InfLLMConfig
from .rope import RopeLayout


@dataclasses.dataclass
class ChunkTrace:
    c0: int
    c1: int
    num_candidates: int
    selected: list[int]  # memory-unit indices (sorted); selection="kv_head": union over KV heads
    per_kv_head: list[list[int]]  # the units each KV head attends (sorted), [Hkv]


@dataclasses.dataclass
class ReferenceTrace:
    out: torch.Tensor  # [T, Hq, D] fp32
    chunks: list[ChunkTrace]
    reprs: dict[int, torch.Tensor]  # unit -> [Hq, D] fp32 representative keys (raw, un-rotated);
    #                                 unit_score="minmax": [2*Hkv, D], min and max raw key per KV head
    #                                 unit_score="max_topk": [Hq*repr_topk, D], head h's keys at
    #                                 rows h*repr_topk .. (most-attended first)
    #                                 unit_score="exact": [0, D] (nothing is stored)
    #                                 unit_score="sketch": [2*Hkv + B*Hkv, D]: minmax's box, then
    #                                 the sketched raw keys, row 2*Hkv + g*B + o (KV head g,
    #                                 offset o), the values the stored 4-bit codes stand for
    scores: torch.Tensor  # [Hq, T] fp32 accumulated representative scores


def selection_chunks(
    total: int, config: InfLLMConfig, prefill_len: int | None = None, step_bounds=()
) -> list[tuple[int, int]]:
    """Selection chunks of a sequence of `total` tokens, in position order.

    chunking="step": prefill tokens [0, prefill_len) form spans aligned to multiples of
    `config.chunk`, cut again at every scheduler-step boundary in `step_bounds`; later tokens
    are decoded one at a time. chunking="aligned": the spans stop before the prompt's last query,
    which selects alone like every later token, and `step_bounds` change nothing.
    """
    prefill_len = total if prefill_len is None else prefill_len
    if config.chunking == "aligned":
        last = max(0, prefill_len - 1)
        cuts = set(range(0, last, config.chunk)) | set(range(last, total + 1)) | {0, total}
        return [(a, b) for a, b in itertools.pairwise(sorted(c for c in cuts if c <= total)) if b > a]
    cuts = set(range(0, prefill_len, config.chunk)) | {b for b in step_bounds if 0 < b < prefill_len}
    cuts |= set(range(prefill_len, total + 1))
    cuts |= {0, prefill_len, total}
    points = sorted(c for c in cuts if 0 <= c <= total)
    return [(a, b) for a, b in itertools.pairwise(points) if b > a]


def infllm_reference_trace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: InfLLMConfig,
    prefill_len: int | None = None,
    scale: float | None = None,
    step_bounds=(),
    *,
    rope: RopeLayout | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    layer: int = 0,
    retrieval: ReferenceTrace | None = None,
) -> ReferenceTrace:
    """Like `infllm_attention_reference`, also returning selections, representatives and scores.

    `layer`, `retrieval`: with config.retrieval_layer = L, this layer's index (L: select by the
    exact score) and, for a layer above L, layer L's trace of the same sequence, whose chunk
    selections this layer attends.

    `step_bounds`: positions where the scheduler started a new step during prefill (selection
    chunks are cut there too with chunking="step", docs/design.md section 2.3; "aligned" ignores
    them); the plain contract has none. `rope`, `softcap`, `sinks`: as in
    `infllm_attention_reference`.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if k.shape != (T, Hkv, D) or v.shape != (T, Hkv, D) or Hq % Hkv:
        raise ValueError(f"bad shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    rope = rope or RopeLayout(D, D)
    if rope.head_size != D:
        raise ValueError(f"rope layout is for head size {rope.head_size}, the heads have {D}")
    if cos.shape[0] < max(T, config.n_local) or cos.shape[1] != rope.rotary_dim // 2 or sin.shape != cos.shape:
        raise ValueError(
            f"rotary table {tuple(cos.shape)} must be [>= max(T={T}, n_local={config.n_local}), "
            f"{rope.rotary_dim // 2}]"
        )
    if sinks is not None and sinks.shape != (Hq,):
        raise ValueError(f"sinks {tuple(sinks.shape)} must hold one logit per query head ({Hq})")
    role = config.layer_role(layer) if config.topk > 0 else "own"
    if role == "reader" and retrieval is None:
        raise ValueError(f"layer {layer} is above retrieval_layer={config.retrieval_layer}: pass that "
                         "layer's trace as retrieval=")
    given = {} if retrieval is None else {(c.c0, c.c1): c for c in retrieval.chunks}
    G = Hq // Hkv
    B, n_init, n_local = config.block_size, config.n_init, config.n_local
    scale = D**-0.5 if scale is None else scale
    q, k, v = q.float(), k.float(), v.float()
    kv_head = torch.arange(Hq) // G

    pos = torch.arange(T)
    q_local = rope.rotate(q, cos, sin, pos)  # R(p) q_raw(p)
    k_local = rope.rotate(k, cos, sin, pos)  # R(j) k_raw(j)
    q_global = rope.rotate(q, cos, sin, torch.full((T,), n_local - 1))  # R(n_local-1) q_raw(p)
    k_global = k  # raw keys: every global key at relative distance n_local-1

    def logits(s: torch.Tensor) -> torch.Tensor:  # the model's soft-capping, if any
        return softcap * torch.tanh(s / softcap) if softcap else s

    out = torch.zeros(T, Hq, D)
    scores = torch.zeros(Hq, T)
    reprs: dict[int, torch.Tensor] = {}
    traces: list[ChunkTrace] = []

    def unit_tokens(u: int) -> torch.Tensor:
        return torch.arange(n_init + u * B, n_init + (u + 1) * B)

    def unit_score(q_bar: torch.Tensor, u: int, heads: slice) -> torch.Tensor:
        """Sum over `heads` of query head h's score of unit u (section 2.7)."""
        if role == "retrieval" or config.unit_score == "exact":  # every raw key of the unit, h's KV head
            keys = k_global[unit_tokens(u)][:, kv_head[heads]]  # [B, h, D]
            return torch.einsum("hd,bhd->hb", q_bar[heads], keys).amax(1).sum()
        r = reprs[u]
        if config.unit_score == "sketch":  # the exact score of the sketched keys
            keys = r[2 * Hkv :].view(Hkv, B, D)[kv_head[heads]]  # [h, B, D]
            return torch.einsum("hd,hbd->hb", q_bar[heads], keys).amax(1).sum()
        if config.unit_score == "minmax":  # Quest: max of q·k over the box [min, max]
            lo, hi = r.view(Hkv, 2, D)[kv_head[heads]].unbind(1)  # [h, D] each
            return torch.maximum(q_bar[heads] * lo, q_bar[heads] * hi).sum()
        if config.unit_score == "max_topk":  # each head's best-matching representative key
            keys = r.view(Hq, config.repr_topk, D)[heads]  # [h, r, D]
            return torch.einsum("hd,hrd->hr", q_bar[heads], keys).amax(1).sum()
        return (q_bar[heads] * r[heads]).sum()

    def top_units(score: list[float]) -> list[int]:
        """The topk units by score (contiguity c > 0: by the best score within c units, then by
        their own score, then by position), ascending."""
        c = config.contiguity
        if c == 0:
            return sorted(torch.topk(torch.tensor(score), config.topk).indices.tolist())
        near = [max(score[max(0, u - c) : u + c + 1]) for u in range(len(score))]
        order = sorted(range(len(score)), key=lambda u: (-near[u], -score[u], u))
        return sorted(order[: config.topk])

    for c0, c1 in selection_chunks(T, config, prefill_len, step_bounds):
        # Sealing: a unit's representatives are fixed when it first becomes a candidate.
        w0 = max(0, c0 - n_local + 1)
        K = 0  # candidates: units that end at or before w(c0)
        while n_init + (K + 1) * B <= w0:
            K += 1
        for u in range(K):
            if u not in reprs:
                toks = unit_tokens(u)
                if config.unit_score == "exact":  # scored from its keys: nothing stored
                    reprs[u] = k.new_zeros(0, D)
                    continue
                if config.unit_score in ("minmax", "sketch"):  # rows 2g, 2g+1: min, max raw key of KV head g
                    raw = k_global[toks]  # [B, Hkv, D]
                    lo, hi = raw.amin(0), raw.amax(0)  # [Hkv, D]
                    reprs[u] = torch.stack([lo, hi], dim=1).reshape(2 * Hkv, D)
                    if config.unit_score == "sketch":  # + the keys as their 4-bit codes give them
                        step = (hi - lo) / 15
                        code = torch.where(step > 0, (raw - lo) / step, 0.0).round().clamp(0, 15)
                        sketch = (lo + code * step).transpose(0, 1).reshape(Hkv * B, D)  # row g*B + o
                        reprs[u] = torch.cat([reprs[u], sketch])
                    continue
                apart = config.unit_score == "max_topk"
                r = torch.empty(Hq, config.repr_topk if apart else 1, D)
                for h in range(Hq):
                    top = torch.topk(scores[h, toks], config.repr_topk).indices
                    keys = k_global[toks[top], kv_head[h]]  # [repr_topk, D], most-attended first
                    r[h] = keys if apart else keys.mean(0)
                reprs[u] = r.view(-1, D)

        # Selection: one set per group of query heads (all of them, or the G of a KV head).
        groups = config.selection_groups(Hkv)
        if K <= config.topk:
            per_group = [list(range(K))] * groups
        elif role == "reader":  # layer L's units for this chunk (the same chunks: same config)
            per_group = [given[(c0, c1)].per_kv_head[g * Hkv // groups] for g in range(groups)]
        else:
            m = config.select_queries
            if config.chunking == "aligned":  # the chunk's first query (every schedule has it)
                q_bar = q_global[c0]
            else:
                q_bar = q_global[max(c0, c1 - m) if m else c0 : c1].mean(0)  # [Hq, D]
            per_group = []
            for g in range(groups):
                heads = slice(g * Hq // groups, (g + 1) * Hq // groups)
                unit_scores = torch.stack([unit_score(q_bar, u, heads) for u in range(K)])
                per_group.append(top_units(unit_scores.tolist()))
        per_kv_head = [per_group[h * groups // Hkv] for h in range(Hkv)]
        selected = sorted(set().union(*per_group))
        traces.append(ChunkTrace(c0, c1, K, selected, per_kv_head))
        R0 = n_init + K * B  # end of the last candidate: the remainder starts here

        for p in range(c0, c1):
            w = config.window_start(p)
            local = torch.arange(w, p + 1)
            s_local = torch.einsum("hd,jhd->hj", q_local[p], k_local[local][:, kv_head]) * scale
            for h in range(Hkv):
                glob = [torch.arange(0, min(n_init, w))]
                glob += [unit_tokens(u) for u in per_kv_head[h]]
                glob.append(torch.arange(R0, max(R0, w)))
                glob = torch.cat(glob)
                heads = slice(h * G, (h + 1) * G)
                if config.positions == "ordered" and len(glob):
                    # The global keys, in their original order, take compressed positions
                    # 0 .. Ng-1 right before the window; the window and the query keep their
                    # true distances: the query sits at Ng + (p - w).
                    Ng = len(glob)
                    kg = rope.rotate(k[glob, h][:, None], cos, sin, torch.arange(Ng))[:, 0]
                    qg = rope.rotate(q[p, heads][None], cos, sin, torch.tensor([Ng + p - w]))[0]
                else:
                    kg, qg = k_global[glob, h], q_global[p, heads]
                s_global = torch.einsum("gd,jd->gj", qg, kg) * scale
                s_all = [logits(s_local[heads]), logits(s_global)]
                if sinks is not None:  # a logit per head that only adds to the denominator
                    s_all.append(sinks[heads].float()[:, None])
                probs = torch.softmax(torch.cat(s_all, dim=1), dim=1)
                p_local = probs[:, : len(local)]
                p_global = probs[:, len(local) : len(local) + len(glob)]
                out[p, heads] = p_local @ v[local, h] + p_global @ v[glob, h]
                scores[heads, local] += p_local

    return ReferenceTrace(out=out, chunks=traces, reprs=reprs, scores=scores)


def infllm_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: InfLLMConfig,
    prefill_len: int | None = None,
    scale: float | None = None,
    *,
    rope: RopeLayout | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfLLM attention of one sequence; returns `[T, Hq, D]` fp32.

    q: [T, Hq, D]; k, v: [T, Hkv, D], all before RoPE, positions 0..T-1, Hq % Hkv == 0.
    cos, sin: [>= max(T, n_local), rotary_dim // 2], rotary table (R(a) = rotation by row a).
    Tokens [0, prefill_len) are prefilled in `config.chunk`-aligned selection chunks, later ones
    decoded one at a time (prefill_len=None: all prefill). scale defaults to D ** -0.5.
    rope:    how the model lays RoPE out (default full-width NeoX, rotary_dim = D).
    softcap: the model's logit soft-capping s -> softcap * tanh(s / softcap) (0: none).
    sinks:   [Hq] the model's learned sink logits, one per query head (None: none).
    """
    return infllm_reference_trace(q, k, v, cos, sin, config, prefill_len, scale, rope=rope,
                                  softcap=softcap, sinks=sinks).out


def sliding_window_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    window: int,
    scale: float | None = None,
    *,
    rope: RopeLayout | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact sliding-window attention of one sequence (the sliding layers of hybrid models, which
    the backend runs with vLLM's own kernel: no init, no memory units, no remainder); `[T, Hq, D]`
    fp32.

    Query p attends keys [max(0, p - window + 1), p], the `window` latest positions (vLLM's and
    transformers' meaning of `sliding_window`), all at ordinary RoPE positions. Same inputs as
    `infllm_attention_reference` (before RoPE), with the same `rope`, `softcap` and `sinks`.
    """
    if window < 1:
        raise ValueError(f"sliding window must be >= 1, got {window}")
    T, hq, d = q.shape
    g = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    rope = rope or RopeLayout(d, d)
    pos = torch.arange(T)
    qr = rope.rotate(q, cos, sin, pos)
    kr = rope.rotate(k, cos, sin, pos).repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    out = torch.empty(T, hq, d)
    for p in range(T):
        lo = max(0, p - window + 1)
        logits = torch.einsum("hd,jhd->hj", qr[p], kr[lo : p + 1]) * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        if sinks is not None:
            logits = torch.cat((logits, sinks.float()[:, None]), dim=1)
        out[p] = torch.einsum("hj,jhd->hd", logits.softmax(-1)[:, : p + 1 - lo], vf[lo : p + 1])
    return out
