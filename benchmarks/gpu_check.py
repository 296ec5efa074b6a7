#!/usr/bin/env python
"""One-shot GPU check of the Triton InfLLM kernels: correctness on CUDA, then speed vs full attention.

    python benchmarks/gpu_check.py            # on the GPU machine (H100/H200, torch + Triton, no vLLM)
    python benchmarks/gpu_check.py --smoke    # anywhere: tiny sizes, CPU + TRITON_INTERPRET=1

(a) checks: every Triton op against the torch op on the same CUDA tensors, bf16, realistic head
    layouts (Hq 32/Hkv 8/D 128 and Hq 9/Hkv 3/D 64) and the default InfLLMConfig; then the whole
    runtime (Triton ops) against the fp32 oracle at a moderate length.
(b) timing (CUDA events, warm-up, median): InfLLM decode (batch 1 and 16, one token each) and
    prefill (one 512-query chunk, one 4K step) at 32K / 128K / 1M tokens of context, against
    full attention over the same context with torch SDPA on contiguous K/V, plus achieved GB/s
    against the bytes floor (attended KV bytes + representative bytes read by selection).
Writes the markdown report to $OUT/gpu_check.md when $OUT is set. Benchmarks are not tests: the
numbers are written down, only the correctness checks set the exit status.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
import traceback

SMOKE = "--smoke" in sys.argv
if SMOKE and not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _t

        if not _t.cuda.is_available():  # must be set before triton is imported
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "core")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vllm_infllm.config import InfLLMConfig  # noqa: E402
from vllm_infllm.ops import torch_ops, triton_ops  # noqa: E402
from vllm_infllm.rope import rope_table  # noqa: E402
from vllm_infllm.runtime import LayerMemory, infllm_forward, plan_step  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LINES: list[str] = []
FAILURES: list[str] = []


def log(s=""):
    print(s, flush=True)
    LINES.append(s)


# ------------------------------------------------------------------------------------ helpers
def paged_state(Hq, Hkv, D, seq_lens, dtype, cfg, seed=0, stale=True):
    """Random cache with a random block table per request, memory with random (stale) state."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    B = cfg.block_size
    widths = [-(-s // B) for s in seq_lens]
    nb = sum(widths) + 1
    perm = torch.randperm(nb, device=DEV, generator=g)
    table = torch.zeros(len(seq_lens), max(widths), dtype=torch.int32, device=DEV)
    at = 0
    for i, w in enumerate(widths):
        table[i, :w] = perm[at : at + w].to(torch.int32)
        at += w
    kv = torch.empty(nb, Hkv, B, 2 * D, dtype=dtype, device=DEV).normal_(generator=g)
    mem = LayerMemory.allocate(nb, Hq, D, B, dtype, DEV)
    mem.reprs.normal_(generator=g)
    if stale:
        mem.scores.uniform_(generator=g)
        mem.sealed.copy_(torch.rand(nb, device=DEV, generator=g) < 0.3)
    else:
        mem.sealed.fill_(True)
    return kv, table, mem


def clone_mem(m):
    return LayerMemory(m.reprs.clone(), m.scores.clone(), m.sealed.clone())


def err(a, b):
    a, b = a.float(), b.float()
    return (a - b).abs().max().item(), ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def check(name, ok, detail):
    log(f"- {'PASS' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        FAILURES.append(name)


def gpu_rope(D, rows, dtype=torch.float32, base=10000.0):
    """rope_table on the device (a 1M-row table in float64 on the host takes seconds)."""
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64, device=DEV) / D))
    ang = torch.arange(rows, dtype=torch.float64, device=DEV)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


