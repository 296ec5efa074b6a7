"""The native CPU kernels (csrc/cpu) op by op against the torch ops, and how the CPU path picks
them (VLLM_INFLLM_CPU_KERNEL). The whole runtime on the native kernels against the oracle is in
test_paged.py (every test there runs on both)."""

import dataclasses
import logging

import pytest
import torch

from vllm_infllm.core import ops as ops_pkg
from vllm_infllm.core.config import InfLLMConfig
from vllm_infllm.core.ops import native, native_ops, torch_ops
from vllm_infllm.core.plan import LayerMemory, plan_step
from vllm_infllm.core.rope import rope_table
from vllm_infllm.testing import paged_state

CFG = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=3, repr_topk=3, chunk=32)
# A wave mixing a prefill chunk deep in the sequence (init + selected units + remainder + local),
# decodes well past the window, and a short prefill inside the dense regime; then a decode wave.
# With query tiles of 16, the 27 queries make a full tile and a padded one for the tiled prefill
# kernel (items of at least W/2 queries), the 7 (AVX-512) and the decodes run the per-row kernel.
QUERY_LENS, SEQ_LENS = [27, 1, 1, 7], [224, 200, 150, 20]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def waves(cfg=CFG):
    qsl = [0]
    for n in QUERY_LENS:
        qsl.append(qsl[-1] + n)
    return plan_step(qsl, SEQ_LENS, cfg).waves + plan_step([0, 1, 2], SEQ_LENS[1:3], cfg).waves


def packed_memory(mem: LayerMemory, Hkv: int, dtype) -> tuple[LayerMemory, torch.Tensor]:
    """The same side state as strided views into KV pages, as the vLLM adapter lays it out
    (adapter/side_state.py imports no vLLM), and the pages' K/V slots."""
    from vllm_infllm.adapter.side_state import SideStateLayout, side_state_views

    Hq, B = mem.scores.shape[1], mem.scores.shape[2]
    rows, D = mem.reprs.shape[1], mem.reprs.shape[2]
    extra = SideStateLayout(Hq, D, B, dtype, rows).num_extra_slots()
    pages = torch.randn(mem.scores.shape[0], Hkv + extra, B, 2 * D).to(dtype)
    scores, reprs, sealed, _ = side_state_views(pages, Hkv, Hq, D, rows)
    scores.copy_(mem.scores)
    reprs.copy_(mem.reprs)
    sealed.copy_(mem.sealed)
    assert scores.stride(0) > scores[0].numel()  # really strided
    return LayerMemory(reprs=reprs, scores=scores, sealed=sealed.view(torch.bool)), pages


def run_both(Hq, Hkv, D, dtype, cfg, softcap=0.0, sinks=False, packed=False, seed=0):
    """Every wave through torch_ops.attend and native_ops.attend on the same state; returns the
    largest differences (outputs, scores) and how much the scores moved."""
    st = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg, device="cpu", seed=seed)
    kv, table, mem = st.kv_cache, st.block_table, st.memory
    nat = mem.clone()
    if packed:
        nat, pages = packed_memory(mem, Hkv, dtype)
        pages[:, :Hkv] = kv
        kv = pages[:, :Hkv]  # K/V with the page stride, as the adapter passes them
    cos, sin = rope_table(D, 1024)
    g = torch.Generator().manual_seed(seed + 4)
    T = sum(QUERY_LENS)
    query = (torch.randn(T, Hq, D, generator=g) * 2).to(dtype)
    sink = torch.randn(Hq, generator=g) + 1 if sinks else None
    ref, start = mem.clone(), mem.scores.clone()
    for wave in waves(cfg):
        selected = torch_ops.select_units(query, ref, table, wave, cos, sin, cfg, Hkv)
        o_ref = torch.zeros(T, Hq, D, dtype=dtype)
        o_nat = torch.full((T, Hq, D), float("nan"), dtype=dtype)
        torch_ops.attend(query, kv, ref, table, wave, selected, cos, sin, cfg, D**-0.5, o_ref, softcap=softcap,
                         sinks=sink)
        native_ops.attend(query, kv, nat, table, wave, selected, cos, sin, cfg, D**-0.5, o_nat, softcap=softcap,
                          sinks=sink)
        rows = torch.cat([torch.arange(q0, q0 + n) for q0, n in zip(wave.host["q0"], wave.host["length"],
                                                                    strict=True)])
        torch.testing.assert_close(o_nat[rows].float(), o_ref[rows].float(), **TOL[dtype])
        others = torch.ones(T, dtype=torch.bool)
        others[rows] = False
        assert o_nat[others].isnan().all()  # rows of other waves are not written
        torch.testing.assert_close(nat.scores, ref.scores, **TOL[torch.float32])
    return (ref.scores - start).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 64), (9, 3, 64), (7, 1, 128), (8, 1, 256), (16, 2, 128), (6, 3, 48)])
