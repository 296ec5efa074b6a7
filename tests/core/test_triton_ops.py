"""Triton ops against the torch ops (op by op) and the whole runtime against the oracle.

On a machine without a GPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be
set when the kernels are *decorated*, so it is set only around the import of triton_ops and
restored afterwards (nothing else in the pytest process sees it). The interpreter's bf16
arithmetic is wrong upstream: we test fp32 and fp16. Shapes are small: the interpreter is slow.
"""

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# Without a GPU the kernels need the interpreter, and so do triton's own @jit helpers (tl.sum's
# combine function, ...), which are decorated when triton is first imported. If something in this
# process imported triton before us without TRITON_INTERPRET, rerun this file in a subprocess.
IN_PROCESS = ON_GPU or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"


def _import_triton_ops():
    if ON_GPU:
        return importlib.import_module("vllm_infllm.core.ops.triton_ops")
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when kernels are decorated, not when they run
    try:
        return importlib.import_module("vllm_infllm.core.ops.triton_ops")
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


triton_ops = _import_triton_ops() if IN_PROCESS else None
in_process = pytest.mark.skipif(not IN_PROCESS, reason="run by test_triton_ops_in_subprocess")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while kernels run (lazy imports)."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def whole_runs(monkeypatch):
    """For the tests that run the whole runtime over many steps: the interpreter without its
    int32 overflow check. By default it checks every int32 add, sub and mul of a kernel (in
    int64, then a device assert), which takes a third of these tests' time; the op-by-op tests in
    this file run each kernel with the check on. (A compiled kernel drops those asserts unless
    Triton's debug mode is on.)"""
    if not ON_GPU:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, sanitize_overflow=False))


if not IN_PROCESS:  # the checks below cannot run here: run this file again in a subprocess

    def test_triton_ops_in_subprocess():
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
        assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]

from vllm_infllm import testing  # noqa: E402
from vllm_infllm.core.config import InfLLMConfig  # noqa: E402
from vllm_infllm.core.ops import torch_ops  # noqa: E402
from vllm_infllm.core.plan import LayerMemory, plan_step  # noqa: E402
from vllm_infllm.core.rope import RopeLayout, rope_table  # noqa: E402
from vllm_infllm.testing import make_request, run_oracle, run_paged  # noqa: E402

CFG = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=3, repr_topk=3, chunk=32)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


def paged_state(Hq, Hkv, D, seq_lens, dtype, cfg=CFG, seed=0):
    """A random paged cache (random block tables), memory with stale random state, a rope table."""
    st = testing.paged_state(Hq, Hkv, D, seq_lens, dtype, cfg, device=DEVICE, seed=seed)
    cos, sin = rope_table(D, 1024, device=DEVICE)
    return (st.kv_cache, st.block_table, cos, sin), st.memory


