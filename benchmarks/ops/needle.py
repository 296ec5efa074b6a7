"""Ops-level synthetic needle on CPU: InfLLM's unit retrieval and decode-step time up to 1M tokens.

    python benchmarks/ops/needle.py --lengths 32768 131072 1048576 --out benchmarks/results/ops_needle

No model and no vLLM: one attention layer driven through the vLLM-free runtime
(`vllm_infllm.core.plan.plan_step`, `core.runtime.infllm_forward`, `core.ops.torch_ops`), like
`tests/core/harness.py` does, with Hq query heads, Hkv KV heads, head dim D.

THE SHORTCUT (prefilling 1M queries through the runtime would take hours on 2 cores): the
context is written directly into the paged cache instead of being prefilled.
  * K/V of all N context tokens: raw keys and values ~ N(0, 1); keys are RoPE-rotated by their
    position (the cache holds post-RoPE keys, as vLLM writes them); block table = identity.
  * Representative scores (`memory.scores`, normally the attention mass each token received
    inside local windows during prefill) are filled with U(0, 1), then EVERY candidate unit is
    sealed by `torch_ops.seal_units` (called with a synthetic ChunkBatch whose `num_cand` values
    step through all units), so representatives are the mean raw key of 4 random tokens of the unit.
  * Needle: in one unit at `depth` of the candidate units, `--needle-tokens` consecutive tokens get
    raw keys  noise + s*sqrt(D)*g_h  (g_h a random unit direction per KV head, s = --signals) and
    values along a random direction v*; their scores are set above all others (2 + U(0,1)): we
    ASSUME the needle tokens were the most attended tokens of their unit while in the local window,
    so they become its representatives ("ideal representatives"; `--score-mode random` drops it).
  * Decode query at position N (seq_len N+1): raw query = noise + sqrt(D)*g_h, expressed so that
    after InfLLM's global re-rotation (R(n_local-1) q_raw) it is aligned with g_h.
Recall = fraction of trials in which the planted unit is among the `topk` units `select_units`
picks for the decode query; `out_cos` = cosine between the attention output and v* (mean over
heads: > 0 only if the needle's values reach the output). Selection difficulty grows with N:
the planted unit competes with N/128 random units.

Time per decode step = write_kv (one token) + plan_step + infllm_forward (seal, select, attend),
median of --steps repeats, vs `dense`: torch SDPA of the same query over all N+1 keys (contiguous
copies of K/V in the cache dtype, prepared outside the timing) = what full attention must read.
Memory: the cache is --dtype (bfloat16 default): N * Hkv * 2D * 2 bytes (1M tokens, Hkv=2, D=64:
512 MiB) plus the dense copies (same again) plus fp32 side state (N/128 * Hq * (128 + D) * 4 B).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch


def _cell(v: float) -> str:
    """A table cell: '—' where no trial fell in the group (mean of nothing)."""
    return "—" if math.isnan(v) else str(v)


def seal_all(kv, memory, block_table, config, cos, sin, num_units):
    """Seal units [0, num_units) with torch_ops.seal_units: one synthetic chunk per window."""
    from vllm_infllm.core.ops import torch_ops
    from vllm_infllm.core.plan import ChunkBatch

    window = config.chunk // config.block_size + 2
    cands = list(range(window, num_units, window)) + [num_units]
    n = len(cands)
    z = torch.zeros(n, dtype=torch.int64)
    host = {"req": [0] * n, "c0": [0] * n, "length": [1] * n, "q0": [0] * n, "num_cand": cands}
    cb = ChunkBatch(req=z, c0=z, length=torch.ones(n, dtype=torch.int64), q0=z,
                    num_cand=torch.tensor(cands, dtype=torch.int64), a0=z, host={**host, "a0": [0] * n},
                    max_len=1, max_cand=max(cands))
    torch_ops.seal_units(kv, memory, block_table, cb, cos, sin, config)


def run_length(N, args, config, gen, signals):
    from vllm_infllm.core.ops import torch_ops
    from vllm_infllm.core.plan import LayerMemory, plan_step
    from vllm_infllm.core.rope import rope_table, rotate
    from vllm_infllm.core.runtime import infllm_forward

    B, D, Hq, Hkv = config.block_size, args.head_dim, args.heads_q, args.heads_kv
    G = Hq // Hkv
    dtype = getattr(torch, args.dtype)
    nb = -(-(N + 1) // B)
    t_build = time.perf_counter()
    cos, sin = rope_table(D, nb * B + 1, base=args.rope_base)  # covers every slot of the last block
    kv = torch.empty(nb, Hkv, B, 2 * D, dtype=dtype)
    step = max(1, (1 << 20) // B)  # blocks per slice: 1M tokens at a time
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        pos = torch.arange(b0 * B, b1 * B)
        k = torch.randn(len(pos), Hkv, D, generator=gen)
        kv[b0:b1, :, :, :D] = rotate(k, cos, sin, pos).view(b1 - b0, B, Hkv, D).transpose(1, 2).to(dtype)
        kv[b0:b1, :, :, D:] = torch.randn(b1 - b0, Hkv, B, D, generator=gen).to(dtype)
        del k
    block_table = torch.arange(nb, dtype=torch.int32)[None]
    memory = LayerMemory.allocate(nb, Hq, D, B, dtype, "cpu", repr_rows=config.repr_rows(Hq, Hkv, dtype.itemsize),
                                  chosen=config.chosen_shape(Hkv))
    memory.scores.uniform_(0, 1, generator=gen)
    K = config.num_candidates(N)  # candidate units of the decode query at position N
    seal_all(kv, memory, block_table, config, cos, sin, K)
    build_s = time.perf_counter() - t_build

    kv_head = torch.arange(Hq) // G
    records = []
    slot = torch.tensor([N], dtype=torch.long)  # block N // B, offset N % B (identity table)

    def decode_query(g):
        """Post-RoPE query at position N whose global form R(n_local-1) q_raw = noise + sqrt(D) g."""
        q_glob = torch.randn(1, Hq, D, generator=gen) + math.sqrt(D) * g[kv_head][None]
        return rotate(q_glob, cos, sin, torch.tensor([N - (config.n_local - 1)])).to(dtype)

    for s in signals:
        for depth in args.depths:
            for trial in range(args.trials):
                unit = min(K - 1, max(0, round(depth * (K - 1))))
                blk = config.init_blocks + unit
                saved_kv, saved_scores = kv[blk].clone(), memory.scores[blk].clone()
                g = torch.nn.functional.normalize(torch.randn(Hkv, D, generator=gen), dim=-1)
                vstar = torch.nn.functional.normalize(torch.randn(Hkv, D, generator=gen), dim=-1)
                off = int(torch.randint(0, B - args.needle_tokens + 1, (1,), generator=gen))
                idx = torch.arange(off, off + args.needle_tokens)
                pos = blk * B + idx
                k_raw = torch.randn(len(idx), Hkv, D, generator=gen) + s * math.sqrt(D) * g[None]
                kv[blk, :, idx, :D] = rotate(k_raw, cos, sin, pos).transpose(0, 1).to(dtype)
                kv[blk, :, idx, D:] = (math.sqrt(D) * vstar[:, None, :]).expand(Hkv, len(idx), D).to(dtype)
                if args.score_mode == "needle":
                    memory.scores[blk, :, idx] = 2.0 + torch.rand(Hq, len(idx), generator=gen)
                memory.sealed[blk] = False
                seal_all(kv, memory, block_table, config, cos, sin, K)

                q = decode_query(g)
                k_new = torch.randn(1, Hkv, D, generator=gen)
                v_new = torch.randn(1, Hkv, D, generator=gen)
                torch_ops.write_kv(kv, rotate(k_new, cos, sin, torch.tensor([N])), v_new, slot, memory)
                plan = plan_step([0, 1], [N + 1], config)
                wave = plan.waves[0]
                torch_ops.seal_units(kv, memory, block_table, wave, cos, sin, config)
                if config.unit_score == "exact":  # every key scored
                    selected = torch_ops.select_units_exact(q, kv, block_table, wave, cos, sin, config, Hkv)
                else:
                    selected = torch_ops.select_units(q, memory, block_table, wave, cos, sin, config, Hkv)
                out = torch.zeros(1, Hq, D, dtype=dtype)
                torch_ops.attend(q, kv, memory, block_table, wave, selected, cos, sin, config, D**-0.5, out)
                hit = bool((selected[0] == unit).any(-1).all())  # in every selection group's set
                out_cos = torch.nn.functional.cosine_similarity(out[0].float(), vstar[kv_head], dim=-1).mean()
                records.append({"length": N, "signal": s, "depth": depth, "trial": trial, "unit": unit,
                                "num_units": K, "found": hit, "out_cos": round(float(out_cos), 3)})
                kv[blk], memory.scores[blk] = saved_kv, saved_scores  # restore the haystack
                memory.sealed[blk] = False
                seal_all(kv, memory, block_table, config, cos, sin, K)

    # time per decode step (last planted state restored: a plain haystack)
    q = decode_query(torch.nn.functional.normalize(torch.randn(Hkv, D, generator=gen), dim=-1))
    k_new = rotate(torch.randn(1, Hkv, D, generator=gen), cos, sin, torch.tensor([N]))
    v_new = torch.randn(1, Hkv, D, generator=gen)
    out = torch.zeros(1, Hq, D, dtype=dtype)
    times = []
    ops = getattr(args, "ops", None) or torch_ops  # the op module timed (mode_cost.py's --ops)
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        ops.write_kv(kv, k_new, v_new, slot, memory)
        plan = plan_step([0, 1], [N + 1], config)
        infllm_forward(q, kv, block_table, plan, memory, cos, sin, config, D**-0.5, out, ops=ops)
        times.append(time.perf_counter() - t)
    infllm_ms = statistics.median(times[1:]) * 1e3
    # dense baseline: one query over all N+1 keys, contiguous K/V in the cache dtype
    Kd = kv[..., :D].transpose(0, 1).reshape(Hkv, nb * B, D)[:, : N + 1][None].contiguous()
    Vd = kv[..., D:].transpose(0, 1).reshape(Hkv, nb * B, D)[:, : N + 1][None].contiguous()
    qd = q.transpose(0, 1)[None]  # [1, Hq, 1, D]
    dtimes = []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(qd, Kd, Vd, enable_gqa=True)
        dtimes.append(time.perf_counter() - t)
    dense_ms = statistics.median(dtimes[1:]) * 1e3
    del Kd, Vd
    timing = {"length": N, "num_units": K, "infllm_step_ms": round(infllm_ms, 2), "dense_sdpa_ms": round(dense_ms, 2),
              "build_seconds": round(build_s, 1), "kv_cache_mib": round(kv.numel() * kv.element_size() / 2**20, 1),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    return records, timing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--trials", type=int, default=4, help="trials per (length, signal, depth)")
    ap.add_argument("--signals", type=float, nargs="+", default=[0.1, 0.2],
                    help="needle key strength s: raw key = noise + s*sqrt(D)*g")
    ap.add_argument("--needle-tokens", type=int, default=8)
    ap.add_argument("--score-mode", choices=["needle", "random"], default="needle")
    ap.add_argument("--heads-q", type=int, default=8)
    ap.add_argument("--heads-kv", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rope-base", type=float, default=1e5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--infllm-config", default="{}", help="JSON; default: package defaults")
    ap.add_argument("--steps", type=int, default=5, help="timed decode steps (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 = what vLLM's CPU worker uses; on a shared machine more "
                    "threads than free cores make the many small ops of a decode step 10-30x slower)")
    ap.add_argument("--out", default="benchmarks/results/ops_needle")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tqdm import tqdm

    from vllm_infllm.core.config import InfLLMConfig

    config = InfLLMConfig.from_dict(json.loads(args.infllm_config))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    started = time.time()
    records, timings = [], []
    for N in tqdm(args.lengths, desc="lengths", file=sys.stderr):
        r, t = run_length(N, args, config, gen, args.signals)
        records += r
        timings.append(t)
        found = {s: sum(x["found"] for x in r if x["signal"] == s) for s in args.signals}
        tqdm.write(f"N={N}: units={t['num_units']} recall " + ", ".join(
            f"s={s}: {found[s]}/{len(args.depths) * args.trials}" for s in args.signals)
            + f"; step {t['infllm_step_ms']} ms vs dense {t['dense_sdpa_ms']} ms; build {t['build_seconds']} s",
            file=sys.stderr)
    meta = {
        "command": "python benchmarks/ops/needle.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "infllm_config": config.to_dict(),
        "geometry": {"heads_q": args.heads_q, "heads_kv": args.heads_kv, "head_dim": args.head_dim,
                     "dtype": args.dtype, "needle_tokens": args.needle_tokens, "score_mode": args.score_mode},
        "total_seconds": round(time.time() - started, 1),
    }
    summary = []
    for t in timings:
        for s in args.signals:
            rs = [x for x in records if x["length"] == t["length"] and x["signal"] == s]
            recall = round(sum(x["found"] for x in rs) / len(rs), 3)
            summary.append({"length": t["length"], "signal": s, "recall": recall,
                            "trials": len(rs), "mean_out_cos_found": round(statistics.mean(
                                [x["out_cos"] for x in rs if x["found"]] or [float("nan")]), 3),
                            "mean_out_cos_missed": round(statistics.mean(
                                [x["out_cos"] for x in rs if not x["found"]] or [float("nan")]), 3)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "timings": timings, "summary": summary, "records": records}, indent=1) + "\n")
    lines = [f"# ops-level synthetic needle\n\n`{meta['command']}` ({meta['date']}, {meta['machine']}, "
             f"torch {meta['torch']}, {meta['threads']} threads)\n",
             f"InfLLM config {json.dumps(meta['infllm_config'])}; {json.dumps(meta['geometry'])}\n",
             "| context | units | signal s | recall (planted unit in top-k) | out·v* cos (found / missed) |",
             "|---|---|---|---|---|"]
    for x in summary:
        K = next(t["num_units"] for t in timings if t["length"] == x["length"])
        lines.append(f"| {x['length']} | {K} | {x['signal']} | {x['recall']:.2f} ({x['trials']} trials) | "
                     f"{_cell(x['mean_out_cos_found'])} / {_cell(x['mean_out_cos_missed'])} |")
    lines += ["", "| context | InfLLM decode step (ms) | dense SDPA, 1 query (ms) | cache MiB | build s "
              "| peak RSS GiB |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {t['length']} | {t['infllm_step_ms']} | {t['dense_sdpa_ms']} | {t['kv_cache_mib']} | "
              f"{t['build_seconds']} | {t['peak_rss_gib']} |" for t in timings]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