def test_attend_matches_torch_ops(Hq, Hkv, D, dtype):
    """D 48: no vector micro-kernel for it (64, 128, 256 have one), the portable loop runs."""
    moved = run_both(Hq, Hkv, D, dtype, CFG)
    assert moved > 0.1  # the local keys' mass really was accumulated


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("modes", [{}, {"positions": "ordered", "selection": "kv_head"}])
def test_attend_threads_and_split_decode(threads, modes, monkeypatch):
    """With fewer work items than twice the threads, each item's key blocks are split among
    up to 8 parts whose softmaxes are merged (sinks counted once): same result."""
    monkeypatch.setattr(native_ops, "cpu_threads", lambda: threads)
    cfg = dataclasses.replace(CFG, **modes)
    run_both(4, 1, 64, torch.float32, cfg, sinks=True, seed=5)


@pytest.mark.parametrize("modes", [
    {"selection": "kv_head"}, {"positions": "ordered"}, {"positions": "ordered", "selection": "kv_head"},
    {"unit_score": "minmax"}, {"unit_score": "max_topk", "contiguity": 1}, {"topk": 0},
    {"chunking": "step", "select_queries": 4}, {"n_init": 0}])
def test_attend_modes(modes):
    cfg = dataclasses.replace(CFG, **modes)
    moved = run_both(6, 2, 64, torch.float32, cfg, seed=1)
    assert (moved > 0.1) == cfg.accumulates_scores  # minmax and topk 0 keep no scores


@pytest.mark.parametrize("softcap,sinks,dtype", [(2.0, False, torch.float32), (0.0, True, torch.float32),
                                                 (3.0, True, torch.bfloat16)])
