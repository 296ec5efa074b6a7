"""Where an InfLLM decode step's time goes, inside the vLLM engine (CPU).

    python benchmarks/engine/decode_profile.py --length 4000 --tokens 64
    python benchmarks/engine/decode_profile.py --length 4000 --tokens 32 --cprofile
    VLLM_INFLLM_SINGLE_THREAD_MAX_TOKENS=0 python benchmarks/engine/decode_profile.py --length 4000

One request (passkey prompt of --length tokens), greedy, ignore_eos, --tokens new tokens.
`vllm_infllm.adapter.backend.infllm_forward` is wrapped with a timer that counts only decode steps (one
query token), so the output splits a decode step (vLLM's per-request timestamps) into InfLLM
attention (all 30 layers) and everything else (weights, K/V write, sampling, scheduling).
--cprofile profiles those decode-layer calls with cProfile (Python functions and torch ops by
self time; adds overhead, so the totals are larger than without it).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--infllm", default='{"n_local": 1024, "topk": 4}', help="InfLLM config (JSON)")
    ap.add_argument("--cprofile", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    import vllm_infllm.adapter.backend as backend

    forward = backend.infllm_forward
    prof = cProfile.Profile() if args.cprofile else None
    acc = {"calls": 0, "seconds": 0.0}

    def timed(*a, **k):
        if a[3].num_tokens != 1:  # plan.num_tokens: prefill step
            return forward(*a, **k)
        t = time.perf_counter()
        if prof:
            prof.enable()
        try:
            return forward(*a, **k)
        finally:
            if prof:
                prof.disable()
            acc["seconds"] += time.perf_counter() - t
            acc["calls"] += 1

    backend.infllm_forward = timed  # the impl calls it through the module global

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_infllm.tools.assets import default_model_dir
    from vllm_infllm.tools.passkey import make_passkey_prompt

    model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    llm = LLM(model=model, enforce_eager=True, dtype="float32", enable_prefix_caching=False,
              disable_log_stats=False, max_model_len=max(8192, args.length + args.tokens + 8),
              attention_backend="infllm", additional_config={"infllm": json.loads(args.infllm)})
    layers = llm.llm_engine.model_config.hf_config.num_hidden_layers
    prompt = make_passkey_prompt(tok, args.length, 0.3, seed=1).text
    out = llm.generate([prompt], SamplingParams(max_tokens=args.tokens + 1, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    step_ms = (out.metrics.last_token_ts - out.metrics.first_token_ts) / args.tokens * 1e3
    attn_ms = acc["seconds"] / max(acc["calls"], 1) * layers * 1e3
    print(f"decode step {step_ms:.1f} ms/token; InfLLM attention {attn_ms:.1f} ms/token "
          f"({attn_ms / layers:.2f} ms/layer over {acc['calls']} decode-layer calls); "
          f"rest {step_ms - attn_ms:.1f} ms; single-thread decode up to "
          f"{os.environ.get('VLLM_INFLLM_SINGLE_THREAD_MAX_TOKENS', '16')} tokens", flush=True)
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
