"""Offloaded memory units (core/offload.py): the rule for which units may leave the KV pool, the
store they go to, and the ops reading them from it.

The paged runtime runs the same requests twice, once with every unit in the pool and once with
each unit `offloadable_units` allows moved to a `UnitStore` between steps (as the block manager
will free it) and its pool block poisoned (testing.run_paged): outputs and side state must be
bitwise the same, and no op may write a poisoned block. Every test of the runtime runs on the
torch ops and on the native kernels."""

import itertools
import os

import pytest
import torch

from vllm_infllm.core.config import InfLLMConfig
from vllm_infllm.core.offload import UnitStore, max_blocks_held, offloadable_units, units_to_release
from vllm_infllm.core.plan import LayerMemory, plan_step
from vllm_infllm.core.rope import rope_table
from vllm_infllm.core.runtime import infllm_forward
from vllm_infllm.testing import POISON_CHOSEN, POISON_KV, POISON_SCORE, make_request, run_oracle, run_paged

SMALL = dict(n_init=32, n_local=64, block_size=16, repr_topk=3, chunk=32)
MODES = {
    "paper_step": dict(topk=3, chunking="step"),
    "paper_aligned": dict(topk=3),
    "kv_head_minmax_ordered": dict(topk=4, selection="kv_head", unit_score="minmax", positions="ordered",
                                   contiguity=1),
    "max_topk_select_queries": dict(topk=2, unit_score="max_topk", chunking="step", select_queries=8),
    "topk_above_window": dict(topk=9, chunk=16),  # empty selection slots while units are offloaded
    # layer 0 scores every key (the store's for offloaded units), layer 1 reads its choice
    "retrieval_layer": dict(topk=3, retrieval_layer=0, unit_score="minmax"),
    "sketch": dict(topk=3, unit_score="sketch"),
}


@pytest.fixture(params=["torch", "native"])
def cpu_kernel(request, monkeypatch):
    monkeypatch.setenv("VLLM_INFLLM_CPU_KERNEL", request.param)
    return request.param


def requests(Hq, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        make_request([45, 77, 100, 130], 9, Hq, Hkv, D, g),  # long prefill in uneven pieces
        make_request([600], 20, Hq, Hkv, D, g),  # one step: many waves, then decodes
        make_request([9], 200, Hq, Hkv, D, g),  # short prompt, long decode (units leave while decoding)
        make_request([31, 1, 90, 1], 12, Hq, Hkv, D, g),  # stays below the rule
    ]


