"""The oracle against independent facts: dense attention where InfLLM must equal it, a planted
needle it must find, and the sliding-window control that must miss it."""

import dataclasses

import pytest
import torch

from vllm_infllm.core.config import InfLLMConfig
from vllm_infllm.core.reference import (
    infllm_attention_reference,
    infllm_reference_trace,
    selection_chunks,
    sliding_window_reference,
)
from vllm_infllm.core.rope import RopeLayout, rope_table, rotate


def dense_causal(q, k, v, cos, sin):
    """Plain causal attention with RoPE at absolute positions (torch SDPA)."""
    T, Hq, _ = q.shape
    G = Hq // k.shape[1]
    pos = torch.arange(T)
    ql, kl = rotate(q, cos, sin, pos), rotate(k, cos, sin, pos)
    kl, vv = kl.repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    o = torch.nn.functional.scaled_dot_product_attention(
        ql.transpose(0, 1), kl.transpose(0, 1), vv.transpose(0, 1), is_causal=True
    )
    return o.transpose(0, 1)


def banded_causal(q, k, v, cos, sin, window):
    """Causal attention restricted to the `window` latest keys: torch SDPA with a boolean band."""
    T, Hq, _ = q.shape
    G = Hq // k.shape[1]
    pos = torch.arange(T)
    ql, kl = rotate(q, cos, sin, pos), rotate(k, cos, sin, pos)
    kl, vv = kl.repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    delta = pos[:, None] - pos[None, :]
    band = (delta >= 0) & (delta < window)
    o = torch.nn.functional.scaled_dot_product_attention(
        ql.transpose(0, 1), kl.transpose(0, 1), vv.transpose(0, 1), attn_mask=band
    )
    return o.transpose(0, 1)


def rand_qkv(T, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, Hq, D, generator=g), torch.randn(T, Hkv, D, generator=g),
            torch.randn(T, Hkv, D, generator=g))


SMALL = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32)


@pytest.mark.parametrize("prefill_len", [None, 10, 50])
def test_short_context_is_dense(prefill_len):
    # T <= n_local: every key is local, so InfLLM is dense causal attention with real RoPE.
    q, k, v = rand_qkv(64, 6, 2, 16)
    cos, sin = rope_table(16, 256)
    out = infllm_attention_reference(q, k, v, cos, sin, SMALL, prefill_len)
    torch.testing.assert_close(out, dense_causal(q, k, v, cos, sin), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 7, 64, 500])
def test_sliding_window_oracle_is_banded_causal_attention(window):
    """The oracle's sliding-window mode (hybrid models' sliding layers) against SDPA with a band
    mask; a window as long as the sequence is dense causal attention, a window of 1 is V itself."""
    q, k, v = rand_qkv(200, 6, 2, 16, seed=3)
    cos, sin = rope_table(16, 256)
    out = sliding_window_reference(q, k, v, cos, sin, window)
    torch.testing.assert_close(out, banded_causal(q, k, v, cos, sin, window), rtol=1e-5, atol=1e-5)
    if window >= 200:
        torch.testing.assert_close(out, dense_causal(q, k, v, cos, sin), rtol=1e-5, atol=1e-5)
    if window == 1:
        torch.testing.assert_close(out, v.repeat_interleave(3, 1), rtol=1e-6, atol=1e-6)
    else:  # the band really cuts: keys older than the window change nothing
        k2 = k.clone()
        k2[:1] += 100.0
        far = sliding_window_reference(q, k2, v, cos, sin, window)
        torch.testing.assert_close(far[window:], out[window:], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="window"):
        sliding_window_reference(q, k, v, cos, sin, 0)


