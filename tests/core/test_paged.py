"""The paged CPU runtime against the oracle, driven like vLLM drives it: varlen batches mixing
prefill pieces (not aligned to `chunk`) and decodes, random block tables, GQA, several layers,
recycled blocks with stale state.

Every test runs twice: on the torch ops (the reference) and on the native kernels (csrc/cpu)."""

import dataclasses

import pytest
import torch

from vllm_infllm.core.config import InfLLMConfig
from vllm_infllm.core.plan import LayerMemory, plan_step
from vllm_infllm.core.rope import RopeLayout, rope_table
from vllm_infllm.core.runtime import infllm_forward
from vllm_infllm.testing import make_request, max_abs_err, run_oracle, run_paged


@pytest.fixture(autouse=True, params=["torch", "native"])
def cpu_kernel(request, monkeypatch):
    monkeypatch.setenv("VLLM_INFLLM_CPU_KERNEL", request.param)
    return request.param


SMALL = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32)


def batch(Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        make_request([45, 77, 100], 6, Hq, Hkv, D, g),  # steps cut chunks at 45, 122 (chunk 32)
        make_request([9], 30, Hq, Hkv, D, g),  # short prompt, long decode: mixed batches
        make_request([260], 3, Hq, Hkv, D, g),  # one long step: several waves
        make_request([31, 1, 40, 1], 12, Hq, Hkv, D, g),  # 1-token prefill pieces
    ]


def assert_matches_oracle(reqs, run, cfg, cos, sin, layers, atol=1e-4):
    for layer in range(layers):
        for out, tr in zip(run.outs[layer], run_oracle(reqs, cfg, cos, sin, layer), strict=True):
            torch.testing.assert_close(out, tr.out, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (7, 1), (8, 1)])
@pytest.mark.parametrize("D", [64, 128])
def test_paged_matches_oracle(Hq, Hkv, D):
    reqs = batch(Hq, Hkv, D)
    cos, sin = rope_table(D, 1024)
    run = run_paged(reqs, SMALL, cos, sin, layers=2)
    assert_matches_oracle(reqs, run, SMALL, cos, sin, layers=2)


@pytest.mark.parametrize("modes", [{}, {"unit_score": "minmax", "positions": "ordered", "selection": "kv_head"}])
def test_head_size_256_matches_oracle(modes):
    """Head size 256 (Gemma 2/3): the paper's rule and the modes beyond it."""
    cfg = dataclasses.replace(SMALL, **modes)
    reqs = batch(4, 2, 256, seed=9)
    cos, sin = rope_table(256, 1024)
    run = run_paged(reqs, cfg, cos, sin, layers=1)
    assert_matches_oracle(reqs, run, cfg, cos, sin, layers=1)


# The models' variants (docs/design.md section 3.3): RoPE layouts, soft-capping, sinks.
MODEL_VARIANTS = {
    "partial-neox": dict(rope=RopeLayout(64, 16)),
    "gptj": dict(rope=RopeLayout(64, 64, neox=False)),
    "gptj-partial": dict(rope=RopeLayout(64, 32, neox=False)),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks="random"),
    "softcap-sinks-partial": dict(rope=RopeLayout(64, 48), softcap=3.0, sinks="random"),
}