# ------------------------------------------------------------------------------ (a) correctness
def check_ops(Hq, Hkv, D, cfg, dtype, query_lens, seq_lens, tol):
    tag = f"Hq{Hq}/Hkv{Hkv}/D{D} {str(dtype).split('.')[-1]}"
    kv, table, mem = paged_state(Hq, Hkv, D, seq_lens, dtype, cfg)
    cos, sin = gpu_rope(D, max(seq_lens) + cfg.n_local + 1)
    T = sum(query_lens)
    g = torch.Generator(device=DEV).manual_seed(1)
    query = torch.empty(T, Hq, D, device=DEV, dtype=dtype).normal_(generator=g)
    key = torch.empty(T, Hkv, D, device=DEV, dtype=dtype).normal_(generator=g)
    value = torch.empty(T, Hkv, D, device=DEV, dtype=dtype).normal_(generator=g)
    qsl, slots = [0], []
    for r, (n, s) in enumerate(zip(query_lens, seq_lens)):
        qsl.append(qsl[-1] + n)
        pos = torch.arange(s - n, s, device=DEV)
        slots.append(table[r, pos // cfg.block_size].long() * cfg.block_size + pos % cfg.block_size)
    slots = torch.cat(slots)
    slots[1] = -1  # a padding token
    plan = plan_step(qsl, seq_lens, cfg, device=DEV)

    kv_t, mem_t = kv.clone(), clone_mem(mem)
    torch_ops.write_kv(kv_t, key, value, slots, mem_t)
    triton_ops.write_kv(kv, key, value, slots, mem)
    check(f"write_kv {tag}", torch.equal(kv, kv_t) and torch.equal(mem.scores, mem_t.scores)
          and torch.equal(mem.sealed, mem_t.sealed), "exact")

    worst = dict(reprs=0.0, out=0.0, out_rel=0.0, scores=0.0, overlap=1.0)
    # The mixed waves, then the decode requests alone: a decode-only wave takes the split-KV path.
    dec = [i for i, n in enumerate(query_lens) if n == 1]
    plan2 = plan_step(list(range(len(dec) + 1)), [seq_lens[i] for i in dec], cfg, device=DEV)
    for w2 in plan2.waves:
        w2.req.copy_(torch.tensor(dec, device=DEV))
        w2.q0.copy_(torch.tensor([qsl[i] for i in dec], device=DEV))
        w2.host.update(req=dec, q0=[qsl[i] for i in dec])
    for wave in plan.waves + plan2.waves:
        torch_ops.seal_units(kv, mem_t, table, wave, cos, sin, cfg)
        triton_ops.seal_units(kv, mem, table, wave, cos, sin, cfg)
        if not torch.equal(mem.sealed, mem_t.sealed):
            check(f"seal_units {tag}", False, "sealed flags differ")
        worst["reprs"] = max(worst["reprs"], err(mem.reprs, mem_t.reprs)[0])
        sel_t = torch_ops.select_units(query, mem_t, table, wave, cos, sin, cfg)
        sel = triton_ops.select_units(query, mem, table, wave, cos, sin, cfg)
        for a, b in zip(sel_t.tolist(), sel.tolist()):
            va = {u for u in a if u >= 0}
            if va:
                worst["overlap"] = min(worst["overlap"], len(va & set(b)) / len(va))
        o_t = torch.zeros(T, Hq, D, device=DEV, dtype=dtype)
        o = torch.zeros(T, Hq, D, device=DEV, dtype=dtype)
        torch_ops.attend(query, kv, mem_t, table, wave, sel_t, cos, sin, cfg, D**-0.5, o_t)
        triton_ops.attend(query, kv, mem, table, wave, sel_t, cos, sin, cfg, D**-0.5, o)
        ea, er = err(o, o_t)
        worst["out"], worst["out_rel"] = max(worst["out"], ea), max(worst["out_rel"], er)
        worst["scores"] = max(worst["scores"], err(mem.scores, mem_t.scores)[1])
        mem.scores.copy_(mem_t.scores)  # keep later waves' sealing identical
        mem.reprs.copy_(mem_t.reprs)
    check(f"seal_units {tag}", worst["reprs"] <= tol, f"max |Δreprs| {worst['reprs']:.2e}")
    check(f"select_units {tag}", worst["overlap"] >= 0.85,
          f"min overlap of selected sets {worst['overlap']:.2f} (near-ties may swap in 16-bit)")
    check(f"attend {tag}", worst["out"] <= tol, f"max |Δout| {worst['out']:.2e}, rel L2 {worst['out_rel']:.2e}")
    check(f"attend scores {tag}", worst["scores"] <= tol, f"rel L2 Δscores {worst['scores']:.2e}")


def check_runtime_vs_oracle(small):
    from harness import make_request, run_oracle, run_paged

    if small:
        cfg = InfLLMConfig(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32)
        shapes, pieces = [(4, 2, 32)], [([45, 77], 4), ([9], 12), ([200], 2)]
    else:
        cfg = InfLLMConfig(n_init=64, n_local=512, block_size=64, topk=4, repr_topk=4, chunk=256)
        shapes, pieces = [(8, 2, 64), (9, 3, 64)], [([600, 700], 8), ([300], 24), ([1200], 4)]
    for Hq, Hkv, D in shapes:
        g = torch.Generator().manual_seed(0)
        reqs = [make_request(p, d, Hq, Hkv, D, g) for p, d in pieces]
        cos, sin = rope_table(D, 4096)
        t = time.perf_counter()
        run = run_paged(reqs, cfg, cos, sin, ops=triton_ops, device=DEV)
        traces = run_oracle(reqs, cfg, cos, sin)
        worst = max(err(o, tr.out)[0] for o, tr in zip(run.outs[0], traces))
        chose = sum(c.num_candidates > cfg.topk for tr in traces for c in tr.chunks)
        check(f"runtime vs oracle fp32 Hq{Hq}/Hkv{Hkv}/D{D}", worst <= 1e-3,
              f"max |Δout| {worst:.2e} over {sum(r.total for r in reqs)} tokens, "
              f"{chose} chunks with a real selection ({time.perf_counter() - t:.1f}s)")


# ----------------------------------------------------------------------------------- (b) timing
def bench(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    if DEV == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth():
    n = (1 << 28) if DEV == "cuda" else (1 << 22)  # 1 GiB of fp32 on the GPU
    x = torch.empty(n, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), 3, 10)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9  # read + write


def floor_bytes(cfg, ctx_end, nq, Hq, Hkv, D, elt):
    """Unique bytes a chunk of nq queries ending at ctx_end must read: its keys/values
    (window union, init, topk units, remainder) and, when selecting, all representatives."""
    B, c0 = cfg.block_size, ctx_end - nq
    w0, w1 = cfg.window_start(c0), cfg.window_start(ctx_end - 1)
    K = cfg.num_candidates(c0)
    r0 = cfg.n_init + K * B
    keys = (ctx_end - w0) + min(cfg.n_init, w1) + min(K, cfg.topk) * B + max(0, w1 - r0)
    reprs = K * Hq * D * elt if K > cfg.topk else 0
    return keys * Hkv * 2 * D * elt, reprs


def time_case(kind, ctx, batch, cfg, Hq, Hkv, D, dtype, warmup, iters):
    """InfLLM (write_kv + seal/select/attend of one layer) vs SDPA over the same context."""
    B, G, elt = cfg.block_size, Hq // Hkv, torch.finfo(dtype).bits // 8
    nq = {"decode": 1, "prefill512": 512, "prefill4K": 4096}[kind]
    nq = min(nq, ctx // 2)
    seq = ctx  # queries are the last nq positions of a ctx-token sequence
    kv, table, mem = paged_state(Hq, Hkv, D, [seq] * batch, dtype, cfg, stale=False)
    cos, sin = gpu_rope(D, seq + cfg.n_local + 1)
    q = torch.randn(batch * nq, Hq, D, device=DEV, dtype=dtype)
    k_new = torch.randn(batch * nq, Hkv, D, device=DEV, dtype=dtype)
    v_new = torch.randn_like(k_new)
    pos = torch.arange(seq - nq, seq, device=DEV)
    slots = torch.cat([table[r, pos // B].long() * B + pos % B for r in range(batch)])
    plan = plan_step([i * nq for i in range(batch + 1)], [seq] * batch, cfg, device=DEV)
    out = torch.empty_like(q)
    scale = D**-0.5

    def infllm():
        triton_ops.write_kv(kv, k_new, v_new, slots, mem)
        infllm_forward(q, kv, table, plan, mem, cos, sin, cfg, scale, out, ops=triton_ops)

    t_inf = bench(infllm, warmup, iters)
    del kv, mem
    # Full attention: contiguous K/V; the G query heads of a KV head are folded into the query
    # axis (exact for GQA, no K/V repeat). Prefill chunks at the end of the context are run
    # non-causal: the causal triangle covers nq of ctx keys, a negligible share (<= 1/8 here).
    K = torch.randn(batch, Hkv, seq, D, device=DEV, dtype=dtype)
    V = torch.randn_like(K)
    qf = torch.randn(batch, Hkv, G * nq, D, device=DEV, dtype=dtype)
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(qf, K, V, scale=scale), warmup, iters)
    del K, V
    kvb, rb = floor_bytes(cfg, seq, nq, Hq, Hkv, D, elt)
    return t_inf, t_sdpa, batch * (kvb + rb)


def run_timing(args, cfg, Hq, Hkv, D, dtype):
    bw = copy_bandwidth()
    log(f"\nDevice copy bandwidth: {bw:.0f} GB/s (read+write of a large buffer); "
        f"{Hq=} {Hkv=} {D=} {str(dtype).split('.')[-1]}, {cfg}\n")
    log("| case | context | batch | InfLLM ms | SDPA ms | speed-up | floor MB | InfLLM GB/s | × floor time |")
    log("|---|---|---|---|---|---|---|---|---|")
    budget = (torch.cuda.get_device_properties(0).total_memory if DEV == "cuda" else 8 << 30) * 0.4
    for ctx in args.contexts:
        for kind, batch in (("decode", 1), ("decode", 16), ("prefill512", 1), ("prefill4K", 1)):
            need = batch * ctx * Hkv * 2 * D * (torch.finfo(dtype).bits // 8)
            if need > budget:
                log(f"| {kind} | {ctx} | {batch} | skipped: {need / 2**30:.0f} GiB of KV | | | | | |")
                continue
            try:
                t_inf, t_sdpa, nbytes = time_case(kind, ctx, batch, cfg, Hq, Hkv, D, dtype,
                                                  args.warmup, args.iters)
            except Exception as e:  # keep going: report what ran
                traceback.print_exc()
                log(f"| {kind} | {ctx} | {batch} | error: {type(e).__name__}: {e} | | | | | |")
                continue
            gbs = nbytes / (t_inf * 1e-3) / 1e9
            floor_ms = nbytes / (bw * 1e9) * 1e3
            log(f"| {kind} | {ctx} | {batch} | {t_inf:.3f} | {t_sdpa:.3f} | {t_sdpa / t_inf:.1f}× | "
                f"{nbytes / 1e6:.1f} | {gbs:.0f} | {t_inf / floor_ms:.1f} |")
            if DEV == "cuda":
                torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--contexts", type=int, nargs="*", default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--skip-checks", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import triton

    log(f"# InfLLM GPU check\n\ndevice: {torch.cuda.get_device_name(0) if DEV == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}, triton {triton.__version__}, "
        f"interpreter: {os.environ.get('TRITON_INTERPRET', '0')}\n")
    if args.smoke:
        if DEV == "cpu":  # exercise the split-KV decode path at tiny sizes too
            triton_ops.DECODE_SPLITS, triton_ops.BLOCK_N = 3, 16
        cfg = InfLLMConfig(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32)
        op_shapes, dtype = [(4, 2, 32), (3, 1, 32)], torch.float16  # interpreter: bf16 is broken
        qlens, slens, tol = [32, 1, 1, 5], [224, 200, 150, 20], 2e-2
        args.contexts = args.contexts or [256, 1024]
        args.warmup, args.iters = args.warmup or 1, args.iters or 2
        Ht = (4, 2, 32)
    else:
        cfg = InfLLMConfig()
        op_shapes, dtype = [(32, 8, 128), (9, 3, 64)], torch.bfloat16
        qlens, slens, tol = [512, 1, 1, 1, 37], [10752, 20000, 9000, 5000, 300], 3e-2
        args.contexts = args.contexts or [32 * 1024, 128 * 1024, 1024 * 1024]
        args.warmup, args.iters = args.warmup or 3, args.iters or 20
        Ht = (32, 8, 128)

    if not args.skip_checks:
        log("## Correctness\n")
        for Hq, Hkv, D in op_shapes:
            try:
                check_ops(Hq, Hkv, D, cfg, dtype, qlens, slens, tol)
            except Exception as e:
                traceback.print_exc()
                check(f"ops Hq{Hq}/Hkv{Hkv}/D{D}", False, f"{type(e).__name__}: {e}")
        try:
            check_runtime_vs_oracle(args.smoke)
        except Exception as e:
            traceback.print_exc()
            check("runtime vs oracle", False, f"{type(e).__name__}: {e}")
        log(f"\n(checks took {time.perf_counter() - t0:.0f}s)")

    log("\n## Timing (one layer)\n")
    run_timing(args, cfg, *Ht, torch.bfloat16 if DEV == "cuda" else torch.float32)
    log("\nInfLLM = write_kv + seal + select + attend for one layer; SDPA = full attention over the "
        "same context (contiguous K/V, no write). floor = unique KV bytes attended + representative "
        "bytes scanned; × floor time = InfLLM time / (floor bytes / copy bandwidth).")
    log(f"\nfailures: {FAILURES or 'none'}; total {time.perf_counter() - t0:.0f}s")
    if os.environ.get("OUT"):
        path = pathlib.Path(os.environ["OUT"]) / "gpu_check.md"
        path.write_text("\n".join(LINES) + "\n")
        print(f"wrote {path}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
