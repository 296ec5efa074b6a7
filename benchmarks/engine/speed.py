"""Prefill and decode throughput of SmolLM2 through vLLM's offline `LLM`: InfLLM vs CPU_ATTN.

    python benchmarks/engine/speed.py --cases 4000x1 8000x1 2000x8 --decode-tokens 64 \
        --out benchmarks/results/speed

Each configuration runs in its own subprocess of this invocation (one engine, clean peak RSS),
one after the other, on the same prompts:

  infllm    attention_backend="infllm", additional_config {"infllm": --infllm-config}
            (default {"n_local": 1024, "topk": 4}; other knobs = package defaults: n_init
            128, block 128, repr_topk 4, chunk 512, and the selection rule, since 2026-12-07
            the sketch with "ordered" positions, the paper's rule before: results files
            older than that ran the paper's rule)
  cpu_attn  vLLM's own CPU attention backend (no attention_backend argument), max_model_len
            8192: SmolLM2's RoPE table ends at 8192, so cases with prompt + new tokens > 8192 are
            SKIPPED, unless --cpu-attn-long, which raises the table with
            hf_overrides={"max_position_embeddings": N} (what the plugin does for InfLLM); the
            run then checks that the sampled logprobs are finite and records `nan` if not.

Measurement, per case LxB (B prompts of L tokens: passkey prompts with distinct keys), prefix
caching OFF, greedy, ignore_eos, ONE generate(max_tokens=N+1) per case (a 32K prefill on CPU_ATTN
takes minutes; it is not repeated). From vLLM's per-request engine-core timestamps:
  prefill tokens/s = B*L / (last first_token_ts - first scheduled_ts)
  decode tokens/s  = B*N / (last last_token_ts - last first_token_ts)
The wall time of the generate call is recorded beside them as a cross-check. Engine start and a
short warm-up generate are excluded. Also recorded: the engine's KV-cache capacity, and peak RSS
of the worker process (resource.getrusage ru_maxrss, which includes the pre-allocated KV cache,
VLLM_CPU_KVCACHE_SPACE GiB, once touched).
Ratios are infllm / cpu_attn.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

FULL_MAX_LEN = 8192


def parse_case(s: str) -> tuple[int, int]:
    L, _, B = s.lower().partition("x")
    return int(L), int(B or 1)


def infllm_configs(args) -> dict[str, dict]:
    """Run names of the --infllm-config values: infllm, infllm2, infllm3, ...; with several
    --cpu-kernels, one run per config and kernel (infllm@native, infllm@torch, ...)."""
    runs = {}
    for i, c in enumerate(args.infllm_config):
        base = "infllm" if i == 0 else f"infllm{i + 1}"
        for k in args.cpu_kernels or [None]:
            runs[base if k is None or len(args.cpu_kernels) == 1 else f"{base}@{k}"] = json.loads(c)
    return runs


def kernel_of(args, name: str) -> str | None:
    """The VLLM_INFLLM_CPU_KERNEL of an infllm run (None: the environment's)."""
    if not args.cpu_kernels:
        return None
    return name.partition("@")[2] or args.cpu_kernels[0]


def worker(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_infllm.tools.assets import default_model_dir
    from vllm_infllm.tools.passkey import make_passkey_prompt

    model = args.model or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    cases = [parse_case(c) for c in args.cases]
    N = args.decode_tokens
    name = args._worker
    longest = max(L for L, _ in cases) + N + 8
    kw = dict(model=model, enforce_eager=True, dtype=args.dtype, enable_prefix_caching=False,
              max_num_seqs=max(B for _, B in cases), disable_log_stats=False)
    if name.startswith("infllm"):
        if kernel_of(args, name):
            os.environ["VLLM_INFLLM_CPU_KERNEL"] = kernel_of(args, name)
        kw.update(attention_backend="infllm", additional_config={"infllm": infllm_configs(args)[name]},
                  max_model_len=max(FULL_MAX_LEN, longest))
        limit = kw["max_model_len"]
    elif args.cpu_attn_long and longest > FULL_MAX_LEN:
        kw.update(max_model_len=longest, hf_overrides={"max_position_embeddings": longest})
        limit = longest
    else:
        kw.update(max_model_len=FULL_MAX_LEN)
        limit = FULL_MAX_LEN
    t0 = time.time()
    llm = LLM(**kw)
    start_s = time.time() - t0
    info = {"config": name, "engine_kwargs": {k: v for k, v in kw.items() if k != "model"},
            "cpu_kernel": os.environ.get("VLLM_INFLLM_CPU_KERNEL", "auto") if name.startswith("infllm") else None,
            "engine_start_seconds": round(start_s, 1)}
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        sc = llm.llm_engine.vllm_config.scheduler_config
        info["kv_cache_blocks"] = cc.num_gpu_blocks
        info["kv_block_size"] = cc.block_size
        info["max_num_batched_tokens"] = sc.max_num_batched_tokens
    except Exception as e:  # pragma: no cover - introspection only
        info["introspection_error"] = repr(e)
    # warm-up: one short request (first-call costs out of the measurement)
    warm = make_passkey_prompt(tok, 600, 0.5, seed=99).text
    llm.generate([warm], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)

    results = []
    for L, B in cases:
        rec = {"config": name, "length": L, "batch": B, "decode_tokens": N}
        if L + N + 1 > limit:
            rec["skipped"] = f"{name}: prompt {L} + {N + 1} new tokens > max_model_len {limit}"
            results.append(rec)
            continue
        prompts = [make_passkey_prompt(tok, L, 0.5, seed=1000 + i) for i in range(B)]
        texts = [p.text for p in prompts]
        ntok = sum(p.num_tokens for p in prompts)
        spN = SamplingParams(max_tokens=N + 1, temperature=0, ignore_eos=True, logprobs=1)
        t = time.perf_counter()
        outs = llm.generate(texts, spN, use_tqdm=False)
        T = time.perf_counter() - t
        gen = [len(o.outputs[0].token_ids) for o in outs]
        finite = all(
            all(math.isfinite(lp[tid].logprob)
                for tid, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs or [], strict=False))
            for o in outs
        )
        m = [o.metrics for o in outs]
        if any(x is None or not getattr(x, "last_token_ts", 0) for x in m):
            raise RuntimeError("vLLM returned no per-request timestamps; run without disable_log_stats")
        corrupted = any(getattr(x, "is_corrupted", False) for x in m)
        t_prefill = max(x.first_token_ts for x in m) - min(x.scheduled_ts for x in m)
        t_decode = max(x.last_token_ts for x in m) - max(x.first_token_ts for x in m)
        rec.update(
            prompt_tokens=ntok, generated=gen, t_prefill_s=round(t_prefill, 3), t_decode_s=round(t_decode, 3),
            t_generate_wall_s=round(T, 3),
            prefill_tok_s=round(ntok / t_prefill, 1),
            decode_tok_s=round(B * N / t_decode, 3) if t_decode > 0 else None,
            logprobs_finite=finite and not corrupted,
            sample_text=outs[0].outputs[0].text[:60],
            peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        )
        print(f"[{name}] {L}x{B}: prefill {rec['prefill_tok_s']} tok/s ({t_prefill:.1f} s), "
              f"decode {rec['decode_tok_s']} tok/s ({t_decode:.1f} s for {N} tokens), "
              f"finite={rec['logprobs_finite']}", file=sys.stderr, flush=True)
        results.append(rec)
    info["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return {"info": info, "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["4000x1", "8000x1"],
                    help="LENGTHxBATCH, e.g. 4000x1 8000x1 2000x8")
    ap.add_argument("--decode-tokens", type=int, default=64, help="N: decode tokens timed")
    ap.add_argument("--configs", nargs="+", choices=["infllm", "cpu_attn"], default=["infllm", "cpu_attn"])
    ap.add_argument("--infllm-config", nargs="+", default=['{"n_local": 1024, "topk": 4}'],
                    help="one or more InfLLM configs (JSON); runs are named infllm, infllm2, ...")
    ap.add_argument("--cpu-kernels", nargs="+", choices=["native", "torch"], default=None,
                    help="VLLM_INFLLM_CPU_KERNEL of the infllm runs; several: one run each (default: the env's)")
    ap.add_argument("--cpu-attn-long", action="store_true",
                    help="run CPU_ATTN beyond 8192 with hf_overrides max_position_embeddings")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results/speed", help="output prefix (.json, .md)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        res = worker(args)
        Path(args._result).write_text(json.dumps(res))
        return 0

    from tqdm import tqdm

    raw = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    started = time.time()
    runs = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [n for c in args.configs for n in (infllm_configs(args) if c == "infllm" else [c])]
    for name in tqdm(names, desc="configs", file=sys.stderr):
        res_path = out.with_name(out.name + f".{name}.worker.json")
        cmd = [sys.executable, __file__, *raw, "--_worker", name, "--_result", str(res_path)]
        t = time.time()
        p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if not os.environ.get("SPEED_VERBOSE") else None)
        if p.returncode != 0 or not res_path.exists():
            runs[name] = {"info": {"config": name, "error": f"worker exited {p.returncode}"}, "results": []}
        else:
            runs[name] = json.loads(res_path.read_text())
            res_path.unlink()
        runs[name]["info"]["wall_seconds"] = round(time.time() - t, 1)

    ratios = []
    base = {(r["length"], r["batch"]): r for r in runs.get("cpu_attn", {}).get("results", []) if "prefill_tok_s" in r}
    for name in [n for n in runs if n.startswith("infllm")]:
        for r in runs[name]["results"]:
            b = base.get((r["length"], r["batch"]))
            if b and "prefill_tok_s" in r:
                ratios.append({"config": name, "length": r["length"], "batch": r["batch"],
                               "prefill_ratio": round(r["prefill_tok_s"] / b["prefill_tok_s"], 3),
                               "decode_ratio": (round(r["decode_tok_s"] / b["decode_tok_s"], 3)
                                                if r["decode_tok_s"] and b["decode_tok_s"] else None)})
    meta = {
        "command": "python benchmarks/engine/speed.py " + " ".join(raw),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "VLLM_CPU_KVCACHE_SPACE": env["VLLM_CPU_KVCACHE_SPACE"],
        "infllm_configs": infllm_configs(args),
        "total_seconds": round(time.time() - started, 1),
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs, "ratios": ratios}, indent=1) + "\n")
    lines = [f"# speed\n\n`{meta['command']}` ({meta['date']}, {meta['machine']})\n",
             "| config | context | batch | prefill tok/s (s) | decode tok/s (s for N) | generate wall s "
             "| finite | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        if "error" in run["info"]:
            lines.append(f"| {name} | — | — | {run['info']['error']} | | | | |")
        for r in run["results"]:
            if "skipped" in r:
                lines.append(f"| {name} | {r['length']} | {r['batch']} | skipped: {r['skipped']} | | | | |")
            else:
                lines.append(f"| {name} | {r['length']} | {r['batch']} | {r['prefill_tok_s']} ({r['t_prefill_s']}) | "
                             f"{r['decode_tok_s']} ({r['t_decode_s']}) | {r['t_generate_wall_s']} | "
                             f"{r['logprobs_finite']} | {r['peak_rss_gib']} |")
    if ratios:
        lines += ["", "| config | context | batch | prefill ratio vs cpu_attn | decode ratio vs cpu_attn |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['length']} | {r['batch']} | {r['prefill_ratio']} | {r['decode_ratio']} |"
                  for r in ratios]
    lines += ["", "InfLLM configs: " + json.dumps(meta["infllm_configs"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