def dense_logits_attention(q, k, v, scale, softcap=0.0, sinks=None):
    """Causal attention over already-rotated q, k with explicit logits: optional soft-capping
    and a sink logit per query head in the denominator (the model's definitions)."""
    T, Hq, _ = q.shape
    G = Hq // k.shape[1]
    s = torch.einsum("phd,jhd->hpj", q.float(), k.float().repeat_interleave(G, 1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    if sinks is not None:
        s = torch.cat((s, sinks.float()[:, None, None].expand(Hq, T, 1)), dim=2)
    p = s.softmax(-1)[..., :T]
    return torch.einsum("hpj,jhd->phd", p, v.float().repeat_interleave(G, 1))


LAYOUTS = [RopeLayout(16, 16), RopeLayout(16, 8), RopeLayout(16, 16, neox=False), RopeLayout(16, 4, neox=False)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_rope_layouts_rotate_channel_pairs_as_complex_numbers(layout):
    """RoPE as the models define it: channel pair i (NeoX: i and i + r/2; GPT-J: 2i and 2i+1)
    is a complex number multiplied by exp(i * angle_i); channels past rotary_dim pass."""
    r, D = layout.rotary_dim, layout.head_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, D, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, -7, 100])
    cos, sin = rope_table(r, 128, dtype=torch.float64)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    angle = pos[:, None].double() * inv_freq  # [5, r/2]
    a, b = (x[..., : r // 2], x[..., r // 2 : r]) if layout.neox else (x[..., 0:r:2], x[..., 1:r:2])
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angle), angle)[:, None]
    want = x.clone()
    if layout.neox:
        want[..., : r // 2], want[..., r // 2 : r] = z.real, z.imag
    else:
        want[..., 0:r:2], want[..., 1:r:2] = z.real, z.imag
    torch.testing.assert_close(layout.rotate(x, cos.float(), sin.float(), pos).double(), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_permuted_channels_make_every_layout_full_width_neox(layout):
    """What the backend relies on: with channels in `perm` order and the padded table, the
    NeoX rotation the ops apply is exactly the model's rotation, and the oracle (selection,
    representatives, output) is the same function of the permuted q and k."""
    r, D = layout.rotary_dim, layout.head_size
    cos, sin = rope_table(r, 256)
    ccos, csin = layout.canonical_table(cos, sin)
    x = torch.randn(6, 2, D)
    pos = torch.tensor([0, 3, 64, 255, -9, -200])
    assert torch.equal(layout.rotate(x, cos, sin, pos)[..., layout.perm], rotate(x[..., layout.perm], ccos, csin, pos))
    q, k, v = rand_qkv(200, 6, 2, D, seed=5)
    cfg = dataclasses.replace(SMALL, chunking="step")
    model = infllm_reference_trace(q, k, v, cos, sin, cfg, 150, rope=layout)
    canon = infllm_reference_trace(q[..., layout.perm], k[..., layout.perm], v, ccos, csin, cfg, 150)
    torch.testing.assert_close(model.out, canon.out, rtol=1e-5, atol=1e-5)
    assert [c.selected for c in model.chunks] == [c.selected for c in canon.chunks]
    assert any(c.num_candidates > cfg.topk for c in model.chunks)
    for u, reprs in model.reprs.items():
        torch.testing.assert_close(reprs[:, layout.perm], canon.reprs[u], rtol=1e-5, atol=1e-5)
    # Inside the window it is dense attention with the model's own rotation.
    short = infllm_attention_reference(q[:60], k[:60], v[:60], cos, sin, SMALL, rope=layout)
    p60 = torch.arange(60)
    want = dense_logits_attention(layout.rotate(q[:60], cos, sin, p60), layout.rotate(k[:60], cos, sin, p60),
                                  v[:60], D**-0.5)
    torch.testing.assert_close(short, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap,sinks", [(5.0, None), (0.0, "random"), (3.0, "random")])
def test_softcap_and_sinks_inside_the_window_are_the_models_softmax(softcap, sinks):
    """Gemma 2's soft-capping and GPT-OSS's sinks: inside the window InfLLM is the model's dense
    attention, with the logits capped and the sink logits in the denominator."""
    q, k, v = rand_qkv(60, 6, 2, 16, seed=7)
    q, k = q * 3, k * 3  # logits well past the cap
    s = torch.randn(6) * 2 if sinks else None
    cos, sin = rope_table(16, 256)
    out = infllm_attention_reference(q, k, v, cos, sin, SMALL, softcap=softcap, sinks=s)
    pos = torch.arange(60)
    want = dense_logits_attention(rotate(q, cos, sin, pos), rotate(k, cos, sin, pos), v, 16**-0.5, softcap, s)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert max_err(out, infllm_attention_reference(q, k, v, cos, sin, SMALL)) > 1e-2  # they matter


def test_softcap_and_sinks_limits_beyond_the_window():
    """Beyond the window: a cap far above every logit changes nothing, a sink at -inf changes
    nothing, and a sink far above every logit takes all the mass (the output goes to 0)."""
    q, k, v = rand_qkv(200, 6, 2, 16, seed=8)
    cos, sin = rope_table(16, 256)
    base = infllm_reference_trace(q, k, v, cos, sin, SMALL, 120)
    capped = infllm_reference_trace(q, k, v, cos, sin, SMALL, 120, softcap=1e5)
    torch.testing.assert_close(capped.out, base.out, rtol=1e-4, atol=1e-5)
    assert [c.selected for c in capped.chunks] == [c.selected for c in base.chunks]
    none = infllm_attention_reference(q, k, v, cos, sin, SMALL, 120, sinks=torch.full((6,), float("-inf")))
    torch.testing.assert_close(none, base.out, rtol=1e-6, atol=1e-6)
    huge = infllm_attention_reference(q, k, v, cos, sin, SMALL, 120, sinks=torch.full((6,), 1e4))
    assert huge.abs().max() < 1e-6
    with pytest.raises(ValueError, match="one logit per query head"):
        infllm_attention_reference(q, k, v, cos, sin, SMALL, sinks=torch.zeros(2))


def max_err(a, b):
    return (a - b).abs().max().item()


def test_init_plus_local_is_dense_without_positions():
    # n_local < T <= n_init + n_local: init keys are attended globally at distance n_local-1,
    # which equals dense attention exactly when the rotary table is the identity.
    q, k, v = rand_qkv(96, 4, 4, 16)
    one, zero = torch.ones(256, 8), torch.zeros(256, 8)
    out = infllm_attention_reference(q, k, v, one, zero, SMALL, prefill_len=70)
    torch.testing.assert_close(out, dense_causal(q, k, v, one, zero), rtol=1e-5, atol=1e-5)
    # ... and differs with a real table (global keys sit at distance n_local-1, not their own).
    cos, sin = rope_table(16, 256)
    assert (infllm_attention_reference(q, k, v, cos, sin, SMALL) - dense_causal(q, k, v, cos, sin)).abs().max() > 1e-3


@pytest.mark.parametrize("prefill_len", [None, 130, 300])
def test_all_units_selected_is_dense_without_positions(prefill_len):
    # topk >= number of units: init + every unit + remainder + local = all keys, each once.
    q, k, v = rand_qkv(300, 6, 3, 16, seed=1)
    one, zero = torch.ones(512, 8), torch.zeros(512, 8)
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=100, repr_topk=2, chunk=32)
    out = infllm_attention_reference(q, k, v, one, zero, cfg, prefill_len)
    torch.testing.assert_close(out, dense_causal(q, k, v, one, zero), rtol=1e-5, atol=1e-5)


def test_selection_chunks_follow_alignment_steps_and_decode():
    cfg = InfLLMConfig(**{**SMALL.to_dict(), "chunking": "step"})  # chunk 32, the paper's cuts
    assert selection_chunks(100, cfg, prefill_len=70) == (
        [(0, 32), (32, 64), (64, 70)] + [(p, p + 1) for p in range(70, 100)]
    )
    assert selection_chunks(70, cfg, step_bounds=[20, 40]) == [(0, 20), (20, 32), (32, 40), (40, 64), (64, 70)]


def test_aligned_chunks_ignore_steps_and_the_prompts_last_query_is_alone():
    cfg = InfLLMConfig(**{**SMALL.to_dict(), "chunking": "aligned"})  # chunk 32
    expect = [(0, 32), (32, 64), (64, 69)] + [(p, p + 1) for p in range(69, 100)]
    assert selection_chunks(100, cfg, prefill_len=70) == expect
    assert selection_chunks(100, cfg, prefill_len=70, step_bounds=[20, 40, 65]) == expect
    assert selection_chunks(64, cfg) == [(0, 32), (32, 63), (63, 64)]


def test_aligned_chunk_is_selected_by_its_first_query():
    """chunking="aligned": q̄ = R(n_local-1) q_raw(a0), the chunk's first query. Changing the
    chunk's later queries changes nothing it selects; the scores of the first query give its
    selection."""
    cfg = InfLLMConfig(**{**SMALL.to_dict(), "chunking": "aligned"})
    Hq, Hkv, T = 6, 2, 330
    q, k, v = rand_qkv(T, Hq, Hkv, 16, seed=13)
    cos, sin = rope_table(16, 512)
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=300)
    q_global = rotate(q, cos, sin, torch.full((T,), cfg.n_local - 1))
    checked = 0
    for c in tr.chunks:
        if c.num_candidates <= cfg.topk:
            continue
        score = torch.stack([(q_global[c.c0] * tr.reprs[u]).sum() for u in range(c.num_candidates)])
        assert c.selected == sorted(score.topk(cfg.topk).indices.tolist())
        checked += 1
    assert checked > 30
    # Every query but each chunk's first replaced: with minmax representatives (the units' own
    # keys, no attention mass) no selection changes; the mean of the paper's "step" rule does.
    q2 = q.clone()
    for c in tr.chunks:
        q2[c.c0 + 1 : c.c1] = torch.randn(c.c1 - c.c0 - 1, Hq, 16)
    for chunking, same in (("aligned", True), ("step", False)):
        mm = InfLLMConfig(**{**cfg.to_dict(), "unit_score": "minmax", "chunking": chunking})
        a = infllm_reference_trace(q, k, v, cos, sin, mm, prefill_len=300)
        b = infllm_reference_trace(q2, k, v, cos, sin, mm, prefill_len=300)
        assert ([c.selected for c in a.chunks] == [c.selected for c in b.chunks]) == same, chunking
        assert not torch.equal(a.out, b.out)


def planted_needle(topk, T=700, D=32, needle_unit=7, seed=0, **modes):
    """Noise everywhere, one memory unit whose raw keys point along R(n_local-1)·d and whose
    values are a marker; decode queries point along d. `modes`: section 2.7 knobs."""
    cfg = InfLLMConfig.paper(n_init=16, n_local=64, block_size=16, topk=topk, repr_topk=2, chunk=32, **modes)
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv = 4, 2
    q = torch.randn(T, Hq, D, generator=g) * 0.3
    k = torch.randn(T, Hkv, D, generator=g) * 0.3
    v = torch.randn(T, Hkv, D, generator=g)
    cos, sin = rope_table(D, 1024)
    d = torch.randn(D, generator=g)
    d = d / d.norm()
    toks = torch.arange(cfg.n_init + needle_unit * 16, cfg.n_init + (needle_unit + 1) * 16)
    k_dir = rotate(d[None, None], cos, sin, torch.tensor([cfg.n_local - 1]))[0, 0]
    k[toks] = 12.0 * k_dir
    marker = torch.zeros(D)
    marker[0] = 5.0
    v[toks] = marker
    prefill = T - 8
    q[prefill:] = 3.0 * d
    trace = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=prefill)
    return trace, needle_unit, marker, prefill


@pytest.mark.parametrize("modes", [{}, {"positions": "ordered"}, {"unit_score": "minmax"},
                                   {"unit_score": "max_topk"},
                                   {"contiguity": 1}, {"select_queries": 4, "chunking": "step"}],
                         ids=["paper", "ordered", "minmax", "max_topk", "contiguity", "select_queries"])
def test_planted_needle_is_selected_and_dominates(modes):
    """ordered: the needle's keys sit at distances 64..~95 instead of 63, still read."""
    trace, unit, marker, prefill = planted_needle(topk=1, **modes)
    decode = [c for c in trace.chunks if c.c0 >= prefill]
    assert decode and all(c.selected == [unit] and c.num_candidates > 20 for c in decode)
    out = trace.out[prefill:]  # [8, Hq, D]
    assert torch.cosine_similarity(out.reshape(-1, out.shape[-1]), marker[None], dim=-1).min() > 0.95


def test_sliding_window_control_misses_the_needle():
    trace, unit, marker, prefill = planted_needle(topk=0)
    assert all(c.selected == [] for c in trace.chunks)
    out = trace.out[prefill:]
    assert torch.cosine_similarity(out.reshape(-1, out.shape[-1]), marker[None], dim=-1).max() < 0.5


def test_representatives_are_mean_raw_keys_of_top_scored_tokens():
    q, k, v = rand_qkv(200, 4, 2, 16, seed=3)
    cos, sin = rope_table(16, 256)
    tr = infllm_reference_trace(q, k, v, cos, sin, SMALL)
    assert set(tr.reprs) == set(range(SMALL.num_candidates(tr.chunks[-1].c0)))
    for u, r in tr.reprs.items():
        toks = torch.arange(32 + 16 * u, 32 + 16 * (u + 1))
        for h in range(4):
            best = tr.scores[h, toks].argsort(descending=True)[:3]
            torch.testing.assert_close(r[h], k[toks[best], h // 2].mean(0))
    # every key's score is the total local softmax mass it received: a token inside the
    # windows of many queries has a positive score; all scores are below the number of queries.
    assert (tr.scores > 0).all() and (tr.scores <= 200).all()


# --- unit_score="max_topk": the paper's representatives kept apart ----------------------------


@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_max_topk_keeps_the_top_scored_keys_and_selects_by_their_max(selection):
    """Representatives: head h's repr_topk top-scored raw keys, most-attended first, at rows
    h*r .. (from the trace's final scores: a unit has left every local window when it seals).
    Selection: per chunk, the topk by sum_h max_i <q̄_h, k_i> over the group's heads (q̄ = the
    chunk's first query, chunking="aligned"); the mean of the kept keys is the paper's
    representative whenever both rules attended alike (no selection yet)."""
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32,
                       unit_score="max_topk", selection=selection)
    Hq, Hkv, G, D, T = 6, 3, 2, 16, 300
    q, k, v = rand_qkv(T, Hq, Hkv, D, seed=11)
    cos, sin = rope_table(D, 512)
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=260)
    for u, r in tr.reprs.items():
        toks = torch.arange(32 + 16 * u, 32 + 16 * (u + 1))
        for h in range(Hq):
            best = tr.scores[h, toks].argsort(descending=True)[:3]
            torch.testing.assert_close(r.view(Hq, 3, D)[h], k[toks[best], h // G])
    q_global = rotate(q, cos, sin, torch.full((T,), cfg.n_local - 1))
    checked = 0
    for c in tr.chunks:
        if c.num_candidates <= cfg.topk:
            continue
        best = torch.stack([torch.einsum("hd,hrd->hr", q_global[c.c0], tr.reprs[u].view(Hq, 3, D)).amax(1)
                            for u in range(c.num_candidates)])  # [K, Hq]
        groups = best.view(-1, Hkv, G).sum(-1) if selection == "kv_head" else best.sum(-1, keepdim=True)
        for g, sel in enumerate(c.per_kv_head if selection == "kv_head" else [c.selected]):
            assert sel == sorted(groups[:, g].topk(cfg.topk).indices.tolist())
            checked += 1
    assert checked > 10
    # Before any selection both scores attend the same keys, so they seal the same tokens.
    early = infllm_reference_trace(q[:140], k[:140], v[:140], cos, sin, cfg)  # 2 units sealed
    paper = infllm_reference_trace(q[:140], k[:140], v[:140], cos, sin,
                                   dataclasses.replace(cfg, unit_score="mean_topk"))
    assert early.reprs and all(c.num_candidates <= cfg.topk for c in early.chunks)
    for u, r in early.reprs.items():
        torch.testing.assert_close(r.view(Hq, 3, D).mean(1), paper.reprs[u])


# --- selection="kv_head": each KV head chooses its own units ---------------------------------


def test_kv_head_selection_is_layer_selection_of_each_kv_head_alone():
    """With one unit set per KV head, the KV heads never interact: KV head h (with its G query
    heads) gives exactly what the paper's rule gives on that head's slice of q/k/v alone."""
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32,
                       selection="kv_head")
    layer_cfg = InfLLMConfig(**{**cfg.to_dict(), "selection": "layer"})
    Hq, Hkv, G = 6, 3, 2
    q, k, v = rand_qkv(300, Hq, Hkv, 16, seed=4)
    cos, sin = rope_table(16, 512)
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=220)
    differ = 0
    for h in range(Hkv):
        heads = slice(h * G, (h + 1) * G)
        alone = infllm_reference_trace(q[:, heads], k[:, h : h + 1], v[:, h : h + 1], cos, sin,
                                       layer_cfg, prefill_len=220)
        torch.testing.assert_close(tr.out[:, heads], alone.out, rtol=1e-5, atol=1e-5)
        assert [c.per_kv_head[h] for c in tr.chunks] == [c.selected for c in alone.chunks]
    for c in tr.chunks:
        differ += len({tuple(s) for s in c.per_kv_head}) > 1
        assert c.selected == sorted(set().union(*c.per_kv_head))
    assert differ > 5  # the heads did choose differently
    paper = infllm_reference_trace(q, k, v, cos, sin, layer_cfg, prefill_len=220)
    assert all(len({tuple(s) for s in c.per_kv_head}) == 1 for c in paper.chunks)
    assert (paper.out - tr.out).abs().max() > 1e-2


def test_a_needle_one_kv_head_holds_is_outvoted_by_layer_selection_not_by_kv_head():
    """KV head 0 holds the needle (unit 7), KV head 1 a stronger distractor (unit 3); decode
    queries of every head point at both. The layer-wide sum picks the distractor (topk 1) and
    head 0 loses its needle; per-KV-head selection lets head 0 read unit 7."""
    T, D, Hq, Hkv = 700, 32, 4, 2
    g = torch.Generator().manual_seed(1)
    q = torch.randn(T, Hq, D, generator=g) * 0.3
    k = torch.randn(T, Hkv, D, generator=g) * 0.3
    v = torch.randn(T, Hkv, D, generator=g)
    cos, sin = rope_table(D, 1024)
    d = torch.randn(D, generator=g)
    d = d / d.norm()
    n_init, n_local, B = 16, 64, 16
    k_dir = rotate(d[None, None], cos, sin, torch.tensor([n_local - 1]))[0, 0]
    unit = lambda u: torch.arange(n_init + u * B, n_init + (u + 1) * B)  # noqa: E731
    k[unit(7), 0] = 12.0 * k_dir
    k[unit(3), 1] = 20.0 * k_dir
    marker = torch.zeros(D)
    marker[0] = 5.0
    v[unit(7), 0] = marker
    prefill = T - 8
    q[prefill:] = 3.0 * d
    outs = {}
    for selection in ("layer", "kv_head"):
        cfg = InfLLMConfig.paper(n_init=n_init, n_local=n_local, block_size=B, topk=1, repr_topk=2,
                           chunk=32, selection=selection)
        tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=prefill)
        decode = [c for c in tr.chunks if c.c0 >= prefill]
        want = [[3], [3]] if selection == "layer" else [[7], [3]]
        assert decode and all(c.per_kv_head == want for c in decode), selection
        out = tr.out[prefill:, :2]  # the query heads of KV head 0
        outs[selection] = torch.cosine_similarity(out.reshape(-1, D), marker[None], dim=-1)
    assert outs["layer"].max() < 0.5 and outs["kv_head"].min() > 0.95