def model_variant(name, Hq, seed=0):
    v = dict(MODEL_VARIANTS[name])
    if v.get("sinks") == "random":
        v["sinks"] = torch.randn(Hq, generator=torch.Generator().manual_seed(seed)) * 2
    return v


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
@pytest.mark.parametrize("Hq,Hkv,modes", [(6, 2, {}), (8, 1, {"unit_score": "minmax", "positions": "ordered"})])
def test_model_variants_match_oracle(variant, Hq, Hkv, modes):
    """Partial and GPT-J RoPE (q, k permuted to full-width NeoX, as the adapter does), logit
    soft-capping and sinks, against the oracle that applies them as the model defines them.
    Logits are scaled up so the cap bites and the sinks take real mass."""
    cfg = dataclasses.replace(SMALL, **modes)
    g = torch.Generator().manual_seed(11)
    reqs = [make_request(p, d, Hq, Hkv, 64, g, scale_qk=1.7) for p, d in [([45, 77, 100], 6), ([260], 3),
                                                                          ([9], 30)]]
    model = model_variant(variant, Hq)
    rope = model.get("rope")
    cos, sin = rope_table(rope.rotary_dim if rope else 64, 1024)
    run = run_paged(reqs, cfg, cos, sin, layers=2, **model)
    for layer in range(2):
        traces = run_oracle(reqs, cfg, cos, sin, layer, **model)
        for out, tr in zip(run.outs[layer], traces, strict=True):
            torch.testing.assert_close(out, tr.out, rtol=1e-4, atol=1e-4)
    # ... and the variant matters: the plain oracle is far from it.
    plain = run_oracle(reqs, cfg, *rope_table(64, 1024))
    assert max(max_abs_err(o, t.out) for o, t in zip(run.outs[0], plain, strict=True)) > 1e-2


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (8, 1)])
def test_kv_head_selection_matches_oracle(Hq, Hkv):
    """selection="kv_head": every KV head reads its own units (docs/design.md section 2.7)."""
    cfg = dataclasses.replace(SMALL, selection="kv_head")
    reqs = batch(Hq, Hkv, 64, seed=3)
    cos, sin = rope_table(64, 1024)
    run = run_paged(reqs, cfg, cos, sin, layers=2)
    assert_matches_oracle(reqs, run, cfg, cos, sin, layers=2)


@pytest.mark.parametrize("Hq,Hkv,selection", [(4, 4, "layer"), (6, 2, "layer"), (6, 2, "kv_head"),
                                             (8, 1, "layer")])
def test_ordered_positions_match_oracle(Hq, Hkv, selection):
    """positions="ordered": global blocks moved forward by whole blocks (docs/design.md 2.7)."""
    cfg = dataclasses.replace(SMALL, positions="ordered", selection=selection)
    reqs = batch(Hq, Hkv, 64, seed=4)
    cos, sin = rope_table(64, 1024)
    run = run_paged(reqs, cfg, cos, sin, layers=2)
    assert_matches_oracle(reqs, run, cfg, cos, sin, layers=2)


@pytest.mark.parametrize("Hq,Hkv,selection,positions,unit_score", [
    (4, 4, "layer", "fixed", "minmax"), (6, 2, "layer", "fixed", "minmax"),
    (6, 2, "kv_head", "ordered", "minmax"), (8, 1, "layer", "fixed", "minmax"),
    (6, 2, "layer", "fixed", "max_topk"), (6, 2, "kv_head", "ordered", "max_topk"),
    (8, 1, "layer", "fixed", "max_topk")])