@pytest.mark.parametrize("mode,Hq,Hkv,D,dtype", [
    ("paper_step", 4, 2, 64, torch.float32),
    ("paper_aligned", 8, 1, 64, torch.bfloat16),
    ("kv_head_minmax_ordered", 6, 2, 32, torch.float32),
    ("max_topk_select_queries", 4, 2, 64, torch.float32),
    ("topk_above_window", 6, 2, 64, torch.bfloat16),
    ("retrieval_layer", 6, 2, 64, torch.bfloat16),
    ("sketch", 6, 2, 64, torch.bfloat16),
])
def test_offloaded_units_give_bitwise_the_same_attention(cpu_kernel, mode, Hq, Hkv, D, dtype, tmp_path):
    cfg = InfLLMConfig.paper(**{**SMALL, **MODES[mode]})
    reqs = requests(Hq, Hkv, D, seed=Hq)
    cos, sin = rope_table(D, 1024)
    base = run_paged(reqs, cfg, cos, sin, layers=2, dtype=dtype)
    path = tmp_path if mode == "paper_aligned" else None  # one case with the K/V in files
    off = run_paged(reqs, cfg, cos, sin, layers=2, dtype=dtype, offload=True, slab_units=3, offload_path=path)
    if path is not None:
        assert len(os.listdir(path)) == off.store.num_slabs
    units = off.store.num_units
    assert units >= 40 and off.store.num_slabs >= 13, "the test must offload many units over several slabs"
    assert off.store.units_of(2), "units must also leave while a request decodes"
    for layer in range(2):
        for a, b in zip(base.outs[layer], off.outs[layer], strict=True):
            assert torch.equal(a, b), f"layer {layer}: outputs differ with {units} units offloaded"
    # Nothing wrote a block after its unit left (a stale block table entry would be another
    # request's page), and the other blocks hold the same side state as without offload.
    gone = torch.tensor(off.poisoned)
    kept = torch.ones(off.caches[0].shape[0], dtype=torch.bool)
    kept[gone] = False
    for layer in range(2):
        mem_b, mem_o = base.memories[layer], off.memories[layer]
        assert (off.caches[layer][gone] == torch.tensor(POISON_KV).to(dtype)).all()
        assert (mem_o.scores[gone] == POISON_SCORE).all() and not mem_o.sealed[gone].any()
        assert mem_o.reprs[gone].isnan().all()
        if mem_o.chosen is not None:
            assert (mem_o.chosen[gone] == POISON_CHOSEN).all()
            assert torch.equal(mem_b.chosen[kept], mem_o.chosen[kept])
        assert torch.equal(mem_b.scores[kept], mem_o.scores[kept])
        assert torch.equal(_bits(mem_b.reprs[kept]), _bits(mem_o.reprs[kept]))
        assert torch.equal(base.caches[layer][kept], off.caches[layer][kept])
    # The store holds the pool's copies of the units (and they were sealed when they left).
    for layer in range(2):
        for i in range(len(reqs)):
            held = off.store.units_of(i)
            if not held:
                continue
            phys = base.block_table[i, list(held)].long()
            view = off.store.view(layer, torch.zeros(1, 1, dtype=torch.int32))
            slots = torch.tensor(list(held.values()))
            assert torch.equal(view.gather_kv(slots), base.caches[layer][phys])
            assert torch.equal(_bits(view.gather_reprs(slots)), _bits(base.memories[layer].reprs[phys]))
            assert base.memories[layer].sealed[phys].all()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bitwise: unit_score="sketch" packs 4-bit codes into the rows, which read as floats may be NaN."""
    return t.contiguous().view(torch.uint8)


def test_offloaded_run_still_matches_the_oracle(cpu_kernel):
    cfg = InfLLMConfig.paper(**SMALL, topk=3)
    reqs = requests(4, 2, 64, seed=3)
    cos, sin = rope_table(64, 1024)
    off = run_paged(reqs, cfg, cos, sin, offload=True)
    assert off.store.num_units > 0
    for out, tr in zip(off.outs[0], run_oracle(reqs, cfg, cos, sin), strict=True):
        torch.testing.assert_close(out, tr.out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["paper_step", "paper_aligned", "kv_head_minmax_ordered", "topk_above_window"])
def test_unit_reads_count_the_oracles_selections_and_the_store_reads(cpu_kernel, mode):
    """The statistics' unit reads: every selected unit once per chunk piece a step runs (and per
    KV head with per-KV-head selection), counted as a store read when the unit had left the
    pool before that step: both derived here from the oracle's selections and the rule."""
    cfg = InfLLMConfig.paper(**{**SMALL, **MODES[mode]})
    reqs = requests(4, 2, 32, seed=5)
    cos, sin = rope_table(32, 1024)
    run = run_paged(reqs, cfg, cos, sin, layers=2, offload=True)
    for layer in range(2):
        want_sel = want_store = 0
        for r, trace in zip(reqs, run_oracle(reqs, cfg, cos, sin, layer=layer), strict=True):
            ends = list(itertools.accumulate(r.pieces))
            steps, moved = [], 0
            for s0, s1 in zip([0] + ends[:-1], ends, strict=True):
                steps.append((s0, s1, moved))  # units [0, moved) were in the store during the step
                moved = max(moved, offloadable_units(s1, r.prompt_len, cfg))
            for ch in trace.chunks:
                lists = ch.per_kv_head if cfg.selection == "kv_head" else [ch.selected]
                for s0, s1, gone in steps:
                    if s0 < ch.c1 and ch.c0 < s1:  # the part of the chunk this step ran
                        want_sel += sum(len(u) for u in lists)
                        want_store += sum(x < gone for u in lists for x in u)
        assert list(run.unit_reads[layer].flush()) == [want_sel, want_store]
        assert 0 < want_store < want_sel  # the case reads both the pool and the store


