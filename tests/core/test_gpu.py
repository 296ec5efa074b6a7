"""The Triton kernels compiled for a CUDA GPU, at realistic sizes (the correctness half of the
device run; `benchmarks/ops/gpu.sh` runs this file, then the timing script).

* each op against the torch op on the same CUDA tensors, bf16, the default InfLLMConfig, head
  layouts of Llama-3-8B (Hq 32 / Hkv 8 / D 128) and SmolLM2 (Hq 9 / Hkv 3 / D 64), a wave mixing
  a 512-query prefill chunk, decodes and a short prefill, then the decodes alone (split-KV path);
* the whole runtime with the Triton ops against the fp32 oracle at a moderate length.

Marked `gpu` and skipped without CUDA: Triton compiles these kernels for a GPU only. On a CPU
machine tests/core/test_triton_ops.py runs the same kernels in Triton's interpreter at small sizes.
"""

from __future__ import annotations

import pytest
import torch

from vllm_infllm.core.config import InfLLMConfig
from vllm_infllm.core.ops import torch_ops
from vllm_infllm.core.plan import plan_step
from vllm_infllm.core.rope import RopeLayout, rope_table
from vllm_infllm.testing import make_request, max_abs_err, paged_state, rel_l2_err, run_oracle, run_paged

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton compiles these kernels "
                       "for CUDA only; test_triton_ops.py covers them in the interpreter on CPU)"),
]
DEV = "cuda"


@pytest.fixture(scope="module")
def triton_ops():
    # Imported here, not at collection: on a CPU machine importing triton_ops without
    # TRITON_INTERPRET would make test_triton_ops.py rerun itself in a subprocess.
    from vllm_infllm.core.ops import triton_ops

    return triton_ops


# A wave mixing a 512-query prefill chunk 10K tokens in, decodes at 20K / 9K / 5K, and a short
# prefill inside the dense regime.
QUERY_LENS = [512, 1, 1, 1, 37]
SEQ_LENS = [10752, 20000, 9000, 5000, 300]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D,selection", [(32, 8, 128, "layer"), (9, 3, 64, "layer"),
                                                (16, 8, 256, "layer"), (32, 8, 128, "kv_head")])
