"""Find a model's retrieval layer (`InfLLMConfig.retrieval_layer`, docs/design.md section 2.7):
the layer whose exact unit score ranks a needle's memory unit first most often, at the query
that produces the answer.

    python -m vllm_infllm.tools.retrieval_layer --lengths 6000 12000 24000 --depths 0.2 0.4 0.6 0.8 --seed 1

The model runs through vLLM with InfLLM (the --infllm config, retrieval_layer off; the torch
ops, in this process). At each prompt's last query, every layer's candidate units are scored by
sum_h max_k <q̄_h, k> over their raw keys from the paged cache, which is what the retrieval
layer computes, and the needle unit's rank is recorded. Per layer the tool counts the prompts
in which that rank is within topk, and recommends the layer with the most (ties: the smaller
mean rank). Prompts are synthetic needles (tools/needles.py: the passkey, or a number in Paul
Graham essays) at the lengths, depths and seed given: choose them apart from the prompts you
evaluate on. Prints a table and the layer to put in the config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable

DEFAULT_INFLLM = '{"n_local": 1024, "topk": 4, "unit_score": "minmax", "positions": "ordered"}'


def exact_scores(q, raw):
    """q: [Hq, D] selecting query at distance n_local - 1; raw: [K, B, Hkv, D] raw keys of K
    candidate units -> [K]: sum_h max_k <q_h, k> over each unit's keys of h's KV head."""
    import torch

    Hkv, Hq = raw.shape[2], q.shape[0]
    kv = raw[:, :, torch.arange(Hq) // (Hq // Hkv)]  # [K, B, Hq, D]
    return (kv * q).sum(-1).amax(1).sum(-1)


def record_needle_ranks(torch_ops, state: dict, score: Callable, out: list) -> None:
    """Wrap `torch_ops.attend` (the runtime looks ops up on the module at each call): when a
    layer attends the one-token chunk at position state["pos"] with more than topk candidates,
    score its candidates by `score(q, raw) -> {rule: [K]}` (q: the query re-rotated to the global
    position n_local - 1, as selection places it; raw: the candidates' raw keys [K, B, Hkv, D],
    fp32) and append {rule: rank of the best unit of state["needle_units"]} (1 = first) to
    `out`: one entry per layer, in the order the layers run."""
    import torch

    from ..core.rope import rotate

    attend = torch_ops.attend

    def recording(query, kv_cache, memory, block_table, chunks, selected, cos, sin, config, scale, o, **kw):
        h = chunks.host
        if chunks.n == 1 and h["length"][0] == 1 and h["c0"][0] == state["pos"]:
            K, B = h["num_cand"][0], config.block_size
            need = [u for u in state["needle_units"] if u < K]
            if need and K > config.topk:
                p, D = state["pos"], kv_cache.shape[3] // 2
                q = query[h["q0"][0]].float()  # [Hq, D] post-RoPE at p
                q = rotate(q[None], cos, sin, torch.tensor([[config.n_local - 1 - p]]))[0]
                phys = block_table[chunks.req[0], config.init_blocks: config.init_blocks + K].long()
                pos = config.n_init + torch.arange(K)[:, None, None] * B + torch.arange(B)[:, None]
                raw = rotate(kv_cache[phys, :, :, :D].transpose(1, 2).float(), cos, sin, -pos)
                out.append({rule: 1 + int((s > max(float(s[u]) for u in need)).sum())
                            for rule, s in score(q, raw).items()})
        return attend(query, kv_cache, memory, block_table, chunks, selected, cos, sin, config, scale, o, **kw)

    torch_ops.attend = recording


def recommend(ranks: list[list[int]], topk: int) -> tuple[int, list[dict]]:
    """ranks: per prompt, the needle unit's rank in each layer -> (the recommended layer, per
    layer {"layer", "hits": prompts with rank <= topk, "mean_rank"}). Most hits wins; ties go to
    the smaller mean rank, then to the lower layer."""
    if not ranks:
        raise ValueError("no prompt put its needle among the memory units (every needle was in the "
                         "init tokens, the local window or the remainder): use longer prompts")
    layers = len(ranks[0])
    table = [{"layer": i, "hits": sum(r[i] <= topk for r in ranks),
              "mean_rank": round(statistics.mean(r[i] for r in ranks), 1)} for i in range(layers)]
    best = min(table, key=lambda t: (-t["hits"], t["mean_rank"], t["layer"]))
    return best["layer"], table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory or name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--task", choices=["passkey", "niah"], default="niah")
    ap.add_argument("--lengths", type=int, nargs="+", default=[6000, 12000, 24000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--infllm", default=DEFAULT_INFLLM, help="the InfLLM config to run under (JSON)")
    ap.add_argument("--dtype", default="float32", help="the model's dtype in vLLM (as the probes run it)")
    args = ap.parse_args(argv)
    cfg_dict = json.loads(args.infllm)
    if cfg_dict.get("retrieval_layer", -1) >= 0:
        ap.error("--infllm: leave retrieval_layer out (the tool looks for it)")

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the wrapper must see the worker
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["VLLM_INFLLM_CPU_KERNEL"] = "torch"  # the wrapper is on the torch ops
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from ..core.config import InfLLMConfig
    from ..core.ops import torch_ops
    from .assets import default_model_dir
    from .needles import make_prompt, needle_span

    cfg = InfLLMConfig.from_dict(cfg_dict)
    model = args.model or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    state: dict = {"pos": -1, "needle_units": []}
    layer_ranks: list[dict] = []
    record_needle_ranks(torch_ops, state, lambda q, raw: {"exact": exact_scores(q, raw)}, layer_ranks)
    llm = LLM(model=model, enforce_eager=True, enable_prefix_caching=False, dtype=args.dtype,
              max_model_len=max(args.lengths) + 64, attention_backend="infllm",
              additional_config={"infllm": cfg_dict})
    sp = SamplingParams(max_tokens=8, temperature=0)
    ranks, found = [], 0
    for n in args.lengths:
        for d in args.depths:
            p, sentence = make_prompt(args.task, tok, n, d, args.seed)
            ids = llm.get_tokenizer()(p.text)["input_ids"]
            start, end = needle_span(p, sentence, tok, len(ids))
            B = cfg.block_size
            state["needle_units"] = list(range(max(0, (start - cfg.n_init) // B), (end - cfg.n_init) // B + 1))
            state["pos"] = len(ids) - 1
            layer_ranks.clear()
            answer = llm.generate([p.text], sp, use_tqdm=False)[0].outputs[0].text
            found += p.is_correct(answer)
            if layer_ranks:
                ranks.append([r["exact"] for r in layer_ranks])
            print(f"{n} tokens, depth {d}: needle unit's rank by layer "
                  f"{[r['exact'] for r in layer_ranks] or 'n/a (not a memory unit)'}", flush=True)
    layer, table = recommend(ranks, cfg.topk)
    print(f"\n{len(ranks)} prompts with the needle in memory ({found} answered under {cfg_dict})")
    print(f"| layer | needle in top {cfg.topk} | mean rank |\n|---|---|---|")
    for t in table:
        print(f"| {t['layer']} | {t['hits']}/{len(ranks)} | {t['mean_rank']} |")
    print(f"\nrecommended: \"retrieval_layer\": {layer} (on SmolLM2-135M it found the essay needle best with "
          "\"unit_score\": \"exact\" in the layers below it too: benchmarks/RESULTS.md 2j)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