def test_attend_softcap_and_sinks(softcap, sinks, dtype):
    run_both(4, 2, 64, dtype, CFG, softcap=softcap, sinks=sinks, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_on_adapter_pages(dtype):
    """K/V and side state as strided views of vLLM pages (page stride, scores inside the page)."""
    run_both(6, 2, 64, dtype, CFG, packed=True, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("modes", [{}, {"unit_score": "minmax"}, {"unit_score": "max_topk"}])
@pytest.mark.parametrize("packed", [False, True])
def test_seal_units_matches_torch_ops(modes, dtype, packed):
    """Representatives of every newly sealable unit (stale random scores pick the tokens)."""
    cfg = dataclasses.replace(CFG, **modes)
    Hq, Hkv, D = 6, 2, 64
    st = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg, device="cpu", seed=6)
    st.memory.sealed.fill_(False)
    cos, sin = rope_table(D, 1024)
    ref = st.memory.clone()
    nat = packed_memory(st.memory, Hkv, dtype)[0] if packed else st.memory.clone()
    for wave in waves(cfg):
        torch_ops.seal_units(st.kv_cache, ref, st.block_table, wave, cos, sin, cfg)
        native_ops.seal_units(st.kv_cache, nat, st.block_table, wave, cos, sin, cfg)
    assert ref.sealed.sum() >= 10 and torch.equal(nat.sealed, ref.sealed)
    torch.testing.assert_close(nat.reprs.float(), ref.reprs.float(), **TOL[dtype])
    assert (ref.reprs.float() - st.memory.reprs.float()).abs().max() > 0.1  # something was sealed


@pytest.mark.parametrize("modes", [
    {}, {"selection": "kv_head"}, {"unit_score": "minmax"}, {"unit_score": "minmax", "selection": "kv_head"},
    {"unit_score": "max_topk"}, {"contiguity": 1}, {"contiguity": 2, "selection": "kv_head"},
    {"chunking": "step"}, {"chunking": "step", "select_queries": 5},
    {"unit_score": "sketch"}, {"unit_score": "sketch", "selection": "kv_head", "contiguity": 1}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_select_units_matches_torch_ops(modes, dtype):
    """The same units for every chunk and selection group (ascending, then -1)."""
    cfg = dataclasses.replace(CFG, **modes)
    Hq, Hkv, D = 6, 3, 64
    st = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg, device="cpu", seed=7)
    cos, sin = rope_table(D, 1024)
    query = torch.randn(sum(QUERY_LENS), Hq, D, generator=torch.Generator().manual_seed(8)).to(dtype)
    chosen = differ = 0
    for wave in waves(cfg):
        a = torch_ops.select_units(query, st.memory, st.block_table, wave, cos, sin, cfg, Hkv)
        b = native_ops.select_units(query, st.memory, st.block_table, wave, cos, sin, cfg, Hkv)
        assert a.shape == b.shape == (wave.n, cfg.selection_groups(Hkv), cfg.topk)
        assert torch.equal(a, b), (a, b)
        chosen += int((a >= 0).sum())
        differ += sum(len({tuple(r) for r in g}) > 1 for g in a.tolist())
    assert chosen >= 4 * cfg.topk
    assert (differ > 0) == (cfg.selection == "kv_head")


@pytest.mark.parametrize("B,dtype", [(12, torch.float32), (12, torch.float16), (16, torch.float32)])
def test_select_units_sketch_odd_unit_size_and_nan_box(B, dtype):
    """unit_score="sketch" with units of 12 keys, which the vector path cannot tile whole (one
    8-key tile and 4 keys left with AVX2, all 12 left with AVX-512), and of 16 (whole tiles
    only): the torch op's units; and a NaN in a unit's box (so in every sketched key of that
    channel) ranks the unit first on both paths, as a broken key must show (with 16 keys the
    vector path's lane-wise max must keep it)."""
    cfg = InfLLMConfig(n_init=2 * B, n_local=4 * B, block_size=B, topk=3, chunk=2 * B)
    assert cfg.unit_score == "sketch"
    Hq, Hkv, D = 6, 2, 64  # block_size * Hkv a multiple of 8: the codes fill whole fp32 rows
    st = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg, device="cpu", seed=11)
    cos, sin = rope_table(D, 1024)
    query = torch.randn(sum(QUERY_LENS), Hq, D, generator=torch.Generator().manual_seed(12)).to(dtype)
    chosen = 0
    for wave in waves(cfg):
        a = torch_ops.select_units(query, st.memory, st.block_table, wave, cos, sin, cfg, Hkv)
        b = native_ops.select_units(query, st.memory, st.block_table, wave, cos, sin, cfg, Hkv)
        assert torch.equal(a, b), (a, b)
        chosen += int((a >= 0).sum())
    assert chosen >= 4 * cfg.topk
    wave = waves(cfg)[0]
    assert wave.host["num_cand"][0] > cfg.topk
    clean = torch_ops.select_units(query, st.memory, st.block_table, wave, cos, sin, cfg, Hkv)[0, 0].tolist()
    unit = min(set(range(wave.host["num_cand"][0])) - set(clean))
    st.memory.reprs[st.block_table[0, cfg.init_blocks + unit], 3, 5] = float("nan")  # KV head 1's max
    for op in (torch_ops, native_ops):
        got = op.select_units(query, st.memory, st.block_table, wave, cos, sin, cfg, Hkv)
        assert unit in got[0, 0].tolist(), op.__name__


@pytest.mark.parametrize("modes", [
    {}, {"selection": "kv_head"}, {"contiguity": 1}, {"chunking": "step", "select_queries": 5}])
@pytest.mark.parametrize("dtype,packed", [(torch.float32, False), (torch.float16, False), (torch.bfloat16, True)])
def test_select_units_exact_matches_torch_ops(modes, dtype, packed):
    """The exact score's units (unit_score="exact", retrieval_layer) as the torch op picks them,
    from keys read in place (with the page stride the adapter's K/V views have: `packed`); a
    unit holding a NaN key ranks first on both paths."""
    cfg = dataclasses.replace(CFG, unit_score="exact", **modes)
    Hq, Hkv, D = 6, 3, 64
    st = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg, device="cpu", seed=9)
    kv = st.kv_cache
    if packed:  # K/V as a strided view of wider pages
        pages = torch.randn(kv.shape[0], Hkv + 2, *kv.shape[2:]).to(dtype)
        pages[:, :Hkv] = kv
        kv = pages[:, :Hkv]
    cos, sin = rope_table(D, 1024)
    query = torch.randn(sum(QUERY_LENS), Hq, D, generator=torch.Generator().manual_seed(10)).to(dtype)
    chosen = 0
    for wave in waves(cfg):
        a = torch_ops.select_units_exact(query, kv, st.block_table, wave, cos, sin, cfg, Hkv)
        b = native_ops.select_units_exact(query, kv, st.block_table, wave, cos, sin, cfg, Hkv)
        assert a.shape == b.shape == (wave.n, cfg.selection_groups(Hkv), cfg.topk)
        assert torch.equal(a, b), (a, b)
        chosen += int((a >= 0).sum())
    assert chosen >= 4 * cfg.topk
    # A NaN key of KV head 1 in a unit the clean scores leave out, in request 0 (a deep prefill
    # chunk with more candidates than topk): every group KV head 1 scores in picks it.
    wave = waves(cfg)[0]
    assert wave.host["num_cand"][0] > cfg.topk
    group = 1 if cfg.selection == "kv_head" else 0
    clean = torch_ops.select_units_exact(query, kv, st.block_table, wave, cos, sin, cfg, Hkv)[0, group].tolist()
    unit = min(set(range(wave.host["num_cand"][0])) - set(clean))
    kv[st.block_table[0, cfg.init_blocks + unit], 1, 5, 3] = float("nan")
    for op in (torch_ops, native_ops):
        got = op.select_units_exact(query, kv, st.block_table, wave, cos, sin, cfg, Hkv)
        assert unit in got[0, group].tolist(), op.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_torch_ops(dtype):
    """Strided key/value views, padding slots, a block started afresh (its scores and sealed
    flag reset), on the adapter's page layout."""
    g = torch.Generator().manual_seed(1)
    Hq, Hkv, D, B = 4, 2, 64, 16
    st = paged_state(Hq, Hkv, D, [60, 40], dtype, CFG, device="cpu", seed=9)
    st.memory.sealed.fill_(True)
    qkv = torch.randn(7, 3, Hkv, D, generator=g).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([5 * B + 3, -1, 2 * B, 2 * B + 1, -1, 4 * B, 1 * B + 15])
    ref_kv, ref_mem = st.kv_cache.clone(), st.memory.clone()
    torch_ops.write_kv(ref_kv, key, value, slots, ref_mem)
    mem, pages = packed_memory(st.memory, Hkv, dtype)
    pages[:, :Hkv] = st.kv_cache
    native_ops.write_kv(pages[:, :Hkv], key, value, slots, mem)
    assert torch.equal(pages[:, :Hkv], ref_kv)
    assert torch.equal(mem.scores, ref_mem.scores) and torch.equal(mem.sealed, ref_mem.sealed)
    assert not ref_mem.sealed[2] and not ref_mem.sealed[4] and ref_mem.sealed[5]


