"""Offload in the engine: the same answers with memory units in the worker's store, under a KV
budget that cannot hold the request, and what it costs (SmolLM2 through vLLM's offline `LLM`).

    python benchmarks/engine/offload.py --cases 32000 131000 --runs off:8 on:0.5 off:0.5 \
        --decode-tokens 32 --out benchmarks/results/offload

Each run is `MODE:GIB`, in its own subprocess of this invocation (clean peak RSS), one after the
other, on the same prompts: MODE `off` is InfLLM as configured (--infllm-config), `on` the same
with `"offload": --offload` added; GIB is the KV budget (`kv_cache_memory_bytes`). A run whose
engine cannot start (no offload under a budget smaller than one request) records vLLM's error:
that is the point of such a run.

Per case (one passkey prompt of L tokens, needle at --depth, greedy, ignore_eos, ONE generate
of N+1 tokens, prefix caching on as vLLM's default): the generated token ids (compared across
runs: `same_ids`), whether the passkey was found, prefill and decode time from vLLM's
per-request timestamps (as speed.py), and the block manager's and the store's own counts: the
most pool blocks the request held and the cap, units offloaded, units in the store at the end
and their bytes, unit reads and the share read from the pool (the cache's hit rate), and that
the store is empty after the next step. Engine start and a short warm-up are excluded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def parse_run(s: str) -> tuple[str, float]:
    mode, _, gib = s.partition(":")
    if mode not in ("on", "off") or not gib:
        raise argparse.ArgumentTypeError(f"--runs {s!r}: use MODE:GIB with MODE on or off, e.g. on:0.5")
    return mode, float(gib)


def worker(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the counts are read in process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_infllm.adapter import offload
    from vllm_infllm.tools.assets import default_model_dir
    from vllm_infllm.tools.passkey import make_passkey_prompt

    model = args.model or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    mode, gib = parse_run(args._worker)
    cfg = json.loads(args.infllm_config)
    if mode == "on":
        cfg["offload"] = json.loads(args.offload)
    N = args.decode_tokens
    kw = dict(model=model, enforce_eager=True, dtype=args.dtype, attention_backend="infllm",
              additional_config={"infllm": cfg}, max_model_len=max(args.cases) + N + 8,
              kv_cache_memory_bytes=int(gib * 2**30), disable_log_stats=False)
    info = {"run": args._worker, "engine_kwargs": {k: v for k, v in kw.items() if k != "model"}}
    t0 = time.time()
    try:
        llm = LLM(**kw)
    except Exception as e:  # the budget cannot hold one request: vLLM says so at start-up
        info["start_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:400]}"
        return {"info": info, "results": []}
    info["engine_start_seconds"] = round(time.time() - t0, 1)
    core = llm.llm_engine.engine_core.engine_core
    mgrs = [m for m in core.scheduler.kv_cache_manager.coordinator.single_type_managers if hasattr(m, "peak_held")]
    info["kv_cache_blocks"] = core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks
    info["cap_blocks"] = mgrs[0].max_admission_blocks_per_request if mode == "on" else None
    warm = make_passkey_prompt(tok, 600, 0.5, seed=99).text
    llm.generate([warm], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)

    results = []
    for L in args.cases:
        p = make_passkey_prompt(tok, L, args.depth, seed=args.seed)
        for m in mgrs:
            m.peak_held = 0
        store = offload.WORKER.store
        before = (list(offload.WORKER.unit_reads.flush()), 0 if store is None else store.units_offloaded_total)
        sp = SamplingParams(max_tokens=N + 1, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        out = llm.generate([p.text], sp, use_tqdm=False)[0]
        wall = time.perf_counter() - t
        m = out.metrics
        t_prefill = m.first_token_ts - m.scheduled_ts
        t_decode = m.last_token_ts - m.first_token_ts
        reads = [a - b for a, b in zip(list(offload.WORKER.unit_reads.flush()), before[0], strict=True)]
        rec = {
            "length": p.num_tokens, "depth": args.depth, "ids": list(out.outputs[0].token_ids),
            "found": p.is_correct(out.outputs[0].text), "text": out.outputs[0].text[:40],
            "t_prefill_s": round(t_prefill, 2), "prefill_tok_s": round(p.num_tokens / t_prefill, 1),
            "t_decode_s": round(t_decode, 3), "decode_ms_per_token": round(1000 * t_decode / N, 1),
            "t_generate_wall_s": round(wall, 2),
        }
        if mode == "on":
            rec.update(
                peak_held_blocks=max(x.peak_held for x in mgrs),
                units_offloaded=store.units_offloaded_total - before[1],
                store_units_at_end=store.num_units,
                store_gib_at_end=round(store.num_units * store.unit_nbytes / 2**30, 3),
                store_slab_gib_at_end=round(store.nbytes / 2**30, 3),
                unit_reads=reads[0], store_reads=reads[1],
                pool_hit_rate=round(1 - reads[1] / reads[0], 3) if reads[0] else None,
            )
            llm.generate(["hello"], SamplingParams(max_tokens=1), use_tqdm=False)  # drops the request's units
            rec["store_units_after_next_step"] = store.num_units
        rec["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        print(f"[{args._worker}] {p.num_tokens}: prefill {t_prefill:.1f} s, decode {rec['decode_ms_per_token']} "
              f"ms/token, found={rec['found']}", file=sys.stderr, flush=True)
        results.append(rec)
    return {"info": info, "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", type=int, default=[32000], help="prompt lengths (tokens)")
    ap.add_argument("--runs", nargs="+", default=["off:4", "on:0.5"], help="MODE:GIB, MODE on or off")
    ap.add_argument("--depth", type=float, default=0.5, help="the needle's depth in the filler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-tokens", type=int, default=32, help="N: decode tokens timed")
    ap.add_argument("--infllm-config", default='{"n_local": 1024, "topk": 4}')
    ap.add_argument("--offload", default="{}", help="the offload entry of the `on` runs (JSON)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results/offload", help="output prefix (.json, .md)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for r in args.runs:
        parse_run(r)

    if args._worker:
        Path(args._result).write_text(json.dumps(worker(args)))
        return 0

    raw = sys.argv[1:] if argv is None else list(argv)
    started = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in args.runs:
        res_path = out.with_name(out.name + f".{name.replace(':', '_')}.worker.json")
        cmd = [sys.executable, __file__, *raw, "--_worker", name, "--_result", str(res_path)]
        t = time.time()
        p = subprocess.run(cmd, stdout=None if os.environ.get("OFFLOAD_VERBOSE") else subprocess.DEVNULL)
        if p.returncode != 0 or not res_path.exists():
            runs[name] = {"info": {"run": name, "error": f"worker exited {p.returncode}"}, "results": []}
        else:
            runs[name] = json.loads(res_path.read_text())
            res_path.unlink()
        runs[name]["info"]["wall_seconds"] = round(time.time() - t, 1)

    first = next((r for r in runs.values() if r["results"]), None)
    for run in runs.values():  # the same tokens as the first run that ran?
        for i, rec in enumerate(run["results"]):
            rec["same_ids"] = rec["ids"] == first["results"][i]["ids"]
    meta = {
        "command": "python benchmarks/engine/offload.py " + " ".join(raw),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "infllm_config": json.loads(args.infllm_config), "offload": json.loads(args.offload),
        "total_seconds": round(time.time() - started, 1),
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    lines = [f"# offload\n\n`{meta['command']}` ({meta['date']}, {meta['machine']})\n",
             "| run | KV blocks (cap) | context | found | same ids | prefill s | decode ms/token | peak pool blocks "
             "| units offloaded | store at end GiB | pool hit rate | store after next step | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        i = run["info"]
        if "start_error" in i or "error" in i:
            lines.append(f"| {name} | — | — | engine did not start: {i.get('start_error') or i['error']} "
                         "| | | | | | | | | |")
            continue
        for r in run["results"]:
            lines.append(
                f"| {name} | {i['kv_cache_blocks']} ({i['cap_blocks'] or '—'}) | {r['length']} | {r['found']} | "
                f"{r['same_ids']} | {r['t_prefill_s']} | {r['decode_ms_per_token']} | "
                f"{r.get('peak_held_blocks', '—')} | "
                f"{r.get('units_offloaded', '—')} | {r.get('store_gib_at_end', '—')} | {r.get('pool_hit_rate', '—')} | "
                f"{r.get('store_units_after_next_step', '—')} | {r['peak_rss_gib']} |")
    lines += ["", "InfLLM config: " + json.dumps(meta["infllm_config"]) + "; offload: " + json.dumps(meta["offload"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