def test_ops_match_torch_ops(triton_ops, Hq, Hkv, D, selection, dtype):
    cfg, tol = InfLLMConfig.paper(selection=selection), 3e-2
    st = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg, device=DEV)
    kv, table, mem = st.kv_cache, st.block_table, st.memory
    cos, sin = rope_table(D, max(SEQ_LENS) + cfg.n_local + 1, device=DEV)
    T = sum(QUERY_LENS)
    g = torch.Generator(device=DEV).manual_seed(1)
    query = torch.empty(T, Hq, D, device=DEV, dtype=dtype).normal_(generator=g)
    key = torch.empty(T, Hkv, D, device=DEV, dtype=dtype).normal_(generator=g)
    value = torch.empty(T, Hkv, D, device=DEV, dtype=dtype).normal_(generator=g)
    qsl, slots = [0], []
    for r, (n, s) in enumerate(zip(QUERY_LENS, SEQ_LENS, strict=True)):
        qsl.append(qsl[-1] + n)
        pos = torch.arange(s - n, s, device=DEV)
        slots.append(table[r, pos // cfg.block_size].long() * cfg.block_size + pos % cfg.block_size)
    slots = torch.cat(slots)
    slots[1] = -1  # a padding token

    kv_t, mem_t = kv.clone(), mem.clone()
    torch_ops.write_kv(kv_t, key, value, slots, mem_t)
    triton_ops.write_kv(kv, key, value, slots, mem)
    assert torch.equal(kv, kv_t) and torch.equal(mem.scores, mem_t.scores) and torch.equal(mem.sealed, mem_t.sealed)

    # The mixed waves, then the decode requests alone: a decode-only wave takes the split-KV path.
    plan = plan_step(qsl, SEQ_LENS, cfg, device=DEV)
    dec = [i for i, n in enumerate(QUERY_LENS) if n == 1]
    decode_plan = plan_step(list(range(len(dec) + 1)), [SEQ_LENS[i] for i in dec], cfg, device=DEV)
    for wave in decode_plan.waves:  # point the decode-only wave at the decodes' rows and blocks
        wave.req.copy_(torch.tensor(dec, device=DEV))
        wave.q0.copy_(torch.tensor([qsl[i] for i in dec], device=DEV))
        wave.host.update(req=dec, q0=[qsl[i] for i in dec])

    checked_units = 0
    for wave in plan.waves + decode_plan.waves:
        torch_ops.seal_units(kv, mem_t, table, wave, cos, sin, cfg)
        triton_ops.seal_units(kv, mem, table, wave, cos, sin, cfg)
        assert torch.equal(mem.sealed, mem_t.sealed)
        assert max_abs_err(mem.reprs, mem_t.reprs) <= tol

        sel_t = torch_ops.select_units(query, mem_t, table, wave, cos, sin, cfg, Hkv)
        sel = triton_ops.select_units(query, mem, table, wave, cos, sin, cfg, Hkv)
        assert sel.shape == sel_t.shape == (wave.n, cfg.selection_groups(Hkv), cfg.topk)
        for a, b in zip(sel_t.flatten(0, 1).tolist(), sel.flatten(0, 1).tolist(), strict=True):
            want = {u for u in a if u >= 0}
            if want:  # near-ties may swap in bf16
                assert len(want & set(b)) / len(want) >= 0.85, (a, b)
                checked_units += len(want)

        before = mem_t.scores.clone()
        o_t = torch.full((T, Hq, D), float("nan"), device=DEV, dtype=dtype)
        o = torch.full((T, Hq, D), float("nan"), device=DEV, dtype=dtype)
        torch_ops.attend(query, kv, mem_t, table, wave, sel_t, cos, sin, cfg, D**-0.5, o_t)
        triton_ops.attend(query, kv, mem, table, wave, sel_t, cos, sin, cfg, D**-0.5, o)
        rows = torch.cat([torch.arange(q0, q0 + n) for q0, n in zip(wave.host["q0"], wave.host["length"],
                                                                      strict=True)]).to(DEV)
        assert not o[rows].isnan().any(), "the kernel left query rows unwritten"
        assert max_abs_err(o[rows], o_t[rows]) <= tol
        assert rel_l2_err(o[rows], o_t[rows]) <= 1e-2
        # The scores this wave added, not the stale totals (they would hide a broken score pass).
        gained_t, gained = mem_t.scores - before, mem.scores - before
        assert gained_t.abs().max() > 0
        assert rel_l2_err(gained, gained_t) <= tol
        mem.scores.copy_(mem_t.scores)  # keep later waves' sealing identical
        mem.reprs.copy_(mem_t.reprs)
    assert checked_units >= 2 * cfg.topk


@pytest.mark.parametrize("Hq,Hkv,D,variant", [(8, 2, 64, None), (9, 3, 64, None), (8, 2, 64, "gptj-softcap-sinks")])
def test_runtime_matches_oracle_fp32(triton_ops, Hq, Hkv, D, variant):
    """The whole Triton runtime against the oracle; a model variant: GPT-J RoPE on half of each
    head (q, k permuted to NeoX), soft-capping and sinks (docs/design.md 3.3)."""
    cfg = InfLLMConfig.paper(n_init=64, n_local=512, block_size=64, topk=4, repr_topk=4, chunk=256)
    g = torch.Generator().manual_seed(0)
    reqs = [make_request(p, d, Hq, Hkv, D, g) for p, d in [([600, 700], 8), ([300], 24), ([1200], 4)]]
    model = {}
    if variant:
        model = dict(rope=RopeLayout(D, D // 2, neox=False), softcap=5.0, sinks=torch.randn(Hq, generator=g))
    cos, sin = rope_table(model["rope"].rotary_dim if model else D, 4096)
    run = run_paged(reqs, cfg, cos, sin, ops=triton_ops, device=DEV, **model)
    traces = run_oracle(reqs, cfg, cos, sin, **model)
    assert sum(c.num_candidates > cfg.topk for tr in traces for c in tr.chunks) > 10  # real selections
    for out, tr in zip(run.outs[0], traces, strict=True):
        assert max_abs_err(out, tr.out) <= 1e-3


def test_prefill_scores_are_deterministic(triton_ops):
    # Representative scores of a prefill chunk are summed by one program per key tile, query
    # tile by query tile in order: the same step twice gives the same bits (with atomic adds
    # from every query tile they varied run to run and could flip representative ties).
    cfg, dtype, (Hq, Hkv, D) = InfLLMConfig.paper(), torch.bfloat16, (32, 8, 128)
    seq_lens, query_lens = [12_000, 3_000], [512, 512]
    st = paged_state(Hq, Hkv, D, seq_lens, dtype, cfg, device=DEV, stale=False)
    cos, sin = rope_table(D, max(seq_lens) + 1, device=DEV)
    T = sum(query_lens)
    query = torch.randn(T, Hq, D, device=DEV, dtype=dtype, generator=torch.Generator(DEV).manual_seed(3))
    plan = plan_step([0, query_lens[0], T], seq_lens, cfg, device=DEV)
    runs = []
    for _ in range(3):
        mem = st.memory.clone()
        mem.scores.zero_()
        out = torch.empty_like(query)
        for wave in plan.waves:
            sel = triton_ops.select_units(query, mem, st.block_table, wave, cos, sin, cfg, Hkv)
            triton_ops.attend(query, st.kv_cache, mem, st.block_table, wave, sel, cos, sin, cfg, D**-0.5, out)
        runs.append((mem.scores, out))
    assert runs[0][0].abs().sum() > 0
    for scores, out in runs[1:]:
        assert torch.equal(scores, runs[0][0]) and torch.equal(out, runs[0][1])


def test_decode_step_replays_in_a_cuda_graph(triton_ops):
    # The static decode plan under a real CUDA graph: capture one decode step at a padded batch
    # size, write the next step's plan into the same buffers, replay, compare with eager runs.
    from vllm_infllm.core.plan import PlanBuffers, plan_decode_step
    from vllm_infllm.core.runtime import infllm_forward

    cfg, dtype, (Hq, Hkv, D) = InfLLMConfig.paper(), torch.bfloat16, (32, 8, 128)
    seq_a = [20_000, 9_000, 5_000, 300, 13_000]
    seq_b = [s + 1 for s in seq_a]
    n, pad = len(seq_a), 3
    st = paged_state(Hq, Hkv, D, seq_b, dtype, cfg, device=DEV)
    cos, sin = rope_table(D, 32_768, device=DEV)
    query = torch.randn(n + pad, Hq, D, device=DEV, dtype=dtype)
    qsl = list(range(n + 1)) + [n] * pad
    bound = cfg.num_candidates(32_767)
    buffers = PlanBuffers(16, DEV)

    def eager(seq, mem):
        out = torch.zeros(n, Hq, D, device=DEV, dtype=dtype)
        infllm_forward(query[:n], st.kv_cache, st.block_table, plan_step(list(range(n + 1)), seq, cfg, device=DEV),
                       mem, cos, sin, cfg, D**-0.5, out, ops=triton_ops)
        return out

    mem_e, mem_g = st.memory.clone(), st.memory.clone()
    before = st.memory.scores.clone()
    plan = plan_decode_step(qsl, seq_a + [0] * pad, cfg, buffers, bound)
    out = torch.zeros(n + pad, Hq, D, device=DEV, dtype=dtype)
    warm = st.memory.clone()  # warm-up (compiles) on a scratch copy, as vLLM warms up first
    infllm_forward(query, st.kv_cache, st.block_table, plan, warm, cos, sin, cfg, D**-0.5, out, ops=triton_ops)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        infllm_forward(query, st.kv_cache, st.block_table, plan, mem_g, cos, sin, cfg, D**-0.5, out,
                       ops=triton_ops)
    for step, seq in enumerate((seq_a, seq_b)):
        if step:
            plan_decode_step(qsl, seq + [0] * pad, cfg, buffers, bound)
        want = eager(seq, mem_e)
        graph.replay()
        torch.cuda.synchronize()
        assert max_abs_err(out[:n], want) <= 3e-2 and rel_l2_err(out[:n], want) <= 1e-2
        # The mass the steps added, not the stale totals (they would hide a broken score pass).
        gained_g, gained_e = mem_g.scores - before, mem_e.scores - before
        assert gained_e.abs().max() > 0 and rel_l2_err(gained_g, gained_e) <= 3e-2
        assert rel_l2_err(mem_g.reprs, mem_e.reprs) <= 1e-2
        assert torch.equal(mem_g.sealed, mem_e.sealed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runtime_matches_torch_runtime_at_real_shapes(triton_ops, dtype):
    # The whole runtime (write, seal, select, attend; waves; several layers) with the Triton
    # ops against the same runtime with the torch ops, both on the GPU, at the package defaults
    # and Llama-3-8B's heads: prompts in 4K-token prefill steps to 12K, then decodes.
    cfg, (Hq, Hkv, D) = InfLLMConfig.paper(), (32, 8, 128)
    g = torch.Generator().manual_seed(11)
    reqs = [make_request([4096, 4096, 3800], 6, Hq, Hkv, D, g), make_request([2000, 700], 6, Hq, Hkv, D, g)]
    cos, sin = rope_table(D, 16_384)
    kw = dict(layers=2, dtype=dtype, device=DEV)
    ref = run_paged(reqs, cfg, cos, sin, ops=torch_ops, **kw)
    got = run_paged(reqs, cfg, cos, sin, ops=triton_ops, **kw)
    # Per query row: bf16 rounding can flip a near-tied representative or selected unit between
    # the two op sets, which moves that chunk's rows by ~10-20%; allow a few such rows.
    for outs_t, outs in zip(ref.outs, got.outs, strict=True):
        for o_t, o in zip(outs_t, outs, strict=True):
            row_err = (o.float() - o_t.float()).flatten(1).norm(dim=1) / o_t.float().flatten(1).norm(dim=1)
            q = torch.tensor([0.5, 0.97, 1.0], device=row_err.device)
            assert (row_err <= 2e-2).float().mean() >= 0.97, row_err.quantile(q)


@pytest.mark.parametrize("unit_score", ["exact", "sketch"])
def test_exact_score_and_retrieval_layer(triton_ops, unit_score):
    # unit_score="exact" or "sketch" below retrieval_layer on the GPU (docs/design.md section
    # 2.7): the layer's selection against the torch op at real shapes in bf16 (near-ties may
    # swap; "sketch": after each op sealed its own copy of the memory, the box and the codes
    # compared), then a decode step of three layers (below, the retrieval layer, above it)
    # captured in one CUDA graph and replayed with the next step's plan, against eager runs.
    from vllm_infllm.core.plan import PlanBuffers, plan_decode_step
    from vllm_infllm.core.runtime import infllm_forward

    cfg = InfLLMConfig.paper(unit_score=unit_score, positions="ordered", retrieval_layer=1)
    dtype, (Hq, Hkv, D) = torch.bfloat16, (9, 3, 64)
    st = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg, device=DEV)
    cos, sin = rope_table(D, max(SEQ_LENS) + cfg.n_local + 1, device=DEV)
    query = torch.randn(sum(QUERY_LENS), Hq, D, device=DEV, dtype=dtype)
    qsl = [0]
    for n in QUERY_LENS:
        qsl.append(qsl[-1] + n)
    checked = 0
    mem_t, mem_g = st.memory.clone(), st.memory.clone()
    for wave in plan_step(qsl, SEQ_LENS, cfg, device=DEV).waves:
        if unit_score == "exact":
            a = torch_ops.select_units_exact(query, st.kv_cache, st.block_table, wave, cos, sin, cfg, Hkv)
            b = triton_ops.select_units_exact(query, st.kv_cache, st.block_table, wave, cos, sin, cfg, Hkv)
        else:
            torch_ops.seal_units(st.kv_cache, mem_t, st.block_table, wave, cos, sin, cfg)
            triton_ops.seal_units(st.kv_cache, mem_g, st.block_table, wave, cos, sin, cfg)
            a = torch_ops.select_units(query, mem_t, st.block_table, wave, cos, sin, cfg, Hkv)
            b = triton_ops.select_units(query, mem_g, st.block_table, wave, cos, sin, cfg, Hkv)
        for x, y in zip(a.flatten(0, 1).tolist(), b.flatten(0, 1).tolist(), strict=True):
            want = {u for u in x if u >= 0}
            if want:
                assert len(want & set(y)) / len(want) >= 0.85, (x, y)
                checked += len(want)
    assert checked >= 2 * cfg.topk
    if unit_score == "sketch":
        assert torch.equal(mem_g.sealed, mem_t.sealed)
        fresh = (mem_t.sealed & ~st.memory.sealed).nonzero().squeeze(1)  # sealed by these waves
        assert len(fresh) > 5
        torch.testing.assert_close(mem_g.reprs[fresh, : 2 * Hkv], mem_t.reprs[fresh, : 2 * Hkv], rtol=1e-2, atol=1e-2)
        codes, want = (torch_ops._sketch_bytes(m.reprs[fresh], Hkv).to(torch.int16) for m in (mem_g, mem_t))
        for nibble in (lambda x: x & 15, lambda x: x >> 4):  # a midpoint may round the other way (FMA)
            assert int((nibble(codes) - nibble(want)).abs().max()) <= 1
        assert float((codes == want).float().mean()) > 0.99

    seq_a = [20_000, 9_000, 5_000, 300]
    seq_b = [s + 1 for s in seq_a]
    n, pad = len(seq_a), 2
    st = paged_state(Hq, Hkv, D, seq_b, dtype, cfg, device=DEV)
    q = torch.randn(n + pad, Hq, D, device=DEV, dtype=dtype)
    rows = list(range(n + 1)) + [n] * pad
    bound = cfg.num_candidates(32_767)
    buffers = PlanBuffers(16, DEV)

    def step(plan, mems, outs, queries):
        for layer in range(3):  # each layer its own inputs (scaled) and memory, one K/V cache
            infllm_forward(queries * (1 + layer), st.kv_cache, st.block_table, plan, mems[layer], cos, sin, cfg,
                           D**-0.5, outs[layer], ops=triton_ops, layer=layer)

    mem_e = [st.memory.clone() for _ in range(3)]
    mem_g = [st.memory.clone() for _ in range(3)]
    outs_g = [torch.zeros(n + pad, Hq, D, device=DEV, dtype=dtype) for _ in range(3)]
    plan = plan_decode_step(rows, seq_a + [0] * pad, cfg, buffers, bound)
    step(plan, [m.clone() for m in mem_g], [o.clone() for o in outs_g], q)  # warm-up: compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(plan, mem_g, outs_g, q)
    for i, seq in enumerate((seq_a, seq_b)):
        if i:
            plan_decode_step(rows, seq + [0] * pad, cfg, buffers, bound)
        want = [torch.zeros(n, Hq, D, device=DEV, dtype=dtype) for _ in range(3)]
        step(plan_step(list(range(n + 1)), seq, cfg, device=DEV), mem_e, want, q[:n])
        graph.replay()
        torch.cuda.synchronize()
        for layer in range(3):
            got = outs_g[layer][:n]
            assert max_abs_err(got, want[layer]) <= 3e-2 and rel_l2_err(got, want[layer]) <= 1e-2, layer
            assert torch.equal(mem_g[layer].sealed, mem_e[layer].sealed)
