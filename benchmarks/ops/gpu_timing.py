#!/usr/bin/env python
"""Timing of the Triton InfLLM kernels on a GPU against full attention (torch SDPA).

    bash benchmarks/ops/gpu.sh                        # on the GPU machine: tests, then this
    python -m benchmarks.ops.gpu_timing               # this alone (from the repository root)
    python -m benchmarks.ops.gpu_timing --smoke       # anywhere: tiny sizes, CPU + TRITON_INTERPRET=1

Correctness on the GPU is checked by the `gpu` tests (tests/core/test_gpu.py), which gpu.sh
runs first. This script times, with CUDA events after warm-up (median): InfLLM decode (batch 1
and 16, one token each) and prefill (one 512-query chunk, one 4K step) at 32K / 128K / 1M
tokens of context, against full attention over the same context with torch SDPA on contiguous
K/V, plus achieved GB/s against the bytes floor (attended KV bytes + representative bytes read
by selection). Writes the markdown report to $OUT/gpu_timing.md when $OUT is set. Benchmarks are
not tests: the numbers are written down, not asserted.

Runs without vLLM (the GPU machine has none): only the core and `vllm_infllm.testing`. From the
repository root `python -m` finds the package without installing it.
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vllm_infllm.core.config import InfLLMConfig  # noqa: E402
from vllm_infllm.core.ops import triton_ops  # noqa: E402
from vllm_infllm.core.plan import plan_step  # noqa: E402
from vllm_infllm.core.rope import rope_table  # noqa: E402
from vllm_infllm.core.runtime import infllm_forward  # noqa: E402
from vllm_infllm.testing import paged_state  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LINES: list[str] = []


def log(s=""):
    print(s, flush=True)
    LINES.append(s)


# ----------------------------------------------------------------------------------- (b) timing
_L2_FLUSH: torch.Tensor | None = None


def bench(fn, warmup, iters):
    """Median ms of fn. On CUDA, L2 is flushed before each timed call (a buffer of 4x its size
    is overwritten, outside the timed events, as triton.testing.do_bench does): one layer's
    decode working set (~25 MB at 32K) fits an H200's L2, and repeating it would time L2, not
    HBM."""
    global _L2_FLUSH
    for _ in range(warmup):
        fn()
    times = []
    if DEV == "cuda":
        if _L2_FLUSH is None:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
            _L2_FLUSH = torch.empty(4 * l2 // 4, dtype=torch.int32, device=DEV)
        torch.cuda.synchronize()
        for _ in range(iters):
            _L2_FLUSH.zero_()
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


def _time_infllm(nq, seq, batch, cfg, Hq, Hkv, D, dtype, warmup, iters):
    """One layer of InfLLM (write_kv + seal/select/attend) for `batch` chunks of `nq` queries at
    the end of `seq`-token sequences; its tensors are freed when this returns."""
    B = cfg.block_size
    st = paged_state(Hq, Hkv, D, [seq] * batch, dtype, cfg, device=DEV, stale=False)
    kv, table, mem = st.kv_cache, st.block_table, st.memory
    cos, sin = rope_table(D, seq + cfg.n_local + 1, device=DEV)
    q = torch.randn(batch * nq, Hq, D, device=DEV, dtype=dtype)
    k_new = torch.randn(batch * nq, Hkv, D, device=DEV, dtype=dtype)
    v_new = torch.randn_like(k_new)
    pos = torch.arange(seq - nq, seq, device=DEV)
    slots = torch.cat([table[r, pos // B].long() * B + pos % B for r in range(batch)])
    plan = plan_step([i * nq for i in range(batch + 1)], [seq] * batch, cfg, device=DEV)
    out = torch.empty_like(q)

    def infllm():
        triton_ops.write_kv(kv, k_new, v_new, slots, mem)
        infllm_forward(q, kv, table, plan, mem, cos, sin, cfg, D**-0.5, out, ops=triton_ops)

    return bench(infllm, warmup, iters)


def _time_sdpa(nq, seq, batch, Hq, Hkv, D, dtype, warmup, iters):
    """Full attention over the same context: contiguous K/V; the G query heads of a KV head are
    folded into the query axis (exact for GQA, no K/V repeat). Prefill chunks at the end of the
    context are run non-causal: the causal triangle covers nq of ctx keys, a negligible share
    (<= 1/8 here)."""
    K = torch.randn(batch, Hkv, seq, D, device=DEV, dtype=dtype)
    V = torch.randn_like(K)
    qf = torch.randn(batch, Hkv, Hq // Hkv * nq, D, device=DEV, dtype=dtype)
    return bench(lambda: F.scaled_dot_product_attention(qf, K, V, scale=D**-0.5), warmup, iters)


def time_case(kind, ctx, batch, cfg, Hq, Hkv, D, dtype, warmup, iters):
    """InfLLM (write_kv + seal/select/attend of one layer) vs SDPA over the same context."""
    elt = torch.finfo(dtype).bits // 8
    nq = {"decode": 1, "prefill512": 512, "prefill4K": 4096}[kind]
    nq = min(nq, ctx // 2)
    seq = ctx  # queries are the last nq positions of a ctx-token sequence
    t_inf = _time_infllm(nq, seq, batch, cfg, Hq, Hkv, D, dtype, warmup, iters)
    t_sdpa = _time_sdpa(nq, seq, batch, Hq, Hkv, D, dtype, warmup, iters)
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
    args = ap.parse_args()
    t0 = time.perf_counter()
    import triton

    log(f"# InfLLM GPU timing\n\ndevice: {torch.cuda.get_device_name(0) if DEV == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}, triton {triton.__version__}, "
        f"interpreter: {os.environ.get('TRITON_INTERPRET', '0')}\n")
    if args.smoke:
        if DEV == "cpu":  # exercise the split-KV decode path at tiny sizes too
            triton_ops.DECODE_SPLITS, triton_ops.BLOCK_N = 3, 16
        cfg = InfLLMConfig(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32)
        args.contexts = args.contexts or [256, 1024]
        args.warmup, args.iters = args.warmup or 1, args.iters or 2
        Ht = (4, 2, 32)
    else:
        cfg = InfLLMConfig()
        args.contexts = args.contexts or [32 * 1024, 128 * 1024, 1024 * 1024]
        args.warmup, args.iters = args.warmup or 3, args.iters or 20
        Ht = (32, 8, 128)

    log("## Timing (one layer)\n")
    run_timing(args, cfg, *Ht, torch.bfloat16 if DEV == "cuda" else torch.float32)
    log("\nInfLLM = write_kv + seal + select + attend for one layer; SDPA = full attention over the "
        "same context (contiguous K/V, no write); L2 flushed before every timed call. "
        "floor = unique KV bytes attended + representative "
        "bytes scanned; × floor time = InfLLM time / (floor bytes / copy bandwidth).")
    log(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if os.environ.get("OUT"):
        path = pathlib.Path(os.environ["OUT"]) / "gpu_timing.md"
        path.write_text("\n".join(LINES) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
