"""What each selection mode costs per decode step: ops-level time and bytes read per query.

    python -m benchmarks.ops.mode_cost --lengths 32768 131072 --out benchmarks/results/mode_cost
    python -m benchmarks.ops.mode_cost --ops native --out benchmarks/results/mode_cost_native

No model and no vLLM: one attention layer with SmolLM2's geometry (9 query / 3 KV heads, head
dim 64, fp32 cache) driven through the vLLM-free runtime exactly as `benchmarks/ops/needle.py`
does it (the context written straight into the paged cache, every unit sealed, a synthetic
needle of signal 0.2 planted at a few depths), once per mode of docs/design.md section 2.7 over
the same base config (n_local 1024, topk 4: the passkey ablation's 1664-key budget).

Per mode and context it reports
  * step ms: median time of one decode step (write_kv + plan_step + infllm_forward: seal,
    select, attend) on the torch ops (`--ops native`: the native kernels), 1 thread, and the
    dense SDPA of the same query over all keys, measured in the same invocation;
  * bytes per query, counted from the geometry (not measured): K/V of the whole blocks attended
    (init, local window, selected units, remainder), the representatives the selection reads
    (K candidates x rows x D; "exact": the keys of every candidate, K x B x Hkv x D, in the
    same column; "sketch": the box rows and the 4-bit codes, K x (2 Hkv D elements + B Hkv D/2
    bytes)), and the fp32 representative scores of the local keys read and
    written (the paper's representatives only; "minmax" needs none);
  * recall of the planted unit (as needle.py; a sanity check, not a retrieval benchmark).
`select_queries` only changes prefill chunks (a decode step has one query): not listed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

MODES = {
    "paper": {},
    "minmax": {"unit_score": "minmax"},
    "kv_head": {"selection": "kv_head"},
    "ordered": {"positions": "ordered"},
    "contiguity 1": {"contiguity": 1},
    "minmax + contiguity 1": {"unit_score": "minmax", "contiguity": 1},
    "minmax + ordered": {"unit_score": "minmax", "positions": "ordered"},
    # every key scored: a layer of unit_score "exact", or the retrieval layer (retrieval_layer);
    # the layers above a retrieval layer score nothing (their step is the attend alone)
    "exact + ordered": {"unit_score": "exact", "positions": "ordered"},
    # the exact score of 4-bit key sketches stored at sealing (box + codes)
    "sketch + ordered": {"unit_score": "sketch", "positions": "ordered"},
}
BASE = {"n_local": 1024, "topk": 4}


def bytes_per_query(N: int, config, Hq: int, Hkv: int, D: int, elem: int) -> dict:
    """Bytes one decode query at position N reads, per layer, from the geometry."""
    B = config.block_size
    w = config.window_start(N)
    K = config.num_candidates(N)
    local_blocks = N // B - w // B + 1
    rem = max(0, w - (config.n_init + K * B))
    blocks = config.init_blocks + local_blocks + min(K, config.topk) + -(-rem // B)
    kv = blocks * Hkv * B * 2 * D * elem
    reprs = K * config.repr_rows(Hq, Hkv, elem) * D * elem if K > config.topk else 0
    if config.unit_score == "exact" and K > config.topk:  # every candidate's keys instead
        reprs = K * B * Hkv * D * elem
    scores = 2 * local_blocks * Hq * B * 4 if config.accumulates_scores else 0
    keys = config.n_init + (N - w + 1) + min(K, config.topk) * B + rem
    return {"attended_keys": keys, "kv_bytes": kv, "repr_bytes": reprs, "score_bytes": scores,
            "total_bytes": kv + reprs + scores}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--steps", type=int, default=9, help="timed decode steps (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", choices=["torch", "native"], default="torch",
                    help="the op module timed (the selection and recall checks use the torch ops either way)")
    ap.add_argument("--out", default="benchmarks/results/mode_cost")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # what vLLM's CPU worker gives the decode ops here

    from benchmarks.ops import needle
    from vllm_infllm.core.config import InfLLMConfig

    geo = argparse.Namespace(head_dim=64, heads_q=9, heads_kv=3, rope_base=1e5, dtype="float32",
                             depths=[0.1, 0.5, 0.9], trials=1, needle_tokens=8, score_mode="needle",
                             steps=args.steps, ops=None)
    if args.ops == "native":
        from vllm_infllm.core.ops import native_ops

        geo.ops = native_ops
    elem = 4
    rows, started = [], time.time()
    for N in args.lengths:
        for name in args.modes:
            config = InfLLMConfig.from_dict({**BASE, **MODES[name]})
            gen = torch.Generator().manual_seed(args.seed)  # the same haystack for every mode
            records, timing = needle.run_length(N, geo, config, gen, [0.2])
            b = bytes_per_query(N, config, geo.heads_q, geo.heads_kv, geo.head_dim, elem)
            row = {"length": N, "mode": name, "config": config.to_dict(), **b,
                   "step_ms": timing["infllm_step_ms"], "dense_ms": timing["dense_sdpa_ms"],
                   "found": sum(r["found"] for r in records), "trials": len(records)}
            rows.append(row)
            print(f"N={N} {name}: {row['step_ms']} ms (dense {row['dense_ms']} ms), "
                  f"{row['total_bytes'] / 1024:.0f} KiB/query, found {row['found']}/{row['trials']}",
                  file=sys.stderr)
    meta = {
        "command": "python -m benchmarks.ops.mode_cost " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__, "threads": 1, "ops": args.ops, "base": BASE,
        "geometry": {k: v for k, v in vars(geo).items() if k != "ops"},
        "total_seconds": round(time.time() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# cost of each selection mode per decode step\n\n`{meta['command']}` ({meta['date']}, "
             f"{meta['machine']}, torch {meta['torch']}, {args.ops} ops, 1 thread)\n",
             f"Base config {json.dumps(BASE)}; one layer, Hq 9 / Hkv 3 / D 64, fp32 cache.\n",
             "| context | mode | step ms | dense SDPA ms | keys/query | K/V KiB | reprs KiB | scores KiB "
             "| total KiB/query | planted unit found |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['length']} | {r['mode']} | {r['step_ms']} | {r['dense_ms']} | {r['attended_keys']} | "
                     f"{r['kv_bytes'] / 1024:.0f} | {r['repr_bytes'] / 1024:.0f} | {r['score_bytes'] / 1024:.0f} | "
                     f"{r['total_bytes'] / 1024:.0f} | {r['found']}/{r['trials']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