# --- positions="ordered": global keys in their original order just before the window ---------


ORDERED = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32,
                       positions="ordered")


@pytest.mark.parametrize("prefill_len", [None, 130])
def test_ordered_positions_with_every_unit_selected_is_dense_attention(prefill_len):
    """All units selected: the global keys are [0, w(p)) in order at positions 0 .. w(p)-1, the
    query at p: exactly dense causal attention with the model's RoPE (no identity table needed,
    unlike the paper's fixed distance)."""
    q, k, v = rand_qkv(300, 4, 2, 16, seed=6)
    cos, sin = rope_table(16, 512)
    cfg = InfLLMConfig(**{**ORDERED.to_dict(), "topk": 100})
    out = infllm_attention_reference(q, k, v, cos, sin, cfg, prefill_len=prefill_len)
    torch.testing.assert_close(out, dense_causal(q, k, v, cos, sin), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_ordered_positions_equal_dense_attention_over_the_attended_tokens_in_order(selection):
    """With a real selection (topk < candidates), a query's output is dense causal attention over
    the sequence it attends, laid out in order: init, its KV head's units, remainder, window."""
    cfg = InfLLMConfig(**{**ORDERED.to_dict(), "selection": selection})
    T, prefill = 330, 300
    q, k, v = rand_qkv(T, 4, 2, 16, seed=7)
    cos, sin = rope_table(16, 512)
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=prefill)
    checked = 0
    for c in tr.chunks:
        if c.num_candidates <= cfg.topk:
            continue
        for p in (c.c0, c.c1 - 1):
            w = cfg.window_start(p)
            R0 = cfg.n_init + c.num_candidates * cfg.block_size
            for h in range(2):
                units = [torch.arange(32 + 16 * u, 48 + 16 * u) for u in c.per_kv_head[h]]
                seq = torch.cat([torch.arange(0, 32), *units, torch.arange(R0, w), torch.arange(w, p + 1)])
                heads = slice(2 * h, 2 * h + 2)
                dense = dense_causal(q[seq, heads], k[seq, h : h + 1], v[seq, h : h + 1], cos, sin)
                torch.testing.assert_close(tr.out[p, heads], dense[-1], rtol=1e-4, atol=1e-5)
                checked += 1
    assert checked > 20
    fixed = infllm_attention_reference(q, k, v, cos, sin, InfLLMConfig(**{**cfg.to_dict(), "positions": "fixed"}),
                                       prefill_len=prefill)
    assert (fixed - tr.out).abs().max() > 1e-2  # the positions do matter