def test_hold_selections_matches_torch_ops():
    """chunking="aligned" across steps: a prompt cut into pieces that start inside chunks."""
    cfg = dataclasses.replace(CFG, chunking="aligned")
    Hq, Hkv, D = 4, 2, 64
    st = paged_state(Hq, Hkv, D, [224, 200], torch.float32, cfg, device="cpu", seed=10)
    assert st.memory.chosen is not None
    cos, sin = rope_table(D, 1024)
    query = torch.randn(64, Hq, D, generator=torch.Generator().manual_seed(2))
    ref = st.memory.clone()
    held = 0
    # step 1: positions 96..143 of request 0 (chunks [96, 128) and [128, 160) start fresh),
    # request 1 decodes; step 2: positions 144..160 continue the chunk at 128
    for qsl, seqs in (([0, 48, 49], [144, 200]), ([0, 17, 18], [161, 201])):
        for wave in plan_step(qsl, seqs, cfg, prompt_lens=[224, 150]).waves:
            sel = torch_ops.select_units(query, ref, st.block_table, wave, cos, sin, cfg, Hkv)
            a = torch_ops.hold_selections(sel.clone(), ref, st.block_table, wave, cfg)
            b = native_ops.hold_selections(sel.clone(), st.memory, st.block_table, wave, cfg)
            assert torch.equal(a, b)
            held += int((wave.a0 < wave.c0).sum())
    assert torch.equal(st.memory.chosen, ref.chosen) and held >= 1


