"""Passkey demo: SmolLM2-135M (trained on 8K tokens) finds a number hidden in a longer prompt.

    bash scripts/demo.sh                       # set-up, then this with the defaults
    python -m vllm_infllm.demo --length 12000 --depth 0.25 --topk 4 --n-local 1024 --control
    python -m vllm_infllm.demo --infllm '{"unit_score": "mean_topk", "positions": "fixed"}'  # the paper's rule

Runs vLLM's offline `LLM(attention_backend="infllm")` on the CPU build and prints, for each
depth, the expected key, the model's answer, right/wrong and the time. `--control` also runs
the sliding-window control (`topk: 0`), which cannot see a needle outside its window.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: the converted SmolLM2)")
    ap.add_argument("--length", type=int, default=8000, help="prompt length in tokens")
    ap.add_argument("--depth", type=float, nargs="+", default=[0.5, 0.9],
                    help="needle depths in [0, 1] (one prompt each, batched)")
    ap.add_argument("--n-local", type=int, default=512)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--control", action="store_true", help="also run topk=0 (sliding window + sinks)")
    ap.add_argument("--infllm", default="{}", metavar="JSON",
                    help='more InfLLM knobs over --n-local/--topk, e.g. \'{"unit_score": "minmax"}\' '
                    "(README, Knobs)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    try:
        extra = json.loads(args.infllm)
    except json.JSONDecodeError as e:
        ap.error(f"--infllm {args.infllm!r} is not JSON ({e}); e.g. --infllm '{{\"unit_score\": \"minmax\"}}'")
    if not isinstance(extra, dict):
        ap.error(f"--infllm must be a JSON object such as '{{\"unit_score\": \"minmax\"}}', got {args.infllm!r}")
    from ..core.config import InfLLMConfig, InfLLMConfigError

    for topk in (args.topk, 0):  # a bad knob fails here, before the model loads
        try:
            InfLLMConfig.from_dict({**extra, "n_local": args.n_local, "topk": topk})
        except InfLLMConfigError as e:
            ap.error(str(e))

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: starts fast
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from .assets import default_model_dir
    from .passkey import make_passkey_prompt

    model = args.model or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [make_passkey_prompt(tok, args.length, d) for d in args.depth]
    max_len = max(8192, args.length + 64)
    runs = [("infllm", args.topk)] + ([("control (topk=0)", 0)] if args.control else [])
    ok = True
    for name, topk in runs:
        t0 = time.time()
        llm = LLM(
            model=model,
            attention_backend="infllm",
            additional_config={"infllm": {**extra, "n_local": args.n_local, "topk": topk}},
            max_model_len=max_len,  # beyond the trained 8192: the plugin extends the RoPE table
            enforce_eager=True,
            dtype=args.dtype,
        )
        start = time.time()
        outs = llm.generate([p.text for p in prompts], SamplingParams(max_tokens=8, temperature=0),
                            use_tqdm=False)
        took = time.time() - start
        knobs = "".join(f" {k}={v}" for k, v in extra.items())
        print(f"\n== {name}: n_local={args.n_local} topk={topk}{knobs}, engine start {start - t0:.0f} s, "
              f"{len(prompts)} prompts in {took:.0f} s ({took / len(prompts):.0f} s per request)")
        for p, o in zip(prompts, outs, strict=True):
            answer = o.outputs[0].text.strip()
            right = p.is_correct(answer)
            ok &= right or topk == 0
            print(f"  {p.num_tokens:6d} tokens, needle at token {p.needle_token:6d}: "
                  f"expected {p.key}, answer {answer!r:24s} {'RIGHT' if right else 'WRONG'}")
        del llm
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