# --- unit_score="minmax": Quest's per-channel bound -------------------------------------------


# The paper's chunking: these tests check selections against the mean query of each chunk.
MINMAX = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32,
                      unit_score="minmax", chunking="step")


@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_minmax_selects_the_units_with_the_largest_quest_bound(selection):
    """Representatives are the per-channel min and max of the unit's raw keys per KV head, and
    the selection is the topk by the bound sum_h sum_d max(q̄ min, q̄ max), brute-forced here
    from the raw keys; the bound is >= q̄·k of every key of the unit."""
    cfg = InfLLMConfig(**{**MINMAX.to_dict(), "selection": selection})
    Hq, Hkv, G, T = 6, 3, 2, 300
    q, k, v = rand_qkv(T, Hq, Hkv, 16, seed=8)
    cos, sin = rope_table(16, 512)
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=260)
    q_bar_all = rotate(q, cos, sin, torch.full((T,), cfg.n_local - 1))
    checked = 0
    for c in tr.chunks:
        if c.num_candidates <= cfg.topk:
            continue
        q_bar = q_bar_all[c.c0 : c.c1].mean(0)  # [Hq, D]
        bound = torch.zeros(c.num_candidates, Hq)
        for u in range(c.num_candidates):
            raw = k[32 + 16 * u : 48 + 16 * u]  # [B, Hkv, D]
            torch.testing.assert_close(tr.reprs[u].view(Hkv, 2, 16)[:, 0], raw.amin(0))
            torch.testing.assert_close(tr.reprs[u].view(Hkv, 2, 16)[:, 1], raw.amax(0))
            lo, hi = raw.amin(0).repeat_interleave(G, 0), raw.amax(0).repeat_interleave(G, 0)
            bound[u] = torch.maximum(q_bar * lo, q_bar * hi).sum(-1)
            dots = torch.einsum("hd,bhd->bh", q_bar, raw.repeat_interleave(G, 1))
            assert (bound[u] >= dots.amax(0) - 1e-5).all()
        groups = bound.view(-1, Hkv, G).sum(-1) if selection == "kv_head" else bound.sum(-1, keepdim=True)
        for g, sel in enumerate(c.per_kv_head if selection == "kv_head" else [c.selected]):
            assert sel == sorted(groups[:, g].topk(cfg.topk).indices.tolist())
            checked += 1
    assert checked > 10


