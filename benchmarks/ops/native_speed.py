"""Decode attention per token on the CPU: the native kernels vs the torch ops, and the bytes floor.

    python -m benchmarks.ops.native_speed --out benchmarks/results/native_speed

No model and no vLLM: SmolLM2's attention geometry (30 layers, 9 query / 3 KV heads, head dim 64,
fp32 cache, 128-token blocks), each layer its own paged cache and side state (so the K/V a step
reads is not left in the CPU caches by the layer before, as in a real model), every unit sealed.
One decode step of one request = `plan_step` + `infllm_forward` over all 30 layers, run the way
the runtime runs it in vLLM (a decode step's torch ops on one thread; the native kernels on all of
the process's threads). Per context and config it reports, in the same invocation:

  * ms per decoded token (median of --steps) with the torch ops and with the native kernels;
  * the attended bytes per token: K/V of the whole blocks attended (init, local window, selected
    units, remainder) plus the representatives read and the fp32 scores read and written,
    counted from the geometry (`mode_cost.bytes_per_query`) times 30 layers;
  * the bytes floor: those bytes at the memory bandwidth measured here by a copy (a 1 GiB fp32
    tensor summed by torch with the same threads; the best of 5), and how far each path is from it.

With --offload it also times the native kernels with every unit `offloadable_units` allows in a
`UnitStore` (core/offload.py; the slot table built once per step, as the adapter will): the cost
of reading selected units and their representatives from the store instead of the pool, and it
checks the outputs are bitwise the same.

Configs: the package defaults at 4K (n_local 4096: every context up to 4224 tokens is exactly
dense attention) and n_local 1024 / topk 4 (the passkey ablation's 1664-key budget) beyond.
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

from benchmarks.ops.mode_cost import bytes_per_query
from vllm_infllm.core.config import InfLLMConfig
from vllm_infllm.core.offload import UnitStore, offloadable_units
from vllm_infllm.core.ops import native, native_ops, torch_ops
from vllm_infllm.core.plan import LayerMemory, plan_step
from vllm_infllm.core.rope import rope_table
from vllm_infllm.core.runtime import infllm_forward

LAYERS, HQ, HKV, D, B = 30, 9, 3, 64, 128
CASES = {"4K default": (4096, {}), "32K 1024/4": (32768, {"n_local": 1024, "topk": 4}),
         "128K 1024/4": (131072, {"n_local": 1024, "topk": 4})}


def bandwidth_gbs() -> float:
    """Read bandwidth of this machine with the process's threads: GB/s summing a 1 GiB tensor."""
    x = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def decode_ms(N: int, config: InfLLMConfig, ops, steps: int, gen: torch.Generator,
              offload: bool = False) -> tuple[float, torch.Tensor, int]:
    """Median ms per decoded token, the last step's output, and the units in the store."""
    nb = N // B + 2
    caches = [torch.randn(nb, HKV, B, 2 * D, generator=gen) for _ in range(LAYERS)]
    mems = []
    for _ in range(LAYERS):
        m = LayerMemory.allocate(nb, HQ, D, B, torch.float32, "cpu", config.repr_rows(HQ, HKV, 4),
                                 config.chosen_shape(HKV))
        m.reprs.normal_(generator=gen)
        m.sealed.fill_(True)
        mems.append(m)
    table = torch.randperm(nb, generator=gen).to(torch.int32)[None]
    cos, sin = rope_table(D, N + 16)
    q = torch.randn(1, HQ, D, generator=gen)
    out = torch.zeros(1, HQ, D)
    store, E = None, 0
    if offload:  # the units a block manager would have freed after N - 1 tokens
        E = offloadable_units(N - 1, N, config)
        store = UnitStore(LAYERS, HKV, B, D, config.repr_rows(HQ, HKV, 4), torch.float32)
        logical = list(range(config.init_blocks, config.init_blocks + E))
        slots = store.allocate(0, logical)
        for layer in range(LAYERS):
            store.write(layer, slots, caches[layer], mems[layer].reprs, table[0, logical].tolist())
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        plan = plan_step([0, 1], [N], config)
        slot_table = None if store is None else store.slot_table([0], table.shape[1])
        for layer in range(LAYERS):
            view = None if store is None else store.view(layer, slot_table)
            infllm_forward(q, caches[layer], table, plan, mems[layer], cos, sin, config, D**-0.5, out, ops=ops,
                           store=view)
        if step:  # the first step warms allocations up
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3, out.clone(), E


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=9, help="timed decode steps per path (median)")
    ap.add_argument("--offload", action="store_true",
                    help="also time the native kernels reading offloaded units from a UnitStore")
    ap.add_argument("--out", default="benchmarks/results/native_speed")
    args = ap.parse_args(argv)
    native.load()  # fails loudly here if the kernels cannot be built
    started = time.time()
    gbs = bandwidth_gbs()
    rows = []
    for name in args.cases:
        N, knobs = CASES[name]
        config = InfLLMConfig.from_dict(knobs)
        b = bytes_per_query(N, config, HQ, HKV, D, 4)
        total = b["total_bytes"] * LAYERS
        floor_ms = total / (gbs * 1e9) * 1e3
        row = {"case": name, "length": N, "config": config.to_dict(), "bytes_per_token": total,
               "floor_ms": round(floor_ms, 2)}
        for label, ops in (("torch", torch_ops), ("native", native_ops)):
            ms, ref, _ = decode_ms(N, config, ops, args.steps, torch.Generator().manual_seed(0))
            row[f"{label}_ms"] = round(ms, 2)
        if args.offload:
            ms, got, units = decode_ms(N, config, native_ops, args.steps, torch.Generator().manual_seed(0), True)
            if not torch.equal(got, ref):
                raise SystemExit(f"{name}: the outputs with units in the store differ from the pool's")
            row.update(native_store_ms=round(ms, 2), store_units=units,
                       store_over_pool=round(ms / row["native_ms"], 2))
        row["speedup"] = round(row["torch_ms"] / row["native_ms"], 2)
        row["native_over_floor"] = round(row["native_ms"] / floor_ms, 2)
        rows.append(row)
        print(f"{name}: torch {row['torch_ms']} ms, native {row['native_ms']} ms (x{row['speedup']}), "
              f"floor {row['floor_ms']} ms ({total / 2**20:.0f} MiB at {gbs:.1f} GB/s)"
              + (f", native with {row['store_units']} units in a store {row['native_store_ms']} ms"
                 if args.offload else ""), file=sys.stderr)
    meta = {
        "command": "python -m benchmarks.ops.native_speed " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "bandwidth_gbs": round(gbs, 2),
        "native_flags": " ".join(native.cflags()), "total_seconds": round(time.time() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# decode attention per token: native kernels vs torch ops\n\n`{meta['command']}` ({meta['date']}, "
             f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, native {meta['native_flags']})\n",
             f"{LAYERS} layers, Hq {HQ} / Hkv {HKV} / D {D}, fp32 cache; read bandwidth measured in the same run: "
             f"{meta['bandwidth_gbs']} GB/s.\n",
             "| case | torch ops ms/token | native ms/token | speed-up | attended MiB/token | bytes floor ms "
             "| native / floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['torch_ms']} | {r['native_ms']} | {r['speedup']}x | "
                     f"{r['bytes_per_token'] / 2**20:.1f} | {r['floor_ms']} | {r['native_over_floor']}x |")
    if args.offload:
        lines += ["", "Native kernels with the offloadable units in a UnitStore (outputs bitwise the pool's):", "",
                  "| case | units in the store | pool ms/token | store ms/token | store / pool |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['store_units']} | {r['native_ms']} | {r['native_store_ms']} | "
                  f"{r['store_over_pool']}x |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
