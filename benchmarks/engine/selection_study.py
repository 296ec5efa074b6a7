"""Which unit score would select the needle: the needle unit's rank among the candidates, per
layer, under several scoring rules, on the keys a real InfLLM run produces.

    python -m benchmarks.engine.selection_study --task niah --lengths 4000 8000 16000 32000 \
        --depths 0.1 0.5 0.9 --out benchmarks/results/selection_study_niah

A selection rule is judged here without generating under it: one InfLLM run per prompt (the
`--infllm` config, one prompt at a time, torch ops), and at the query that produces the answer
(the prompt's last token) a wrapper around `torch_ops.attend` reads every candidate unit's raw
keys from the paged cache and scores the candidates by each rule with that query, placed at
distance n_local - 1 as selection places it (docs/design.md 2.3). The rank of the best needle
unit (1 = first) per layer and rule is recorded; a rule with topk units selects the needle in a
layer when its rank is <= topk. Rules (h: query head, g(h) its KV head, k: a raw key of the
unit, q the selecting query):

  exact         sum_h max_k <q_h, k>           (what every bound approximates; reads every key)
  exact_maxh    max_h max_k <q_h, k>           (the one head that matches best decides)
  minmax        sum_h sum_d max(q lo, q hi)    (Quest's bound over the unit's 128 keys: today's)
  minmaxN       sum_h max over the unit's 128/N pieces of N keys of that bound (N = 64, 32, 16)
  minmaxN_maxh  max_h of minmaxN's per-head term

The rules are computed in fp32 from the cache (the same raw keys sealing reads). Writes OUT.json
and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

PIECES = (64, 32, 16)


def unit_scores(q, raw, B):
    """q: [Hq, D] selecting query; raw: [K, B, Hkv, D] raw keys of K candidates -> {rule: [K]}."""
    import torch

    K, _, Hkv, D = raw.shape
    Hq = q.shape[0]
    G = Hq // Hkv
    kv = raw[:, :, torch.arange(Hq) // G]  # [K, B, Hq, D]
    dot = (kv * q).sum(-1)  # [K, B, Hq]
    per_head = dot.amax(1)  # [K, Hq]
    out = {"exact": per_head.sum(-1), "exact_maxh": per_head.amax(-1)}
    for n in (B,) + PIECES:
        box = kv.view(K, B // n, n, Hq, D)
        lo, hi = box.amin(2), box.amax(2)  # [K, P, Hq, D]
        bound = torch.maximum(q * lo, q * hi).sum(-1).amax(1)  # [K, Hq]: the best piece per head
        name = "minmax" if n == B else f"minmax{n}"
        out[name] = bound.sum(-1)
        if n != B:
            out[name + "_maxh"] = bound.amax(-1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["passkey", "niah"], default="niah")
    ap.add_argument("--lengths", type=int, nargs="+", required=True)
    ap.add_argument("--depths", type=float, nargs="+", required=True)
    ap.add_argument("--infllm", default='{"n_local": 1024, "topk": 4, "unit_score": "minmax", "positions": "ordered"}',
                    help="the InfLLM config of the run whose keys are scored (JSON)")
    ap.add_argument("--exact-select", action="store_true",
                    help="the run itself selects by the exact score (passkey_probe.py --exact-select); "
                         "the `exact` column then ranks what it selected")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the wrapper must see the worker
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["VLLM_INFLLM_CPU_KERNEL"] = "torch"  # the wrapper is on the torch ops
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_infllm.core.config import InfLLMConfig
    from vllm_infllm.core.ops import torch_ops
    from vllm_infllm.tools.assets import default_model_dir
    from vllm_infllm.tools.needles import make_prompt, needle_span
    from vllm_infllm.tools.retrieval_layer import record_needle_ranks

    cfg_dict = json.loads(args.infllm)
    cfg = InfLLMConfig.from_dict(cfg_dict)
    B = cfg.block_size
    state = {"pos": -1, "needle_units": []}
    ranks: list[dict] = []  # per layer: {rule: rank of the best needle unit}
    record_needle_ranks(torch_ops, state, lambda q, raw: unit_scores(q, raw, B), ranks)
    if args.exact_select:
        from benchmarks.engine.passkey_probe import exact_select

        exact_select(torch_ops)

    model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    llm = LLM(model=model, enforce_eager=True, dtype="float32", enable_prefix_caching=False,
              max_model_len=max(8192, max(args.lengths) + 64), attention_backend="infllm",
              additional_config={"infllm": cfg_dict})
    sp = SamplingParams(max_tokens=8, temperature=0)
    rows = []
    t0 = time.time()
    for n in args.lengths:
        for d in args.depths:
            p, sentence = make_prompt(args.task, tok, n, d, args.seed)
            ids = llm.get_tokenizer()(p.text)["input_ids"]
            start, end = needle_span(p, sentence, tok, len(ids))
            state["needle_units"] = list(range(max(0, (start - cfg.n_init) // B), (end - cfg.n_init) // B + 1))
            state["pos"] = len(ids) - 1
            ranks.clear()
            out = llm.generate([p.text], sp, use_tqdm=False)[0].outputs[0].text
            row = {"length": n, "depth": d, "distance": len(ids) - 1 - end, "answer": out,
                   "ok": p.is_correct(out), "needle_units": state["needle_units"], "ranks": list(ranks)}
            rows.append(row)
            if ranks:
                summary = " ".join(f"{r}:{sum(x[r] <= cfg.topk for x in ranks)}" for r in ranks[0])
            else:
                summary = "needle not a candidate (window/init/remainder)"
            print(f"{n} d{d} {'OK  ' if row['ok'] else 'MISS'} dist {row['distance']}: layers with rank <= "
                  f"{cfg.topk}: {summary}", flush=True)

    rules = next((list(r["ranks"][0]) for r in rows if r["ranks"]), [])
    how = " (selecting by the exact score)" if args.exact_select else ""
    lines = [f"# Selection study: {args.task}, keys of InfLLM {cfg_dict}{how}, seed {args.seed}", "",
             f"Layers (of {len(rows[0]['ranks']) if rows and rows[0]['ranks'] else '?'}) in which each rule ranks the "
             f"needle's unit within the top {cfg.topk}, at the answering query ({time.time() - t0:.0f} s).", "",
             "| length | depth | distance | found | " + " | ".join(rules) + " |",
             "|---|---|---|---|" + "---|" * len(rules)]
    for r in rows:
        cells = [str(sum(x[k] <= cfg.topk for x in r["ranks"])) if r["ranks"] else "-" for k in rules]
        lines.append(f"| {r['length']} | {r['depth']} | {r['distance']} | {'yes' if r['ok'] else 'no'} | "
                     + " | ".join(cells) + " |")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"task": args.task, "config": cfg_dict, "seed": args.seed,
                                                    "exact_select": args.exact_select,
                                                    "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