# --- contiguity and select_queries (minmax scores: representatives that do not depend on the
# --- selections made before, so the bound can be brute-forced from the raw keys) -------------


def quest_scores(q_bar, k, c, Hkv, G, B=16, n_init=32):
    """[K] layer-wide Quest bound of every candidate unit, from the raw keys."""
    out = []
    for u in range(c.num_candidates):
        raw = k[n_init + B * u : n_init + B * (u + 1)]
        lo, hi = raw.amin(0).repeat_interleave(G, 0), raw.amax(0).repeat_interleave(G, 0)
        out.append(torch.maximum(q_bar * lo, q_bar * hi).sum().item())
    return out


@pytest.mark.parametrize("contiguity,topk", [(1, 3), (1, 4), (2, 5)])
def test_contiguity_brings_the_best_units_neighbours(contiguity, topk):
    """Each selected unit brings its neighbours: the best unit arrives with every candidate within
    `contiguity` units of it, and the ranking is the best bound within reach, then the unit's own,
    then position (docs/design.md section 2.7); the budget stays topk units."""
    cfg = InfLLMConfig(**{**MINMAX.to_dict(), "topk": topk, "contiguity": contiguity})
    paper = InfLLMConfig(**{**cfg.to_dict(), "contiguity": 0})
    Hq, Hkv, G, T = 6, 3, 2, 400
    q, k, v = rand_qkv(T, Hq, Hkv, 16, seed=11)
    cos, sin = rope_table(16, 512)
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=330)
    tr0 = infllm_reference_trace(q, k, v, cos, sin, paper, prefill_len=330)
    q_bar_all = rotate(q, cos, sin, torch.full((T,), cfg.n_local - 1))
    checked = differ = 0
    for c, c0 in zip(tr.chunks, tr0.chunks, strict=True):
        if c.num_candidates <= topk:
            assert c.selected == list(range(c.num_candidates))
            continue
        score = quest_scores(q_bar_all[c.c0 : c.c1].mean(0), k, c, Hkv, G)
        assert len(c.selected) == topk
        best = max(range(len(score)), key=score.__getitem__)
        reach = range(max(0, best - contiguity), min(len(score), best + contiguity + 1))
        assert set(reach) <= set(c.selected)
        near = [max(score[max(0, u - contiguity) : u + contiguity + 1]) for u in range(len(score))]
        ranked = sorted(range(len(score)), key=lambda u: (-near[u], -score[u], u))
        assert c.selected == sorted(ranked[:topk])
        assert c0.selected == sorted(sorted(range(len(score)), key=lambda u: -score[u])[:topk])
        differ += c.selected != c0.selected
        checked += 1
    assert checked > 10 and differ > 3


