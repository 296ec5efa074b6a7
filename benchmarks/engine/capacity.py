"""KV-cache capacity: how many tokens the same VLLM_CPU_KVCACHE_SPACE holds, InfLLM vs CPU_ATTN.

    python benchmarks/engine/capacity.py --out benchmarks/results/capacity

InfLLM keeps per-block side state (attention mass, representative keys, sealed flag, stored
selection) inside each KV page, so its pages are larger than CPU_ATTN's and the same budget holds
fewer blocks. Each configuration starts one engine in its own subprocess (no requests are run)
and records vLLM's own figures: `cache_config.num_gpu_blocks` x block size, and the page bytes of
the first layer's spec. Configurations:

  cpu_attn          vLLM's CPU attention backend, block size 128
  infllm            attention_backend="infllm", package defaults (128-token blocks: padded pages)
  infllm-minmax     unit_score="minmax" (its representative rows are max(Hq, 2*Hkv))
  infllm-block256   --block-size 256 (vLLM cannot pad pages it splits into kernel blocks: the
                    side state takes whole extra head slots)

Ratio = tokens / cpu_attn tokens, in the same invocation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "cpu_attn": {"backend": None, "block_size": 128, "infllm": None},
    "infllm": {"backend": "infllm", "block_size": 128, "infllm": {}},
    "infllm-minmax": {"backend": "infllm", "block_size": 128, "infllm": {"unit_score": "minmax"}},
    "infllm-block256": {"backend": "infllm", "block_size": 256, "infllm": {}},
}


def worker(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import vllm_infllm

    vllm_infllm.register()
    from vllm import LLM

    from vllm_infllm.tools.assets import default_model_dir

    c = CONFIGS[args._worker]
    kw = dict(model=args.model or str(default_model_dir()), dtype=args.dtype, enforce_eager=True,
              max_model_len=args.max_model_len, block_size=c["block_size"], skip_tokenizer_init=True,
              enable_prefix_caching=False)
    if c["backend"]:
        kw["attention_backend"] = c["backend"]
        kw["additional_config"] = {"infllm": c["infllm"]}
    llm = LLM(**kw)
    cfg = llm.llm_engine.vllm_config
    blocks = cfg.cache_config.num_gpu_blocks
    # The in-process engine core's KV cache config: page bytes of the first group's layers.
    core = llm.llm_engine.engine_core.engine_core
    kcc = core.model_executor.driver_worker.worker.model_runner.kv_cache_config
    spec_bytes = kcc.kv_cache_groups[0].kv_cache_spec.page_size_bytes
    return {"config": args._worker, "block_size": c["block_size"], "num_blocks": blocks,
            "tokens": blocks * c["block_size"], "page_bytes_per_layer": spec_bytes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-space-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE for every config")
    ap.add_argument("--out", default="benchmarks/results/capacity", help="output prefix (.json, .md)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        Path(args._result).write_text(json.dumps(worker(args)))
        return 0

    raw = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=args.kv_space_gib)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in args.configs:
        res = out.with_name(out.name + f".{name}.worker.json")
        t = time.time()
        p = subprocess.run([sys.executable, __file__, *raw, "--_worker", name, "--_result", str(res)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0 or not res.exists():
            raise SystemExit(f"capacity: config {name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        runs[name] = json.loads(res.read_text()) | {"seconds": round(time.time() - t, 1)}
        res.unlink()
    base = runs.get("cpu_attn")
    for r in runs.values():
        r["ratio"] = round(r["tokens"] / base["tokens"], 4) if base else None
    meta = {"command": "python benchmarks/engine/capacity.py " + " ".join(raw),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
            "VLLM_CPU_KVCACHE_SPACE": args.kv_space_gib}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    lines = [f"# capacity\n\n`{meta['command']}` ({meta['date']}, {meta['machine']}), "
             f"VLLM_CPU_KVCACHE_SPACE={args.kv_space_gib} GiB\n",
             "| config | block size | blocks | tokens | page bytes per layer | tokens vs cpu_attn |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['block_size']} | {r['num_blocks']} | {r['tokens']} | {r['page_bytes_per_layer']} "
              f"| {r['ratio']} |" for n, r in runs.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