def test_kernel_choice_by_env(monkeypatch, caplog):
    monkeypatch.setenv(native.ENV, "torch")
    assert ops_pkg.for_device("cpu") is torch_ops
    monkeypatch.setenv(native.ENV, "native")
    assert ops_pkg.for_device("cpu") is native_ops
    monkeypatch.setenv(native.ENV, "fast")
    with pytest.raises(ValueError, match="VLLM_INFLLM_CPU_KERNEL='fast' is not one of auto, native, torch"):
        ops_pkg.for_device("cpu")


def test_unbuildable_kernels_fail_loudly_or_warn_once(monkeypatch, caplog, tmp_path):
    """No compiler: `native` is an error that names the fix; `auto` logs the reason once and
    runs the torch ops (never silently)."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(ops_pkg, "_cpu_choice", None)  # for_device's cached decision
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VLLM_INFLLM_BUILD_DIR", str(tmp_path / "build"))
    native._march_native.cache_clear()
    try:
        monkeypatch.setenv(native.ENV, "native")
        with pytest.raises(native.NativeUnavailable, match="C\\+\\+17 compiler .*no-such-compiler.*"
                                                           "VLLM_INFLLM_CPU_KERNEL=torch"):
            ops_pkg.for_device("cpu")
        monkeypatch.setenv(native.ENV, "auto")
        ops_pkg._cpu_choice = None
        with caplog.at_level(logging.WARNING, logger="vllm.infllm"):
            assert ops_pkg.for_device("cpu") is torch_ops
            assert ops_pkg.for_device("cpu") is torch_ops
        warnings = [r for r in caplog.records if "using the torch CPU ops" in r.getMessage()]
        assert len(warnings) == 1 and "no-such-compiler" in warnings[0].getMessage()
    finally:
        native._march_native.cache_clear()


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and f" {flag}" in line for line in f)
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_kernels_built_for_other_machines_match_torch_ops(isa, monkeypatch):
    """The kernels as other machines build them, compiled for real (about 45 s each) and run
    through the same comparisons: AVX2 + FMA without AVX-512 (8-lane micro-kernels, tiled prefill
    from 4 queries) and no vector ISA at all (the portable loops, as on an ARM server). The
    build here otherwise only ever compiles the one path this CPU selects."""
    if isa == "avx2" and not (_cpu_has("avx2") and _cpu_has("fma")):
        pytest.skip("this CPU cannot run AVX2 + FMA code")
    arch = {"avx2": ["-mavx2", "-mfma"], "portable": []}[isa]
    flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", *arch]
    monkeypatch.setattr(native, "cflags", lambda: flags)
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failure", None)
    mod = native.load()  # (torch appends _v1 to a name it has tried to build before in this process)
    assert native._key() in mod.__name__, (mod.__name__, flags)  # built with these flags, not the default
    for Hq, Hkv, D, dtype in [(9, 3, 64, torch.float32), (8, 1, 256, torch.bfloat16), (6, 3, 48, torch.float32)]:
        assert run_both(Hq, Hkv, D, dtype, CFG) > 0.1
    for modes in [{"positions": "ordered", "selection": "kv_head"}, {"unit_score": "minmax"}]:
        run_both(6, 2, 64, torch.float32, dataclasses.replace(CFG, **modes), seed=1)
    run_both(4, 2, 64, torch.float32, CFG, softcap=2.0, sinks=True, seed=2)
    test_seal_units_matches_torch_ops({"unit_score": "max_topk"}, torch.float32, True)
    test_select_units_matches_torch_ops({}, torch.float32)
    test_select_units_matches_torch_ops({"unit_score": "sketch"}, torch.float32)  # the sketch's vector path
    test_select_units_sketch_odd_unit_size_and_nan_box(12, torch.float32)
    test_select_units_sketch_odd_unit_size_and_nan_box(16, torch.float32)