def test_select_queries_selects_with_the_chunks_last_queries():
    """select_queries=m: q̄ is the mean over the chunk's last m queries (all of a shorter chunk's,
    and a decode step's one); m = chunk is exactly the paper's rule."""
    cfg = InfLLMConfig(**{**MINMAX.to_dict(), "select_queries": 5, "chunking": "step"})
    Hq, Hkv, G, T = 6, 3, 2, 330
    q, k, v = rand_qkv(T, Hq, Hkv, 16, seed=12)
    cos, sin = rope_table(16, 512)
    steps = [163, 203]  # step boundaries: chunks [160, 163) and [203, 224), shorter and longer than m
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=300, step_bounds=steps)
    tr0 = infllm_reference_trace(q, k, v, cos, sin, InfLLMConfig(**{**cfg.to_dict(), "select_queries": 0}),
                                 prefill_len=300, step_bounds=steps)
    q_bar_all = rotate(q, cos, sin, torch.full((T,), cfg.n_local - 1))
    checked = differ = 0
    for c, c0 in zip(tr.chunks, tr0.chunks, strict=True):
        if c.num_candidates <= cfg.topk:
            continue
        score = torch.tensor(quest_scores(q_bar_all[max(c.c0, c.c1 - 5) : c.c1].mean(0), k, c, Hkv, G))
        assert c.selected == sorted(score.topk(cfg.topk).indices.tolist())
        differ += c.selected != c0.selected
        checked += 1
    assert checked > 20 and differ > 0  # the last 5 queries did choose differently
    assert all(c.selected == c0.selected for c, c0 in zip(tr.chunks, tr0.chunks, strict=True) if c.c0 >= 300)
    # m = chunk: every selection chunk is at most `chunk` long, so this is the paper's rule exactly
    for unit_score in ("mean_topk", "minmax"):
        base = InfLLMConfig(**{**cfg.to_dict(), "unit_score": unit_score, "select_queries": 0})
        whole = InfLLMConfig(**{**base.to_dict(), "select_queries": base.chunk})
        a = infllm_attention_reference(q, k, v, cos, sin, base, prefill_len=300)
        assert torch.equal(a, infllm_attention_reference(q, k, v, cos, sin, whole, prefill_len=300))