# A wave mixing a prefill chunk deep in the sequence (init + selected units + remainder + local),
# a decode well past the window, and a short prefill inside the dense regime.
QUERY_LENS, SEQ_LENS = [32, 1, 1, 7], [224, 200, 150, 20]


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv(dtype):
    g = torch.Generator().manual_seed(1)
    nb, Hkv, Hq, B, D = 6, 2, 4, 16, 32
    base = torch.randn(nb, B, Hkv, 2 * D, generator=g).to(dtype)
    kv = base.transpose(1, 2)  # a non-contiguous view, as a backend may hand us
    qkv = torch.randn(7, 3, Hkv, D, generator=g)
    key, value = qkv[:, 1], qkv[:, 2]  # strided views too
    slots = torch.tensor([5 * B + 3, -1, 2 * B, 2 * B + 1, -1, 4 * B, 1 * B + 15])  # 7 rows
    mem = LayerMemory.allocate(nb, Hq, D, B, dtype, "cpu")
    mem.scores.copy_(torch.rand(mem.scores.shape, generator=g))
    mem.sealed.fill_(True)
    expect_kv, expect_mem = kv.clone(), mem.clone()
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        expect_kv[s // B, :, s % B, :D] = key[t].to(dtype)
        expect_kv[s // B, :, s % B, D:] = value[t].to(dtype)
        if s % B == 0:
            expect_mem.scores[s // B] = 0
            expect_mem.sealed[s // B] = False
    # On a GPU the kernel needs device tensors (same strides: the non-contiguous views stay so).
    base, qkv, slots = base.to(DEVICE), qkv.to(DEVICE), slots.to(DEVICE)
    kv, key, value = base.transpose(1, 2), qkv[:, 1], qkv[:, 2]
    mem = LayerMemory(mem.reprs.to(DEVICE), mem.scores.to(DEVICE), mem.sealed.to(DEVICE))
    expect_kv = expect_kv.to(DEVICE)
    expect_mem = LayerMemory(*(t.to(DEVICE) for t in (expect_mem.reprs, expect_mem.scores, expect_mem.sealed)))
    triton_ops.write_kv(kv, key, value, slots, mem)
    torch.testing.assert_close(base.transpose(1, 2), expect_kv, rtol=0, atol=0)
    torch.testing.assert_close(mem.scores, expect_mem.scores, rtol=0, atol=0)
    assert torch.equal(mem.sealed, expect_mem.sealed)
    assert mem.sealed.tolist() == [True, True, False, True, False, True]


def _plan(device=DEVICE):
    qsl = [0]
    for n in QUERY_LENS:
        qsl.append(qsl[-1] + n)
    plan = plan_step(qsl, SEQ_LENS, CFG, device=device)
    # ... plus a decode-only wave (the two decodes alone), which may take the split path
    return plan.waves + plan_step([0, 1, 2], SEQ_LENS[1:3], CFG, device=device).waves


@in_process
@pytest.mark.parametrize("Hq,Hkv,D,unit_score", [(4, 2, 32, "mean_topk"), (3, 1, 64, "mean_topk"),
                                                (4, 2, 32, "minmax"), (3, 1, 64, "minmax"),
                                                (4, 2, 32, "max_topk"), (3, 1, 64, "max_topk")])
def test_seal_units(Hq, Hkv, D, unit_score, monkeypatch):
    monkeypatch.setattr(triton_ops, "SEAL_TOKENS", 8)  # minmax: two tiles per 16-token unit
    cfg = dataclasses.replace(CFG, unit_score=unit_score)
    (kv, table, cos, sin), mem = paged_state(Hq, Hkv, D, SEQ_LENS, torch.float32, cfg)
    assert mem.reprs.shape[1] == cfg.repr_rows(Hq, Hkv)
    ref = mem.clone()
    for wave in _plan():
        torch_ops.seal_units(kv, ref, table, wave, cos, sin, cfg)
        triton_ops.seal_units(kv, mem, table, wave, cos, sin, cfg)
    assert torch.equal(mem.sealed, ref.sealed)
    assert ref.sealed.sum() > 5
    torch.testing.assert_close(mem.reprs, ref.reprs, rtol=1e-5, atol=1e-5)


def assert_codes_match(got: torch.Tensor, want: torch.Tensor, Hkv: int) -> None:
    """unit_score="sketch": the 4-bit codes in reprs rows [m, R, D] as the torch op's; on a GPU a
    channel on a level's midpoint may round the other way (the rotation's fused multiply-adds)."""
    codes, ref = (torch_ops._sketch_bytes(r, Hkv).to(torch.int16) for r in (got, want))
    for nibble in (lambda x: x & 15, lambda x: x >> 4):
        assert int((nibble(codes) - nibble(ref)).abs().max()) <= 1
    assert float((codes == ref).float().mean()) > 0.999
    if not ON_GPU:  # the interpreter rounds as torch does
        assert torch.equal(codes, ref)


@in_process
@pytest.mark.parametrize("Hq,Hkv,D,dtype", [(4, 2, 32, torch.float32), (3, 1, 64, torch.float16)])
def test_seal_units_sketch(Hq, Hkv, D, dtype, monkeypatch):
    """unit_score="sketch": the box as minmax stores it, and each raw key's 4-bit codes as the
    torch op packs them."""
    monkeypatch.setattr(triton_ops, "SEAL_TOKENS", 8)  # two tiles per 16-token unit, both passes
    cfg = dataclasses.replace(CFG, unit_score="sketch")
    (kv, table, cos, sin), mem = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg)
    assert mem.reprs.shape[1] == 2 * Hkv + CFG.block_size * Hkv * D // 2 // (D * dtype.itemsize)
    ref = mem.clone()
    for wave in _plan():
        torch_ops.seal_units(kv, ref, table, wave, cos, sin, cfg)
        triton_ops.seal_units(kv, mem, table, wave, cos, sin, cfg)
    assert torch.equal(mem.sealed, ref.sealed)
    sealed = ref.sealed.nonzero().squeeze(1)
    assert len(sealed) > 5
    torch.testing.assert_close(mem.reprs[:, : 2 * Hkv], ref.reprs[:, : 2 * Hkv], **TOL[dtype])
    assert_codes_match(mem.reprs[sealed], ref.reprs[sealed], Hkv)
    unsealed = (~ref.sealed).nonzero().squeeze(1)  # untouched: the stale state is still there
    assert torch.equal(mem.reprs[unsealed].view(torch.uint8), ref.reprs[unsealed].view(torch.uint8))


@in_process
@pytest.mark.parametrize("selection,unit_score,extra", [
    ("layer", "mean_topk", {}), ("kv_head", "mean_topk", {}), ("layer", "minmax", {}),
    ("kv_head", "minmax", {}), ("layer", "mean_topk", {"contiguity": 1}),
    ("kv_head", "minmax", {"contiguity": 2, "select_queries": 5, "chunking": "step"}),
    ("layer", "minmax", {"select_queries": 3, "chunking": "step"}),
    ("layer", "mean_topk", {"chunking": "aligned"}), ("layer", "max_topk", {}),
    ("kv_head", "max_topk", {"contiguity": 1}), ("layer", "sketch", {}),
    ("kv_head", "sketch", {"contiguity": 1})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_select_units(dtype, selection, unit_score, extra):
    """extra: contiguity (neighbours ranked in), select_queries (q̄ of the chunk's last queries)."""
    Hq, Hkv, D = 6, 3, 32
    cfg = dataclasses.replace(CFG, selection=selection, unit_score=unit_score, **extra)
    (kv, table, cos, sin), mem = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg)
    g = torch.Generator().manual_seed(3)
    query = torch.randn(sum(QUERY_LENS), Hq, D, generator=g).to(dtype=dtype, device=DEVICE)
    checked = differ = 0
    for wave in _plan():
        a = torch_ops.select_units(query, mem, table, wave, cos, sin, cfg, Hkv)
        b = triton_ops.select_units(query, mem, table, wave, cos, sin, cfg, Hkv)
        assert a.shape == b.shape == (wave.n, cfg.selection_groups(Hkv), cfg.topk)
        for ga, gb in zip(a.tolist(), b.tolist(), strict=True):
            differ += len({tuple(sorted(r)) for r in ga}) > 1
            for ra, rb in zip(ga, gb, strict=True):
                valid = sorted(u for u in rb if u >= 0)
                assert ra == rb == valid + [-1] * (len(rb) - len(valid))  # ascending, then -1
                checked += sum(u >= 0 for u in ra)
    assert checked >= 2 * cfg.topk
    assert (differ > 0) == (selection == "kv_head")  # KV heads did choose differently


@in_process
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("Hq,Hkv,D,dtype,selection,positions", [
    (4, 2, 32, torch.float32, "layer", "fixed"), (3, 1, 64, torch.float32, "layer", "fixed"),
    (4, 2, 32, torch.float16, "layer", "fixed"), (6, 3, 32, torch.float32, "kv_head", "fixed"),
    (4, 2, 32, torch.float32, "layer", "ordered"), (6, 3, 32, torch.float16, "kv_head", "ordered")])
def test_attend(Hq, Hkv, D, dtype, selection, positions, splits, monkeypatch):
    """splits > 1: decode waves take the flash-decoding path (split keys, merge, split scores).
    selection="kv_head": each KV head reads its own units; positions="ordered": global blocks
    move forward by whole blocks."""
    cfg = dataclasses.replace(CFG, selection=selection, positions=positions)
    monkeypatch.setattr(triton_ops, "DECODE_SPLITS", splits)
    monkeypatch.setattr(triton_ops, "BLOCK_N", 16 if splits > 1 else 64)  # several tiles per split
    (kv, table, cos, sin), mem = paged_state(Hq, Hkv, D, SEQ_LENS, dtype)
    g = torch.Generator().manual_seed(4)
    T = sum(QUERY_LENS)
    query = torch.randn(T, Hq, D, generator=g).to(dtype=dtype, device=DEVICE)
    ref = mem.clone()
    for wave in _plan():
        selected = torch_ops.select_units(query, ref, table, wave, cos, sin, cfg, Hkv)
        o_ref = torch.zeros(T, Hq, D, dtype=dtype, device=DEVICE)
        o_tri = torch.full((T, Hq, D), float("nan"), dtype=dtype, device=DEVICE)
        torch_ops.attend(query, kv, ref, table, wave, selected, cos, sin, cfg, D**-0.5, o_ref)
        triton_ops.attend(query, kv, mem, table, wave, selected, cos, sin, cfg, D**-0.5, o_tri)
        rows = torch.cat([torch.arange(q0, q0 + n) for q0, n in zip(wave.host["q0"], wave.host["length"], strict=True)])
        torch.testing.assert_close(o_tri[rows].float(), o_ref[rows].float(), **TOL[dtype])
        torch.testing.assert_close(mem.scores, ref.scores, **TOL[dtype])
    assert (ref.scores - paged_state(Hq, Hkv, D, SEQ_LENS, dtype)[1].scores).abs().max() > 0.1


@in_process
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("softcap,sinks,dtype", [(2.0, False, torch.float32), (0.0, True, torch.float32),
                                                 (3.0, True, torch.float16)])
def test_attend_softcap_and_sinks(softcap, sinks, dtype, splits, monkeypatch):
    """The models' softmax variants in every attend path (one program, split + merge, both score
    passes) against the torch ops; queries scaled so the cap bites and the sinks take mass."""
    monkeypatch.setattr(triton_ops, "DECODE_SPLITS", splits)
    monkeypatch.setattr(triton_ops, "BLOCK_N", 16 if splits > 1 else 64)
    Hq, Hkv, D = 4, 2, 32
    (kv, table, cos, sin), mem = paged_state(Hq, Hkv, D, SEQ_LENS, dtype)
    g = torch.Generator().manual_seed(9)
    T = sum(QUERY_LENS)
    query = (torch.randn(T, Hq, D, generator=g) * 3).to(dtype=dtype, device=DEVICE)
    sink = (torch.randn(Hq, generator=g) + 6).to(DEVICE) if sinks else None
    ref = mem.clone()
    for wave in _plan():
        selected = torch_ops.select_units(query, ref, table, wave, cos, sin, CFG, Hkv)
        o_ref = torch.zeros(T, Hq, D, dtype=dtype, device=DEVICE)
        o_tri = torch.full((T, Hq, D), float("nan"), dtype=dtype, device=DEVICE)
        plain = torch.zeros(T, Hq, D, dtype=dtype, device=DEVICE)
        torch_ops.attend(query, kv, ref.clone(), table, wave, selected, cos, sin, CFG, D**-0.5, plain)
        torch_ops.attend(query, kv, ref, table, wave, selected, cos, sin, CFG, D**-0.5, o_ref,
                         softcap=softcap, sinks=sink)
        triton_ops.attend(query, kv, mem, table, wave, selected, cos, sin, CFG, D**-0.5, o_tri,
                          softcap=softcap, sinks=sink)
        rows = torch.cat([torch.arange(q0, q0 + n) for q0, n in zip(wave.host["q0"], wave.host["length"], strict=True)])
        torch.testing.assert_close(o_tri[rows].float(), o_ref[rows].float(), **TOL[dtype])
        torch.testing.assert_close(mem.scores, ref.scores, **TOL[dtype])
        assert (o_ref[rows].float() - plain[rows].float()).abs().max() > 0.05  # the variant matters


@in_process
def test_attend_without_memory_scores():
    """topk = 0 (sliding window + sinks): no selection, scores untouched."""
    cfg = InfLLMConfig.paper(n_init=16, n_local=48, block_size=16, topk=0, repr_topk=2, chunk=16)
    Hq, Hkv, D = 4, 1, 32
    (kv, table, cos, sin), mem = paged_state(Hq, Hkv, D, [150, 90], torch.float32, cfg)
    query = torch.randn(17, Hq, D).to(DEVICE)
    plan = plan_step([0, 16, 17], [150, 90], cfg, device=DEVICE)
    before = mem.scores.clone()
    for wave in plan.waves:
        o_ref, o_tri = torch.zeros_like(query), torch.zeros_like(query)
        torch_ops.attend(query, kv, mem.clone(), table, wave, None, cos, sin, cfg, 0.2, o_ref)
        triton_ops.attend(query, kv, mem, table, wave, None, cos, sin, cfg, 0.2, o_tri)
        torch.testing.assert_close(o_tri, o_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(mem.scores, before)


@in_process
@pytest.mark.parametrize("splits", [1, 3])
def test_static_decode_plan_replays_like_eager(splits, monkeypatch, whole_runs):
    """A CUDA graph replays the launches of its capture; only buffer contents change. Emulated:
    the static decode plan of step A (padded batch, candidate bound, persistent table) is
    "captured"; step B's plan is then written into the same buffers and the ops are run again
    with step A's plan object (its launch sizes). Both steps must equal eager plan_step runs."""
    from vllm_infllm.core.plan import PlanBuffers, plan_decode_step
    from vllm_infllm.core.runtime import infllm_forward

    monkeypatch.setattr(triton_ops, "DECODE_SPLITS", splits)
    monkeypatch.setattr(triton_ops, "BLOCK_N", 16 if splits > 1 else 64)
    Hq, Hkv, D, dtype = 4, 2, 32, torch.float32
    seq_a, seq_b, pad = [200, 150, 90, 41], [201, 151, 91, 42], 3
    (kv, table, cos, sin), mem0 = paged_state(Hq, Hkv, D, seq_b, dtype)
    n = len(seq_a)
    query = torch.randn(n + pad, Hq, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    qsl_pad = list(range(n + 1)) + [n] * pad  # vLLM pads the batch with empty requests
    bound = 40  # candidates of the longest admitted sequence (> every step's own maximum)
    assert max(CFG.num_candidates(s - 1) for s in seq_b) < bound

    def eager(seq, mem):
        out = torch.zeros(n, Hq, D, device=DEVICE)
        infllm_forward(query[:n], kv, table, plan_step(list(range(n + 1)), seq, CFG), mem, cos, sin, CFG,
                       D**-0.5, out, ops=triton_ops)
        return out

    buffers = PlanBuffers(16, DEVICE)
    captured = plan_decode_step(qsl_pad, seq_a + [0] * pad, CFG, buffers, bound)
    assert captured.waves[0].n == n + pad and captured.waves[0].max_cand == bound
    mem_e, mem_s = mem0.clone(), mem0.clone()
    for step, seq in enumerate((seq_a, seq_b)):
        if step == 1:  # the next step writes its plan into the captured buffers
            plan_b = plan_decode_step(qsl_pad, seq + [0] * pad, CFG, buffers, bound)
            assert plan_b.waves[0].req.data_ptr() == captured.waves[0].req.data_ptr()
        want = eager(seq, mem_e)
        got = torch.full((n + pad, Hq, D), float("nan"), device=DEVICE)
        infllm_forward(query, kv, table, captured, mem_s, cos, sin, CFG, D**-0.5, got, ops=triton_ops)
        torch.testing.assert_close(got[:n], want, **TOL[dtype])
        assert got[n:].isnan().all()  # padding rows are not written
        torch.testing.assert_close(mem_s.scores, mem_e.scores, **TOL[dtype])
        torch.testing.assert_close(mem_s.reprs, mem_e.reprs, **TOL[dtype])
        assert torch.equal(mem_s.sealed, mem_e.sealed)
    assert (mem_e.scores - mem0.scores).abs().max() > 0  # the steps did accumulate scores


@in_process
@pytest.mark.parametrize("Hq,Hkv,D,splits,selection,positions,extra", [
    (4, 2, 32, 1, "layer", "fixed", {}), (3, 1, 64, 2, "layer", "fixed", {}),
    (6, 3, 32, 2, "kv_head", "fixed", {}), (4, 2, 32, 2, "kv_head", "ordered", {}),
    (6, 3, 32, 1, "layer", "fixed", {"unit_score": "minmax"}),
    (4, 2, 32, 2, "layer", "ordered", {"unit_score": "minmax", "contiguity": 1, "select_queries": 4,
                                       "chunking": "step"}),
    (4, 2, 32, 1, "layer", "fixed", {"chunking": "step"}),
    (6, 3, 32, 2, "kv_head", "ordered", {"chunking": "aligned", "unit_score": "minmax"}),
    (6, 3, 32, 2, "kv_head", "fixed", {"unit_score": "max_topk"}),
    (4, 2, 32, 1, "layer", "ordered", {"unit_score": "max_topk", "chunking": "step"}),
    (2, 1, 256, 2, "layer", "fixed", {}),  # head size 256 (Gemma 2/3)
    (4, 2, 128, 1, "kv_head", "ordered", {"unit_score": "minmax"})])
def test_runtime_matches_oracle(Hq, Hkv, D, splits, selection, positions, extra, monkeypatch, whole_runs):
    """The whole runtime (write, seal, select, attend; waves; recycled stale state) vs the oracle."""
    monkeypatch.setattr(triton_ops, "DECODE_SPLITS", splits)
    monkeypatch.setattr(triton_ops, "BLOCK_N", 16 if splits > 1 else 64)
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32,
                       selection=selection, positions=positions, **extra)
    g = torch.Generator().manual_seed(7)
    reqs = [
        make_request([45, 77, 60], 4, Hq, Hkv, D, g),  # chunks cut at step bounds; several waves
        make_request([9], 20, Hq, Hkv, D, g),  # short prompt, decodes in mixed batches
        make_request([150], 3, Hq, Hkv, D, g),  # one long step: several waves in one step
    ]
    cos, sin = rope_table(D, 1024)
    run = run_paged(reqs, cfg, cos, sin, ops=triton_ops, device=DEVICE)
    traces = run_oracle(reqs, cfg, cos, sin)
    assert sum(len(c.per_kv_head[0]) == cfg.topk and c.num_candidates > cfg.topk
               for tr in traces for c in tr.chunks) > 5  # selection actually chose
    for out, tr in zip(run.outs[0], traces, strict=True):
        torch.testing.assert_close(out, tr.out, rtol=1e-4, atol=1e-4)
    mem, table = run.memories[0], run.block_table
    for i, tr in enumerate(traces):
        for u, r in tr.reprs.items():
            torch.testing.assert_close(mem.reprs[table[i, cfg.init_blocks + u]].cpu(), r,
                                       rtol=1e-4, atol=1e-4)


@in_process
@pytest.mark.parametrize("rope,softcap,sinks,splits", [
    (RopeLayout(32, 16), 0.0, False, 1), (RopeLayout(32, 32, neox=False), 2.5, False, 2),
    (RopeLayout(32, 16, neox=False), 0.0, True, 2), (RopeLayout(32, 32), 3.0, True, 1)], ids=str)
def test_runtime_model_variants_match_oracle(rope, softcap, sinks, splits, monkeypatch, whole_runs):
    """Partial and GPT-J RoPE (channels permuted to NeoX), soft-capping and sinks through the
    whole Triton runtime, against the oracle that applies them as the model does."""
    monkeypatch.setattr(triton_ops, "DECODE_SPLITS", splits)
    monkeypatch.setattr(triton_ops, "BLOCK_N", 16 if splits > 1 else 64)
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32)
    Hq, Hkv, D = 4, 2, 32
    g = torch.Generator().manual_seed(8)
    reqs = [make_request([45, 77, 60], 4, Hq, Hkv, D, g, scale_qk=1.7),
            make_request([9], 20, Hq, Hkv, D, g, scale_qk=1.7)]
    model = dict(rope=rope, softcap=softcap, sinks=torch.randn(Hq, generator=g) * 2 if sinks else None)
    cos, sin = rope_table(rope.rotary_dim, 1024)
    run = run_paged(reqs, cfg, cos, sin, ops=triton_ops, device=DEVICE, **model)
    for out, tr in zip(run.outs[0], run_oracle(reqs, cfg, cos, sin, **model), strict=True):
        torch.testing.assert_close(out, tr.out, rtol=1e-4, atol=1e-4)


@in_process
def test_runtime_dense_regime_fp16(whole_runs):
    """seq_len <= n_init + n_local: exactly dense causal attention, fp16 cache and queries."""
    cfg = InfLLMConfig.paper(n_init=32, n_local=96, block_size=16, topk=2, repr_topk=2, chunk=32)
    Hq, Hkv, D = 4, 2, 32
    g = torch.Generator().manual_seed(8)
    reqs = [make_request([70], 5, Hq, Hkv, D, g), make_request([20, 30], 2, Hq, Hkv, D, g)]
    cos, sin = rope_table(D, 256)
    run = run_paged(reqs, cfg, cos, sin, ops=triton_ops, device=DEVICE, dtype=torch.float16)
    for out, tr in zip(run.outs[0], run_oracle(reqs, cfg, cos, sin), strict=True):
        torch.testing.assert_close(out, tr.out, rtol=2e-2, atol=2e-2)


def packed_pages(Hq, Hkv, D, seq_lens, dtype, cfg=CFG, seed=0):
    """The same random state twice: contiguous tensors, and KV pages with the side state packed
    into extra head slots exactly as the vLLM adapter lays them out (adapter/side_state.py, which
    imports no vLLM): there `scores`/`reprs` have a page-sized block stride and `sealed` is one
    byte per page, a strided view."""
    from vllm_infllm.adapter.side_state import SideStateLayout, side_state_views

    (kv, table, cos, sin), mem = paged_state(Hq, Hkv, D, seq_lens, dtype, cfg, seed)
    rows = cfg.repr_rows(Hq, Hkv, dtype.itemsize)
    extra = SideStateLayout(Hq, D, cfg.block_size, dtype, rows).num_extra_slots()
    pages = torch.randn(kv.shape[0], Hkv + extra, cfg.block_size, 2 * D, device=DEVICE).to(dtype)
    pages[:, :Hkv] = kv
    scores, reprs, sealed, _ = side_state_views(pages, Hkv, Hq, D, rows)
    scores.copy_(mem.scores)
    reprs.copy_(mem.reprs)
    sealed.copy_(mem.sealed)
    assert sealed.stride(0) > 1 and scores.stride(0) > scores[0].numel()  # really strided
    packed = LayerMemory(reprs=reprs, scores=scores, sealed=sealed.view(torch.bool))
    return (kv, table, cos, sin), mem, pages, packed


def page_padding(pages, Hq, Hkv, D, cfg=CFG):
    """The bytes of each page's extra slots after the side state: nothing may write there."""
    from vllm_infllm.adapter.side_state import SideStateLayout

    rows = cfg.repr_rows(Hq, Hkv, pages.dtype.itemsize)
    used = SideStateLayout(Hq, D, pages.shape[2], pages.dtype, rows).total_bytes
    return pages[:, Hkv:].reshape(pages.shape[0], -1).view(torch.uint8)[:, used:]


@in_process
@pytest.mark.parametrize("unit_score", ["mean_topk", "sketch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ops_on_side_state_packed_in_the_pages(dtype, unit_score):
    """write_kv, seal, select and attend through the adapter's strided side-state views give the
    torch ops' results on contiguous state, and leave every other byte of the pages alone
    ("sketch": its codes are bytes in the repr rows, the box and the codes as the torch op's)."""
    Hq, Hkv, D = 4, 2, 32
    cfg = dataclasses.replace(CFG, unit_score=unit_score)
    (kv, table, cos, sin), mem, pages, packed = packed_pages(Hq, Hkv, D, SEQ_LENS, dtype, cfg)
    g = torch.Generator().manual_seed(5)
    T = sum(QUERY_LENS)
    query = torch.randn(T, Hq, D, generator=g).to(dtype=dtype, device=DEVICE)
    key = torch.randn(T, Hkv, D, generator=g).to(dtype=dtype, device=DEVICE)
    value = torch.randn(T, Hkv, D, generator=g).to(dtype=dtype, device=DEVICE)
    B, slots = CFG.block_size, []
    for r, (n, s) in enumerate(zip(QUERY_LENS, SEQ_LENS, strict=True)):
        pos = torch.arange(s - n, s, device=DEVICE)
        slots.append(table[r, pos // B].long() * B + pos % B)
    slots = torch.cat(slots)
    assert bool((slots % B == 0).any())  # some block is written from offset 0: its state resets
    padding = page_padding(pages, Hq, Hkv, D, cfg).clone()

    torch_ops.write_kv(kv, key, value, slots, mem)
    triton_ops.write_kv(pages[:, :Hkv], key, value, slots, packed)
    for wave in _plan():
        torch_ops.seal_units(kv, mem, table, wave, cos, sin, cfg)
        triton_ops.seal_units(pages[:, :Hkv], packed, table, wave, cos, sin, cfg)
        selected = torch_ops.select_units(query, mem, table, wave, cos, sin, cfg, Hkv)
        picked = triton_ops.select_units(query, packed, table, wave, cos, sin, cfg, Hkv)
        assert [sorted(r) for r in selected.tolist()] == [sorted(r) for r in picked.tolist()]
        o_ref = torch.zeros(T, Hq, D, dtype=dtype, device=DEVICE)
        o_tri = torch.zeros(T, Hq, D, dtype=dtype, device=DEVICE)
        torch_ops.attend(query, kv, mem, table, wave, selected, cos, sin, cfg, D**-0.5, o_ref)
        triton_ops.attend(query, pages[:, :Hkv], packed, table, wave, selected, cos, sin, cfg, D**-0.5, o_tri)
        torch.testing.assert_close(o_tri, o_ref, **TOL[dtype])
    assert torch.equal(packed.sealed, mem.sealed)
    assert mem.sealed.sum() > 5
    if unit_score == "sketch":  # box rows as floats, code rows as bytes
        torch.testing.assert_close(packed.reprs[:, : 2 * Hkv], mem.reprs[:, : 2 * Hkv], **TOL[dtype])
        assert_codes_match(packed.reprs, mem.reprs, Hkv)
    else:
        torch.testing.assert_close(packed.reprs, mem.reprs, **TOL[dtype])
    torch.testing.assert_close(packed.scores, mem.scores, **TOL[dtype])
    assert torch.equal(pages[:, :Hkv], kv)  # K/V of every block as the torch ops left them
    assert torch.equal(page_padding(pages, Hq, Hkv, D, cfg), padding)


@in_process
@pytest.mark.parametrize("Hq,Hkv,D,extra,dtype", [
    (6, 3, 32, {}, torch.float32), (6, 3, 32, {"selection": "kv_head"}, torch.float16),
    (4, 1, 64, {"contiguity": 1}, torch.float32),
    (4, 2, 32, {"chunking": "step", "select_queries": 5}, torch.float16)])
def test_select_units_exact(Hq, Hkv, D, extra, dtype):
    """The exact score's units (unit_score="exact", retrieval_layer) as the torch op picks them;
    a NaN key in a unit the clean scores leave out makes that unit ranked first."""
    cfg = dataclasses.replace(CFG, unit_score="exact", **extra)
    (kv, table, cos, sin), _ = paged_state(Hq, Hkv, D, SEQ_LENS, dtype, cfg)
    query = torch.randn(sum(QUERY_LENS), Hq, D, generator=torch.Generator().manual_seed(4)).to(dtype=dtype,
                                                                                               device=DEVICE)
    chosen = 0
    for wave in _plan():
        a = torch_ops.select_units_exact(query, kv, table, wave, cos, sin, cfg, Hkv)
        b = triton_ops.select_units_exact(query, kv, table, wave, cos, sin, cfg, Hkv)
        assert a.shape == b.shape == (wave.n, cfg.selection_groups(Hkv), cfg.topk)
        assert torch.equal(a.cpu(), b.cpu()), (a, b)
        chosen += int((a >= 0).sum())
    assert chosen >= 4 * cfg.topk
    wave = _plan()[0]
    assert wave.host["num_cand"][0] > cfg.topk
    clean = torch_ops.select_units_exact(query, kv, table, wave, cos, sin, cfg, Hkv)[0, 0].tolist()
    unit = min(set(range(wave.host["num_cand"][0])) - set(clean))
    kv[table[0, cfg.init_blocks + unit], 0, 3, 1] = float("nan")  # KV head 0: group 0 either way
    for op in (torch_ops, triton_ops):
        assert unit in op.select_units_exact(query, kv, table, wave, cos, sin, cfg, Hkv)[0, 0].tolist()


@in_process
@pytest.mark.parametrize("Hq,Hkv,D,modes", [  # three cases: the interpreter takes ~30 s each
    (4, 2, 32, {"retrieval_layer": 1, "unit_score": "exact", "positions": "ordered", "chunking": "aligned"}),
    (4, 1, 64, {"retrieval_layer": 0, "unit_score": "minmax", "selection": "kv_head", "chunking": "step",
                "select_queries": 4}),
    (4, 2, 32, {"retrieval_layer": 1, "unit_score": "sketch", "selection": "kv_head", "positions": "ordered"})])
def test_runtime_retrieval_layer_exact_and_sketch_match_oracle(Hq, Hkv, D, modes, whole_runs):
    """retrieval_layer, unit_score="exact" and "sketch" on the Triton path, three layers: the
    layer below selects by its own score, the retrieval layer by every key, the layer above
    attends its units (docs/design.md section 2.7); every output as the oracle's."""
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=3, repr_topk=3, chunk=32, **modes)
    g = torch.Generator().manual_seed(8)
    reqs = [make_request([45, 77, 60], 4, Hq, Hkv, D, g), make_request([9], 20, Hq, Hkv, D, g),
            make_request([150], 3, Hq, Hkv, D, g)]
    cos, sin = rope_table(D, 1024)
    run = run_paged(reqs, cfg, cos, sin, ops=triton_ops, device=DEVICE, layers=3)
    for layer in range(3):
        traces = run_oracle(reqs, cfg, cos, sin, layer)
        assert sum(c.num_candidates > cfg.topk for tr in traces for c in tr.chunks) > 5  # selection chose
        for out, tr in zip(run.outs[layer], traces, strict=True):
            torch.testing.assert_close(out, tr.out, rtol=1e-4, atol=1e-4)