@pytest.mark.parametrize("query_len", [1, 20])
def test_empty_selection_slots_never_read_an_offloaded_pool_block(cpu_kernel, query_len):
    """With fewer candidates than topk, the torch ops read the empty slots' blocks masked (as
    unit 0): an offloaded unit 0 must come from the store there too, not from its pool block,
    which may hold anything (here NaN, which a weight of 0 does not hide)."""
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=9, chunk=16, repr_topk=3, chunking="step")
    Hq, Hkv, D, B = 4, 2, 64, 16
    T = 200
    g = torch.Generator().manual_seed(5)
    nb = -(-T // B)
    kv = torch.randn(nb + 1, Hkv, B, 2 * D, generator=g)
    mem = LayerMemory.allocate(nb + 1, Hq, D, B, torch.float32, "cpu", cfg.repr_rows(Hq, Hkv))
    mem.reprs.normal_(generator=g)
    mem.sealed.fill_(True)
    table = (torch.randperm(nb, generator=g) + 1).int()[None]  # no block 0: padding never meets it
    q = torch.randn(query_len, Hq, D, generator=g)
    cos, sin = rope_table(D, 1024)
    plan = plan_step([0, query_len], [T], cfg)
    assert 0 < plan.waves[-1].host["num_cand"][0] < cfg.topk
    E = offloadable_units(T - query_len, T, cfg)
    assert E >= 1
    expect = torch.empty(query_len, Hq, D)
    infllm_forward(q, kv.clone(), table, plan, mem.clone(), cos, sin, cfg, D**-0.5, expect)
    store = UnitStore(1, Hkv, B, D, cfg.repr_rows(Hq, Hkv), torch.float32, slab_units=2)
    logical = list(range(cfg.init_blocks, cfg.init_blocks + E))
    phys = table[0, logical].tolist()
    store.write(0, store.allocate(0, logical), kv, mem.reprs, phys)
    kv[phys] = float("nan")
    mem.reprs[phys] = float("nan")
    got = torch.empty(query_len, Hq, D)
    plan = plan_step([0, query_len], [T], cfg)
    infllm_forward(q, kv, table, plan, mem, cos, sin, cfg, D**-0.5, got,
                   store=store.view(0, store.slot_table([0], table.shape[1])))
    assert torch.equal(got, expect)


@pytest.mark.parametrize("cfg", [InfLLMConfig.paper(**SMALL, topk=3),
                                 InfLLMConfig.paper(**SMALL, topk=3, chunking="step"),
                                 InfLLMConfig.paper(n_init=0, n_local=48, block_size=16, chunk=48, topk=2)])
def test_offloadable_units_are_never_candidates_to_seal_nor_outside_the_past(cfg):
    """The rule against its reasons, for every position of prompts of many lengths: a later
    chunk's candidates K' never fall below it by less than the seal window, and what it allows
    has left the local window."""
    B, window = cfg.block_size, cfg.chunk // cfg.block_size + 2
    for L in (1, 30, 97, 200, 333):
        for P in range(1, L + 40):
            E = offloadable_units(P, L, cfg)
            assert 0 <= E <= max(0, cfg.num_candidates(P) - window)
            assert E == 0 or cfg.n_init + E * B <= cfg.window_start(P)  # the units have left the window
            for p in range(P, L + 60, 7):  # every later query: its chunk's candidates
                a0 = cfg.selection_start(p, L) if cfg.chunking == "aligned" else p
                assert max(0, cfg.num_candidates(a0) - window) >= E
        assert offloadable_units(0, L, cfg) == 0


@pytest.mark.parametrize("cfg", [InfLLMConfig.paper(n_local=1024, topk=4), InfLLMConfig.paper(),
                                 InfLLMConfig.paper(**SMALL, topk=3, chunking="step"),
                                 InfLLMConfig.paper(n_init=0, n_local=48, block_size=16, chunk=48, topk=2)])
def test_blocks_held_by_a_request_stay_under_the_bound_at_any_length(cfg):
    """A request that releases units as units_to_release says holds at most max_blocks_held
    blocks at every step, prompt and decode, whatever the step sizes (brute force), and the
    bound is not loose by more than a few blocks."""
    B = cfg.block_size
    for cache in (0, 2 * cfg.topk):
        for T in (1, cfg.chunk, 3 * B + 5, 2048):
            bound = max_blocks_held(cfg, cache, T)
            for L in (1, 700, 5000, 40_000):
                P = 0
                while P < L + 3000:
                    t = min(T, max(1, L - P)) if P < L else 1  # prefill steps of up to T, then decodes
                    held = -(-(P + t) // B) - units_to_release(P, L, cfg, cache)
                    assert held <= bound, (cache, T, L, P)
                    P += t if P < L else 37  # decode: sample every 37th position
            assert bound - max(-(-(P + T) // B) - units_to_release(P, L, cfg, cache)
                               for P in range(20_000, 20_000 + cfg.chunk + B)) <= cfg.chunk // B + 3
    with pytest.raises(ValueError, match="cache_units=-1 must be >= 0"):
        units_to_release(100, 100, cfg, -1)


def test_the_store_releases_slabs_and_memory(tmp_path):
    for path in (None, tmp_path):
        st = UnitStore(num_layers=2, num_kv_heads=2, block_size=4, head_dim=8, repr_rows=3, dtype=torch.bfloat16,
                       slab_units=4, path=path)
        pool = torch.randn(40, 2, 4, 16).to(torch.bfloat16)
        reprs = torch.randn(40, 3, 8).to(torch.bfloat16)
        a = st.allocate("a", [5, 6, 7])
        b = st.allocate("b", range(2, 9))
        assert a == [0, 1, 2] and b == [3, 4, 5, 6, 7, 8, 9]  # lowest slots first
        for layer in range(2):
            st.write(layer, a + b, pool, reprs, list(range(10)))
        assert st.num_units == 10 and st.num_slabs == 3
        assert st.holds("a") and st.holds("b") and not st.holds("zz")
        assert st.unit_nbytes == 2 * (2 * 4 * 16 + 3 * 8) * 2  # 2 layers of K/V and representatives, bf16
        assert st.nbytes == 3 * 4 * st.unit_nbytes  # 3 slabs of 4 units
        if path is not None:
            assert len(os.listdir(path)) == 3  # one sparse file per slab
        with pytest.raises(ValueError, match=r"already holds logical block\(s\) \[6\]"):
            st.allocate("a", [6])
        table = st.slot_table(["b", None, "a", "zz"], width=9)
        assert table[0].tolist() == [-1, -1, 3, 4, 5, 6, 7, 8, 9][:9]
        assert (table[1] == -1).all() and table[2, 5:8].tolist() == [0, 1, 2] and (table[3] == -1).all()
        view = st.view(1, table)
        assert torch.equal(view.gather_kv(torch.tensor([9, 0])), pool[[9, 0]])
        assert torch.equal(view.gather_reprs(torch.tensor([4])), reprs[[4]])
        assert st.drop("a") == 3 and st.num_slabs == 3  # slab 0 still holds b's slot 3
        assert st.drop("b") == 7 and st.num_units == 0 and st.num_slabs == 0 and st.nbytes == 0
        assert st.drop("b") == 0 and st.requests() == []
        if path is not None:
            assert os.listdir(path) == []  # the files go with their slabs
        assert st.allocate("c", [1]) == [0]  # a fresh slab reuses the lowest slots
        st.drop("c")
        assert st.units_offloaded_total == 11


def test_store_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="is not a directory; create it"):
        UnitStore(1, 1, 4, 8, 1, torch.float32, path=tmp_path / "missing")
    cfg = InfLLMConfig.paper(n_init=0, n_local=16, block_size=4, chunk=4, topk=1)
    st = UnitStore(1, 1, 4, 8, 1, torch.float32)
    plan = plan_step([0, 1], [40], cfg)
    mem = LayerMemory.allocate(10, 1, 8, 4, torch.float32, "cpu")
    cos, sin = rope_table(8, 64)
    with pytest.raises(ValueError, match="must be shaped as the block table"):
        infllm_forward(torch.randn(1, 1, 8), torch.zeros(10, 1, 4, 16), torch.arange(10)[None].int(), plan, mem,
                       cos, sin, cfg, 1.0, torch.empty(1, 1, 8), store=st.view(0, st.slot_table([0], 5)))


@pytest.mark.slow
def test_decode_at_a_million_tokens_reads_the_store(cpu_kernel):
    """The ops at 1M tokens with 8K units in the store and a pool of only init + the blocks not
    yet offloadable: decode steps give bitwise the outputs of a pool that holds everything."""
    cfg = InfLLMConfig.paper(n_init=128, n_local=1024, block_size=128, topk=4, chunk=512)
    Hq, Hkv, D, B, dtype = 2, 1, 64, 128, torch.bfloat16
    T = 1 << 20
    nblk = T // B + 1  # the decodes write into one more block
    g = torch.Generator().manual_seed(0)
    full = torch.empty(nblk, Hkv, B, 2 * D, dtype=dtype)
    for s in range(0, nblk, 1024):  # drawn in pieces: no fp32 copy of the whole cache
        full[s : s + 1024] = torch.randn(min(1024, nblk - s), Hkv, B, 2 * D, generator=g).to(dtype)
    mem = LayerMemory.allocate(nblk, Hq, D, B, dtype, "cpu", cfg.repr_rows(Hq, Hkv), cfg.chosen_shape(Hkv))
    mem.reprs.copy_(torch.randn(mem.reprs.shape, generator=g).to(dtype))
    mem.sealed.fill_(True)  # a prefill sealed every unit that became a candidate
    L = T - 2  # the prompt; three tokens are then decoded at positions L, L+1, L+2
    E = offloadable_units(L, L, cfg)
    assert E > 8000
    store = UnitStore(1, Hkv, B, D, Hq, dtype, slab_units=512)
    logical = list(range(cfg.init_blocks, cfg.init_blocks + E))
    store.write(0, store.allocate("r", logical), full, mem.reprs, logical)
    # The small pool: init blocks and every block from unit E on; the table sends the
    # offloaded units to one block of poison (another request's page).
    resident = [b for b in range(nblk) if not cfg.init_blocks <= b < cfg.init_blocks + E]
    small = torch.full((len(resident) + 1, Hkv, B, 2 * D), POISON_KV, dtype=dtype)
    small[: len(resident)] = full[resident]
    small_mem = LayerMemory.allocate(len(resident) + 1, Hq, D, B, dtype, "cpu", cfg.repr_rows(Hq, Hkv),
                                     cfg.chosen_shape(Hkv))
    small_mem.reprs.fill_(float("nan"))
    small_mem.chosen[-1] = POISON_CHOSEN
    small_mem.reprs[: len(resident)] = mem.reprs[resident]
    small_mem.sealed[: len(resident)] = True
    where = torch.full((nblk,), len(resident), dtype=torch.int32)
    where[resident] = torch.arange(len(resident), dtype=torch.int32)
    full_table, small_table = torch.arange(nblk, dtype=torch.int32)[None], where[None]
    slots = store.slot_table(["r"], nblk)
    assert small.shape[0] < nblk // 100  # the pool holds ~1% of the context
    cos, sin = rope_table(D, T + 8)
    for step in range(3):
        n = L + step  # decodes at positions ~1M
        plan = plan_step([0, 1], [n + 1], cfg, prompt_lens=[L])
        q = torch.randn(1, Hq, D, generator=g).to(dtype)
        outs = []
        for kv, table, memory, view in ((full, full_table, mem, None),
                                        (small, small_table, small_mem, store.view(0, slots))):
            out = torch.empty(1, Hq, D, dtype=dtype)
            infllm_forward(q, kv, table, plan, memory, cos, sin, cfg, D**-0.5, out, store=view)
            outs.append(out)
        assert torch.isfinite(outs[0]).all()
        assert torch.equal(outs[0], outs[1]), f"decode at {n}: the store gives other outputs"
    # nothing sealed the poison block nor stored a selection in it
    assert small_mem.reprs[-1].isnan().all() and not small_mem.sealed[-1]
    assert (small_mem.chosen[-1] == POISON_CHOSEN).all()
    assert store.drop("r") == E and store.nbytes == 0


def test_the_triton_path_refuses_a_store_with_the_fix():
    """The CUDA ops cannot read a host store yet: a store given to them is an error naming the
    fix, before any kernel launches (not a silent read of stale pool blocks)."""
    triton_ops = pytest.importorskip("vllm_infllm.core.ops.triton_ops", reason="needs Triton")
    store = UnitStore(1, 1, 4, 8, 1, torch.float32).view(0, torch.full((1, 1), -1, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="leave 'offload' out of the infllm config on CUDA"):
        triton_ops.select_units(None, None, None, None, None, None, InfLLMConfig.paper(), 1, store=store)
    with pytest.raises(NotImplementedError, match="read by the CPU ops only"):
        triton_ops.attend(None, None, None, None, None, None, None, None, InfLLMConfig.paper(), 1.0, None, store=store)