# --- retrieval_layer: one layer selects by the exact score, the layers above read its choice ---


@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_retrieval_layer_selects_by_the_exact_score_and_the_layers_above_attend_it(selection):
    """Layer L's selection is the topk by sum_h max_{k in U} <q̄_h, k_raw>, brute-forced here from
    the raw keys (q̄: the chunk's first query at distance n_local-1, chunking="aligned"); a layer
    above L, with other q/k/v, attends exactly L's units, and its output is the oracle's output
    for those units; a layer below L is the plain rule."""
    cfg = InfLLMConfig(**{**SMALL.to_dict(), "topk": 3, "unit_score": "minmax", "selection": selection,
                          "retrieval_layer": 1})
    Hq, Hkv, G, T, D = 6, 3, 2, 300, 16
    q, k, v = rand_qkv(T, Hq, Hkv, D, seed=11)
    cos, sin = rope_table(D, 512)
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=260, layer=1)
    q_bar_all = rotate(q, cos, sin, torch.full((T,), cfg.n_local - 1))
    checked = 0
    for c in tr.chunks:
        if c.num_candidates <= cfg.topk:
            continue
        q_bar = q_bar_all[c.c0]  # [Hq, D]
        exact = torch.stack([  # [K, Hq]: head h's best key of unit u
            torch.einsum("hd,bhd->bh", q_bar, k[32 + 16 * u : 48 + 16 * u].repeat_interleave(G, 1)).amax(0)
            for u in range(c.num_candidates)])
        groups = exact.view(-1, Hkv, G).sum(-1) if selection == "kv_head" else exact.sum(-1, keepdim=True)
        for g, sel in enumerate(c.per_kv_head if selection == "kv_head" else [c.selected]):
            assert sel == sorted(groups[:, g].topk(cfg.topk).indices.tolist())
            checked += 1
    assert checked > 10
    # The layer above: other inputs, the same units; as the plain rule run with those units.
    q2, k2, v2 = rand_qkv(T, Hq, Hkv, D, seed=12)
    above = infllm_reference_trace(q2, k2, v2, cos, sin, cfg, prefill_len=260, layer=2, retrieval=tr)
    assert [c.per_kv_head for c in above.chunks] == [c.per_kv_head for c in tr.chunks]
    own = infllm_reference_trace(q2, k2, v2, cos, sin, dataclasses.replace(cfg, retrieval_layer=-1),
                                 prefill_len=260)
    assert [c.per_kv_head for c in own.chunks] != [c.per_kv_head for c in tr.chunks]
    below = infllm_reference_trace(q2, k2, v2, cos, sin, cfg, prefill_len=260, layer=0)
    torch.testing.assert_close(below.out, own.out, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"above retrieval_layer=1: pass that layer's trace as retrieval="):
        infllm_reference_trace(q2, k2, v2, cos, sin, cfg, prefill_len=260, layer=2)