def test_unit_scores_match_oracle(Hq, Hkv, selection, positions, unit_score):
    """unit_score="minmax": Quest's per-channel bound; "max_topk": the representatives kept
    apart (docs/design.md section 2.7). Outputs and every sealed unit's representatives."""
    cfg = dataclasses.replace(SMALL, unit_score=unit_score, selection=selection, positions=positions)
    reqs = batch(Hq, Hkv, 64, seed=6)
    cos, sin = rope_table(64, 1024)
    run = run_paged(reqs, cfg, cos, sin, layers=2)
    assert_matches_oracle(reqs, run, cfg, cos, sin, layers=2)
    mem, table = run.memories[0], run.block_table
    for i, tr in enumerate(run_oracle(reqs, cfg, cos, sin)):
        for u, r in tr.reprs.items():
            torch.testing.assert_close(mem.reprs[table[i, cfg.init_blocks + u]], r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("Hq,Hkv,modes", [
    (6, 2, {"contiguity": 1}), (8, 1, {"contiguity": 2, "unit_score": "minmax"}),
    (6, 2, {"select_queries": 5, "chunking": "step"}),
    (4, 4, {"select_queries": 7, "contiguity": 1, "selection": "kv_head", "chunking": "step"}),
    (6, 2, {"select_queries": 3, "positions": "ordered", "unit_score": "minmax", "chunking": "step"})])
def test_contiguity_and_select_queries_match_oracle(Hq, Hkv, modes):
    """contiguity: neighbours ranked in; select_queries: q̄ of the chunk's last m queries
    (docs/design.md section 2.7), with step-cut chunks shorter than m."""
    cfg = dataclasses.replace(SMALL, topk=3, **modes)
    reqs = batch(Hq, Hkv, 64, seed=7)
    cos, sin = rope_table(64, 1024)
    run = run_paged(reqs, cfg, cos, sin, layers=2)
    assert_matches_oracle(reqs, run, cfg, cos, sin, layers=2)


@pytest.mark.parametrize("Hq,Hkv,modes", [
    (6, 2, {"retrieval_layer": 1}),
    (8, 1, {"retrieval_layer": 1, "unit_score": "minmax", "positions": "ordered"}),
    (6, 2, {"retrieval_layer": 0, "selection": "kv_head", "unit_score": "max_topk", "contiguity": 1}),
    (4, 4, {"retrieval_layer": 1, "chunking": "step", "select_queries": 5, "selection": "kv_head"}),
    (6, 2, {"retrieval_layer": 1, "unit_score": "exact", "positions": "ordered"}),
    (8, 1, {"unit_score": "exact", "selection": "kv_head", "contiguity": 1}),
    (6, 2, {"retrieval_layer": 1, "unit_score": "sketch", "positions": "ordered"}),
    (8, 1, {"unit_score": "sketch", "selection": "kv_head", "contiguity": 1})])
def test_retrieval_layer_matches_oracle(Hq, Hkv, modes):
    """retrieval_layer (docs/design.md section 2.7): the layer below selects by its own score,
    the retrieval layer by the exact score over every key, the layer above attends its units;
    unit_score="exact": every layer selects by that score; "sketch": by its 4-bit sketch."""
    cfg = dataclasses.replace(SMALL, topk=3, **modes)
    reqs = batch(Hq, Hkv, 64, seed=8)
    cos, sin = rope_table(64, 1024)
    run = run_paged(reqs, cfg, cos, sin, layers=3)
    assert_matches_oracle(reqs, run, cfg, cos, sin, layers=3)
    # ... and the mode matters: the layer above does not attend what its own score would pick.
    own = run_oracle(reqs, dataclasses.replace(cfg, retrieval_layer=-1, unit_score="mean_topk"), cos, sin, 2)
    assert max(max_abs_err(o, t.out) for o, t in zip(run.outs[2], own, strict=True)) > 1e-2


def test_retrieval_layer_needs_the_layer_index_and_its_selection():
    cfg = dataclasses.replace(SMALL, retrieval_layer=1)
    reqs = batch(6, 2, 64)
    cos, sin = rope_table(64, 1024)
    mem = LayerMemory.allocate(20, 6, 64, 16, torch.float32, "cpu", chosen=cfg.chosen_shape(2))
    kv = torch.randn(20, 2, 16, 128)
    q = reqs[2].q[:100]
    table = torch.arange(20, dtype=torch.int32)[None]
    with pytest.raises(ValueError, match=r"retrieval_layer=1 needs each layer's index.*pass layer="):
        infllm_forward(q, kv, table, plan_step([0, 100], [100], cfg), mem, cos, sin, cfg, 0.1, torch.empty_like(q))
    with pytest.raises(RuntimeError, match=r"layer 2 reads the units of retrieval_layer=1, which has not "
                                           r"selected in this step"):
        infllm_forward(q, kv, table, plan_step([0, 100], [100], cfg), mem, cos, sin, cfg, 0.1, torch.empty_like(q),
                       layer=2)


def test_memory_allocated_for_another_unit_score_is_an_error():
    cfg = dataclasses.replace(SMALL, unit_score="minmax")
    reqs = batch(6, 2, 64)
    cos, sin = rope_table(64, 1024)
    mem = LayerMemory.allocate(8, 6, 64, 16, torch.float32, "cpu")  # paper layout: 6 rows
    kv = torch.zeros(8, 2, 16, 128)
    q = reqs[0].q[:4]
    plan = plan_step([0, 4], [4], cfg)
    with pytest.raises(ValueError, match=r"reprs has 6 rows per block, unit_score='minmax' needs 4"):
        infllm_forward(q, kv, torch.zeros(1, 8, dtype=torch.int32), plan, mem, cos, sin, cfg, 0.1,
                       torch.empty_like(q))


def test_representatives_and_selection_match_oracle():
    reqs = batch(6, 2, 64, seed=5)
    cos, sin = rope_table(64, 1024)
    run = run_paged(reqs, SMALL, cos, sin)
    mem, table = run.memories[0], run.block_table
    sealed_checked = 0
    for i, tr in enumerate(run_oracle(reqs, SMALL, cos, sin)):
        for u, r in tr.reprs.items():
            blk = table[i, SMALL.init_blocks + u]
            assert mem.sealed[blk]
            torch.testing.assert_close(mem.reprs[blk], r, rtol=1e-4, atol=1e-5)
            sealed_checked += 1
    assert sealed_checked > 10


@pytest.mark.parametrize(
    "cfg",
    [
        InfLLMConfig.paper(n_init=0, n_local=48, block_size=16, topk=1, repr_topk=1, chunk=48),
        InfLLMConfig.paper(n_init=16, n_local=32, block_size=16, topk=0, repr_topk=2, chunk=16),
        InfLLMConfig.paper(n_init=64, n_local=128, block_size=32, topk=3, repr_topk=32, chunk=64),
        InfLLMConfig.paper(n_init=0, n_local=48, block_size=16, topk=1, repr_topk=1, chunk=48,
                     selection="kv_head", positions="ordered"),
        InfLLMConfig.paper(n_init=64, n_local=128, block_size=32, topk=3, repr_topk=32, chunk=64,
                     positions="ordered"),
    ],
    ids=["no-init", "topk0-control", "wide", "no-init-kv_head-ordered", "wide-ordered"],
)
def test_other_configs(cfg):
    reqs = batch(6, 3, 64, seed=2)
    cos, sin = rope_table(64, 1024)
    run = run_paged(reqs, cfg, cos, sin)
    assert_matches_oracle(reqs, run, cfg, cos, sin, layers=1)


def test_recycled_blocks_start_afresh():
    # First batch fills every block with real state; the second batch gets the same physical
    # blocks in another order and must not see any of it (scores, sealed flags, reprs).
    cos, sin = rope_table(64, 1024)
    g = torch.Generator().manual_seed(9)
    first = [make_request([200], 20, 6, 2, 64, g), make_request([150], 40, 6, 2, 64, g)]
    run1 = run_paged(first, SMALL, cos, sin, num_blocks=40)
    assert run1.memories[0].sealed.sum() > 10
    second = [make_request([120, 90], 10, 6, 2, 64, g), make_request([230], 8, 6, 2, 64, g)]
    run2 = run_paged(second, SMALL, cos, sin, reuse=run1, gen=torch.Generator().manual_seed(3))
    assert_matches_oracle(second, run2, SMALL, cos, sin, layers=1)


@pytest.mark.parametrize("modes", [{}, {"unit_score": "minmax", "selection": "kv_head"}])
def test_a_request_with_nan_keys_leaves_the_others_exact(modes):
    """A broken input (a NaN key, as a broken model or an fp16 overflow gives) in one request:
    the step runs (no error, no out-of-range index from a NaN score), the other requests of
    every mixed batch still equal the oracle, and the broken request's later queries are NaN
    (propagated, as dense attention would, never hidden)."""
    cfg = InfLLMConfig(**{**SMALL.to_dict(), **modes})
    reqs = batch(6, 2, 64, seed=5)
    bad = reqs[2]  # one 260-token prefill, then decodes: the NaN is in its memory units later
    bad.k[70, 1, 5] = float("nan")
    cos, sin = rope_table(64, 1024)
    run = run_paged(reqs, cfg, cos, sin)
    good = [r for r in reqs if r is not bad]
    outs = [o for r, o in zip(reqs, run.outs[0], strict=True) if r is not bad]
    for out, tr in zip(outs, run_oracle(good, cfg, cos, sin), strict=True):
        torch.testing.assert_close(out, tr.out, rtol=1e-4, atol=1e-4)
    broken = run.outs[0][2]
    assert not broken[:70].isnan().any() and broken[70:].isnan().any()
    assert broken[-1].isnan().any()  # a decode query long past the window still reads it


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_cache(dtype, tol):
    reqs = batch(6, 2, 64, seed=4)[:3]
    cos, sin = rope_table(64, 1024)
    run = run_paged(reqs, SMALL, cos, sin, dtype=dtype)
    for out, tr in zip(run.outs[0], run_oracle(reqs, SMALL, cos, sin), strict=True):
        assert (out - tr.out).abs().max() < tol * 5
        assert (out - tr.out).abs().mean() < tol


def test_small_steps_run_on_one_thread_and_restore_it(monkeypatch):
    """Decode-sized steps run the CPU ops on one thread (core.runtime._cpu_threads: fork/join
    barriers of ~60 small ops per layer cost more than a second thread gains), larger steps on
    all threads; the thread count is restored and the result still matches the oracle."""
    from vllm_infllm.core.ops import torch_ops
    from vllm_infllm.core.runtime import SINGLE_THREAD_MAX_TOKENS

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []  # (query rows in the step, threads inside attend)
        attend = torch_ops.attend

        def spy(query, *args, **kwargs):
            seen.append((query.shape[0], torch.get_num_threads()))
            return attend(query, *args, **kwargs)

        monkeypatch.setattr(torch_ops, "attend", spy)
        reqs = batch(6, 2, 64)
        cos, sin = rope_table(64, 1024)
        run = run_paged(reqs, SMALL, cos, sin, ops=torch_ops)
        assert torch.get_num_threads() == 2
        assert_matches_oracle(reqs, run, SMALL, cos, sin, layers=1)
        small = {t for rows, t in seen if rows <= SINGLE_THREAD_MAX_TOKENS}
        large = {t for rows, t in seen if rows > SINGLE_THREAD_MAX_TOKENS}
        assert small == {1} and large == {2}, seen
    finally:
        torch.set_num_threads(before)


def test_plan_is_one_aligned_int32_table():
    # A step's chunk tables reach the device in one copy (one tensor per field per wave was a
    # blocking host-to-device copy each), as int32 (the kernels' position maths stays 32-bit),
    # every wave's rows 16-byte aligned (Triton compiles again for unaligned pointers).
    from vllm_infllm.core.plan import plan_step

    qsl, seq_lens = [0, 260, 261, 298, 299, 300], [260, 5000, 337, 90, 91]
    plan = plan_step(qsl, seq_lens, SMALL)
    assert len(plan.waves) > 3 and len({w.n for w in plan.waves}) > 1
    storages = set()
    for w in plan.waves:
        for name in ("req", "c0", "length", "q0", "num_cand", "a0"):
            t = getattr(w, name)
            assert t.dtype == torch.int32 and t.data_ptr() % 16 == 0, name
            assert t.tolist() == w.host[name], name
            storages.add(t.untyped_storage().data_ptr())
    assert len(storages) == 1


# One prompt (same q/k/v: same seed and length), scheduled five ways in one batch: one step,
# steps cut inside chunks that already select (K > topk from position ~160), 1-token steps.
SPLITS = [[300], [170, 60, 70], [37, 163, 5, 95], [1] * 20 + [280], [229, 1, 1, 69]]


@pytest.mark.parametrize("modes", [{}, {"selection": "kv_head"},
                                   {"unit_score": "minmax", "positions": "ordered", "contiguity": 1}],
                         ids=["paper", "kv_head", "minmax-ordered-contig"])
def test_aligned_chunking_does_not_depend_on_the_schedule(modes):
    """chunking="aligned" (docs/design.md 2.3): every split gives the oracle's output, which
    knows no steps, so the splits agree with each other; the steps that continue a chunk read the
    stored selection (recycled blocks hold stale `chosen` values that must not be read)."""
    cfg = dataclasses.replace(SMALL, chunking="aligned", **modes)
    cos, sin = rope_table(64, 1024)
    reqs = [make_request(sp, 25, 6, 2, 64, torch.Generator().manual_seed(0), scale_qk=2.0) for sp in SPLITS]
    run = run_paged(reqs, cfg, cos, sin, layers=2)
    assert_matches_oracle(reqs, run, cfg, cos, sin, layers=2)
    traces = run_oracle(reqs, cfg, cos, sin)
    assert all(len(tr.chunks) == len(traces[0].chunks) for tr in traces)  # steps cut nothing
    # Each block at a multiple of `chunk` holds its chunk's selection (the decode at 320 too).
    stored = 0
    for i, tr in enumerate(traces):
        for c in tr.chunks:
            if c.c0 % cfg.chunk == 0 and c.num_candidates > cfg.topk:
                held = run.memories[0].chosen[run.block_table[i, c.c0 // cfg.block_size]]
                groups = cfg.selection_groups(2)
                assert held.tolist() == [c.per_kv_head[g * 2 // groups] for g in range(groups)], (i, c.c0)
                stored += 1
    assert stored >= 5 * len(traces)
    for layer in range(2):
        for out in run.outs[layer][1:]:
            torch.testing.assert_close(out, run.outs[layer][0], rtol=1e-5, atol=1e-5)
    # The same splits with the paper's chunking ("step"): the schedule changes the answer.
    step = dataclasses.replace(cfg, chunking="step")
    run = run_paged(reqs, step, cos, sin)
    assert max(max_abs_err(out, run.outs[0][0]) for out in run.outs[0][1:]) > 0.1


def test_aligned_plan_continues_chunks_and_takes_prompt_lengths():
    cfg = dataclasses.replace(SMALL, chunking="aligned")  # chunk 32
    # Without prompt lengths every prompt ends with the step: its last query selects alone.
    assert [(w.host["c0"], w.host["length"]) for w in plan_step([0, 10], [50], cfg).waves] == [
        ([40], [9]), ([49], [1])]
    # A prompt of 100 tokens, this step [40, 100): continues chunk [32, 64) (a0 = 32 < c0),
    # then [64, 96), [96, 99), the last prompt query alone. Two more requests decode.
    plan = plan_step([0, 60, 61, 62], [100, 201, 225], cfg, prompt_lens=[100, 150, 150])
    rows = [(w.host["req"][j], w.host["c0"][j], w.host["length"][j], w.host["a0"][j], w.host["num_cand"][j])
            for w in plan.waves for j in range(w.n)]
    assert sorted(rows) == [
        (0, 40, 24, 32, 0), (0, 64, 32, 64, 0), (0, 96, 3, 96, 0), (0, 99, 1, 99, 0),
        (1, 200, 1, 200, cfg.num_candidates(200)), (2, 224, 1, 224, cfg.num_candidates(224)),
    ]


@pytest.mark.parametrize("bits", [0, 4, 2])
def test_exact_unit_scores_against_a_brute_force_of_the_raw_keys(bits):
    """torch_ops.exact_unit_scores (what "exact" and retrieval_layer rank) against a brute force
    from the paged keys: un-rotate each key of each candidate, keep each query head's best dot,
    sum over the heads; with sketch_bits b, every raw key first rounded to one of 2^b levels
    between its channel's min and max over the unit (the study of a cheaper score)."""
    from vllm_infllm.core.ops import torch_ops
    from vllm_infllm.core.rope import rotate
    from vllm_infllm.testing import paged_state

    cfg = dataclasses.replace(SMALL, unit_score="exact", topk=3)
    Hq, Hkv, D, G = 6, 3, 16, 2
    st = paged_state(Hq, Hkv, D, [300], torch.float32, cfg, seed=13)
    cos, sin = rope_table(D, 512)
    q = torch.randn(1, Hq, D, generator=torch.Generator().manual_seed(14))
    wave = plan_step([0, 1], [300], cfg).waves[-1]
    got = torch_ops.exact_unit_scores(q, st.kv_cache, st.block_table, wave, cos, sin, cfg, Hkv, sketch_bits=bits)
    q_bar = rotate(q, cos, sin, torch.tensor([cfg.n_local - 1 - 299]))[0]  # [Hq, D]
    K = wave.host["num_cand"][0]
    assert K > 8
    for u in range(K):
        keys = st.kv_cache[st.block_table[0, cfg.init_blocks + u], :, :, :D].transpose(0, 1)  # [B, Hkv, D]
        pos = cfg.n_init + u * cfg.block_size + torch.arange(cfg.block_size)
        raw = rotate(keys, cos, sin, -pos)
        if bits:
            lo, hi = raw.amin(0), raw.amax(0)
            step = (hi - lo) / (2**bits - 1)
            raw = lo + torch.round((raw - lo) / step) * step
            assert len(raw[:, 0, 0].unique()) <= 2**bits
        best = torch.einsum("hd,bhd->bh", q_bar, raw.repeat_interleave(G, 1)).amax(0)
        torch.testing.assert_close(got[0, 0, u], best.sum(), rtol=1e-5, atol=1e-4)
    assert (got[0, 0, K:] == float("-inf")).all()
