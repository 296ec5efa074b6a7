"""Passkey diagnostic: one prompt length, several depths, one configuration, optionally with the
needle's memory units forced into every layer's selection.

    python benchmarks/engine/passkey_probe.py --length 4000 --depths 0.05 0.1 0.2 0.3 0.5 \
        --infllm '{"n_local": 1024, "topk": 4}'
    python benchmarks/engine/passkey_probe.py --length 8000 --depths 0.1 0.3 0.7 \
        --infllm '{"n_local": 2048, "topk": 4}' --force-needle
    python benchmarks/engine/passkey_probe.py --length 4000 --depths 0.1 0.5 --full

--force-needle separates the two ways InfLLM can miss a needle that left the local window:
the unit holding it is not SELECTED (representative keys vs the query), or it is selected and
the model still does not copy it. It wraps `torch_ops.select_units`: after the normal top-k,
every unit overlapping the needle's first 25 tokens that is a candidate but was not picked
replaces the last (lowest-scored) pick, in every layer, at every chunk. Prompts then run one by
one (the wrapper knows one needle at a time). Without it, prompts run batched.

Prints one line: depth:OK or depth:MISS 'answer' for each depth. Greedy, 8 new tokens, scored
like longctx_eval.py (first run of digits == key). Settings as longctx_eval.py (fp32, eager,
prefix caching off, VLLM_CPU_KVCACHE_SPACE=4 unless set).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, required=True, help="prompt tokens")
    ap.add_argument("--depths", type=float, nargs="+", required=True)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--infllm", help="InfLLM config (JSON)")
    g.add_argument("--full", action="store_true", help="vLLM's CPU_ATTN instead (<= 8192 tokens)")
    ap.add_argument("--force-needle", action="store_true", help="force the needle's units into every selection")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.force_needle and args.full:
        ap.error("--force-needle needs --infllm")

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm_infllm.core.config import InfLLMConfig
    from vllm_infllm.core.ops import torch_ops

    cfg = json.loads(args.infllm) if args.infllm else None
    needle_units: list[int] = []
    if args.force_needle:
        config = InfLLMConfig.from_dict(cfg)
        select = torch_ops.select_units

        def forced(query, memory, block_table, chunks, cos, sin, config_, num_kv_heads):
            sel = select(query, memory, block_table, chunks, cos, sin, config_, num_kv_heads)
            for u in needle_units:
                for r in range(sel.shape[0]):
                    for g in range(sel.shape[1]):  # every selection group (layer or KV head)
                        if chunks.host["num_cand"][r] > u and not bool((sel[r, g] == u).any()):
                            sel[r, g, -1] = u
            return sel

        torch_ops.select_units = forced  # runtime looks ops up on the module at call time

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_infllm.tools.assets import default_model_dir
    from vllm_infllm.tools.passkey import make_passkey_prompt

    model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    kw = dict(model=model, enforce_eager=True, dtype="float32", enable_prefix_caching=False)
    if cfg is None:
        kw.update(max_model_len=8192)
    else:
        kw.update(max_model_len=max(8192, args.length + 64), attention_backend="infllm",
                  additional_config={"infllm": cfg})
    llm = LLM(**kw)
    sp = SamplingParams(max_tokens=8, temperature=0)
    prompts = [make_passkey_prompt(tok, args.length, d, seed=args.seed) for d in args.depths]
    t = time.time()
    if args.force_needle:
        outs = []
        for p in prompts:
            first = (p.needle_token - config.n_init) // config.block_size
            last = (p.needle_token + 24 - config.n_init) // config.block_size
            needle_units[:] = range(max(first, 0), last + 1)
            outs += llm.generate([p.text], sp, use_tqdm=False)
    else:
        outs = llm.generate([p.text for p in prompts], sp, use_tqdm=False)
    cells = []
    for d, p, o in zip(args.depths, prompts, outs, strict=True):
        a = o.outputs[0].text
        cells.append(f"{d}:{'OK' if p.is_correct(a) else 'MISS ' + repr(a)}")
    what = "full (CPU_ATTN)" if cfg is None else f"infllm {cfg}" + (" forced needle" if args.force_needle else "")
    print(f"RESULT length={args.length} {what} ({time.time() - t:.0f} s): " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