def test_retrieval_layer_reads_a_needle_the_bound_misses():
    """The case the exact score exists for: a unit whose one key matches the query, in a unit of
    filler spread wide on every channel. Quest's bound ranks the wide filler units first (their
    boxes contain large products for any query); the exact score ranks the needle's unit first."""
    Hq = Hkv = 1
    D, T = 16, 200
    g = torch.Generator().manual_seed(3)
    q = torch.zeros(T, Hq, D)
    k = torch.randn(T, Hkv, D, generator=g) * 3.0  # wide filler boxes
    v = torch.randn(T, Hkv, D, generator=g)
    needle_unit = 2
    k[32 + 16 * needle_unit : 48 + 16 * needle_unit] = 0.1 * torch.randn(16, 1, D, generator=g)  # a narrow unit
    direction = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    k[32 + 16 * needle_unit + 5, 0] = 12 * direction  # ... holding the needle (filler's best: ~8)
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=1, repr_topk=3, chunk=32, unit_score="minmax")
    cos, sin = rope_table(D, 512)
    # the last query asks for the needle: rotated to the global position n_local-1, it is `direction`
    q[T - 1, 0] = rotate(direction[None, None], cos, sin, torch.tensor([-(cfg.n_local - 1)]))[0, 0]
    last = {}
    for name, c in [("bound", cfg), ("exact", dataclasses.replace(cfg, retrieval_layer=0))]:
        last[name] = infllm_reference_trace(q, k, v, cos, sin, c, layer=0).chunks[-1]
    assert last["exact"].selected == [needle_unit]
    assert last["bound"].selected != [needle_unit]


def test_exact_unit_score_selects_by_every_key_and_stores_nothing():
    """unit_score="exact" in every layer: the topk by sum_h max_{k in U} <q̄_h, k_raw>, brute-forced
    from the raw keys, with no representatives stored (and none of the local attention mass
    needed: the selection does not change when the scores would)."""
    cfg = InfLLMConfig(**{**SMALL.to_dict(), "topk": 3, "unit_score": "exact"})
    Hq, Hkv, G, T, D = 6, 3, 2, 300, 16
    q, k, v = rand_qkv(T, Hq, Hkv, D, seed=13)
    cos, sin = rope_table(D, 512)
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=260)
    assert all(r.shape == (0, D) for r in tr.reprs.values()) and len(tr.reprs) > 10
    q_bar_all = rotate(q, cos, sin, torch.full((T,), cfg.n_local - 1))
    checked = 0
    for c in tr.chunks:
        if c.num_candidates <= cfg.topk:
            continue
        exact = torch.stack([
            torch.einsum("hd,bhd->bh", q_bar_all[c.c0], k[32 + 16 * u : 48 + 16 * u].repeat_interleave(G, 1)).amax(0)
            for u in range(c.num_candidates)]).sum(-1)
        assert c.selected == sorted(exact.topk(cfg.topk).indices.tolist())
        checked += 1
    assert checked > 10


def test_sketch_unit_score_selects_by_the_4_bit_sketch_of_every_key():
    """unit_score="sketch": the topk by sum_h max_{k in U} <q̄_h, sketch(k)>, brute-forced from the
    raw keys (per unit, KV head and channel: 16 levels between the min and the max), with the
    box and the sketched keys as the unit's stored rows; on filler keys it mostly agrees with
    the exact score and is not it."""
    cfg = InfLLMConfig(**{**SMALL.to_dict(), "topk": 3, "unit_score": "sketch"})
    Hq, Hkv, G, T, D, B = 6, 3, 2, 300, 16, 16
    q, k, v = rand_qkv(T, Hq, Hkv, D, seed=13)
    cos, sin = rope_table(D, 512)
    tr = infllm_reference_trace(q, k, v, cos, sin, cfg, prefill_len=260)
    exact_tr = infllm_reference_trace(q, k, v, cos, sin, dataclasses.replace(cfg, unit_score="exact"),
                                      prefill_len=260)
    q_bar_all = rotate(q, cos, sin, torch.full((T,), cfg.n_local - 1))
    checked = agree = 0
    for c, ce in zip(tr.chunks, exact_tr.chunks, strict=True):
        if c.num_candidates <= cfg.topk:
            continue
        scores = []
        for u in range(c.num_candidates):
            raw = k[32 + B * u : 32 + B * (u + 1)]  # [B, Hkv, D] (rand_qkv's keys are raw)
            lo, hi = raw.amin(0), raw.amax(0)
            step = (hi - lo) / 15
            sketch = lo + ((raw - lo) / step).round().clamp(0, 15) * step
            assert len(sketch[:, 0, 0].unique()) <= 16
            assert torch.equal(tr.reprs[u][: 2 * Hkv], torch.stack([lo, hi], 1).reshape(2 * Hkv, D))
            torch.testing.assert_close(tr.reprs[u][2 * Hkv :], sketch.transpose(0, 1).reshape(Hkv * B, D))
            scores.append(torch.einsum("hd,bhd->bh", q_bar_all[c.c0], sketch.repeat_interleave(G, 1))
                          .amax(0).sum())
        assert c.selected == sorted(torch.stack(scores).topk(cfg.topk).indices.tolist())
        checked += 1
        agree += c.selected == ce.selected
    assert checked > 10
    assert checked // 2 < agree < checked  # close to the exact score, not the exact score
