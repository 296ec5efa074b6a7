"""Needle diagnostic: one prompt length, several depths, one configuration, optionally with the
needle's memory units forced into every layer's selection.

    python benchmarks/engine/passkey_probe.py --length 4000 --depths 0.05 0.1 0.2 0.3 0.5 \
        --infllm '{"n_local": 1024, "topk": 4}'
    python benchmarks/engine/passkey_probe.py --length 8000 --depths 0.1 0.3 0.7 \
        --infllm '{"n_local": 2048, "topk": 4}' --force-needle
    python benchmarks/engine/passkey_probe.py --length 4000 --depths 0.1 0.5 --full
    python benchmarks/engine/passkey_probe.py --task niah ...   # the essay needle (tools/niah.py)

--force-needle separates the two ways InfLLM can miss a needle that left the local window:
the unit holding it is not SELECTED (representative keys vs the query), or it is selected and
the model still does not copy it. It wraps `torch_ops.select_units`: after the normal top-k,
every unit overlapping the needle's first 25 tokens that is a candidate but was not picked
replaces the last (lowest-scored) pick, in every layer, at every chunk. Prompts then run one by
one (the wrapper knows one needle at a time). Without it, prompts run batched. The wrapper is on
the torch ops, so InfLLM runs them here (VLLM_INFLLM_CPU_KERNEL=torch; the native kernels select
in C++, where no wrapper can reach; tests/core/test_native_ops.py holds the two equal).

Prints one line: depth:OK or depth:MISS 'answer' for each depth. Greedy, 8 new tokens, scored
like longctx_eval.py (first run of digits == key). Settings as longctx_eval.py (fp32, eager,
prefix caching off, VLLM_CPU_KVCACHE_SPACE=4 unless set).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def exact_select(torch_ops, carry: bool = False, trace: list | None = None, share_from: int | None = None,
                 exact_layers: range | None = None) -> None:
    """Replace torch_ops.select_units by the exact score sum_h max_k <q̄_h, k_raw> over every key
    of each candidate (q̄ as the config selects it); the layer's cache comes from seal_units,
    which the runtime calls just before select_units with the same layer.

    carry: an experiment in carrying a confident choice up the layers. Per chunk, the unit that
    stood out most so far in this forward pass (the top unit of the layer whose top score has the
    largest z-score, (max - mean) / std over its candidates, this layer included) takes one of
    each layer's topk slots; the other topk - 1 are the layer's own best. `trace` gains
    (layer, chunk start, carried z, carried unit, own z, own top unit) for every chunk of one query.

    share_from: another experiment: the layers above layer `share_from` read the units that
    layer selected for the same chunk (the layers run in order, so it is already known).

    exact_layers: only these layers score exactly; the others select by the config's own rule
    (None: every layer)."""
    import torch

    from vllm_infllm.core.ops.ranking import top_units

    seal, own_select, current = torch_ops.seal_units, torch_ops.select_units, {}
    layer_of: dict[int, int] = {}  # a layer's representatives address -> its index (first-run order)
    carried: dict[tuple[int, int], tuple[float, int]] = {}  # (request row, chunk start) -> (z, unit)
    shared: dict[tuple, torch.Tensor] = {}  # share_from's selection of each wave of this step

    def sealing(kv_cache, memory, *a, **kw):
        current["kv"] = kv_cache
        return seal(kv_cache, memory, *a, **kw)

    def select(query, memory, block_table, chunks, cos, sin, config, num_kv_heads, **kw):
        n, topk, max_k = chunks.n, config.topk, chunks.max_cand
        S = config.selection_groups(num_kv_heads)
        selected = torch.full((n, S, topk), -1, dtype=torch.long)
        units = torch.arange(max_k)
        if max_k <= topk:
            selected[:, :, :max_k] = torch.where(units < chunks.num_cand[:, None], units, -1)[:, None]
            return selected
        layer = layer_of.setdefault(memory.reprs.data_ptr(), len(layer_of))
        if exact_layers is not None and layer not in exact_layers:
            if layer == 0:
                shared.clear()
            if share_from is not None and layer > share_from:
                wave = (tuple(chunks.host["c0"]), tuple(chunks.req.tolist()))
                if wave in shared:
                    return shared[wave].clone()
            return own_select(query, memory, block_table, chunks, cos, sin, config, num_kv_heads, **kw)
        score = torch_ops.exact_unit_scores(query, current["kv"], block_table, chunks, cos, sin, config,
                                            num_kv_heads, **kw)  # [n, S, max_k]; -inf: no candidate
        if share_from is not None:
            chosen = top_units(score, chunks.num_cand, config)
            wave = (tuple(chunks.host["c0"]), tuple(chunks.req.tolist()))  # the same chunks in every layer
            if layer == 0:
                shared.clear()
            if layer == share_from:
                shared[wave] = chosen.clone()
            elif layer > share_from and wave in shared:
                return shared[wave].clone()
            return chosen
        if not carry:
            return top_units(score, chunks.num_cand, config)
        if S != 1:
            raise ValueError("--carry needs selection='layer'")
        if layer == 0:
            carried.clear()
        for j in range(n):
            nc = chunks.host["num_cand"][j]
            s = score[j, 0, :nc]
            if nc <= topk:  # every candidate (another chunk of the wave has more)
                selected[j, 0, :nc] = torch.arange(nc)
                continue
            z = float((s.max() - s.mean()) / s.std().clamp(min=1e-12))
            key = (int(chunks.req[j]), chunks.host["c0"][j])
            if key not in carried or z > carried[key][0]:
                carried[key] = (z, int(s.argmax()))
            cz, cu = carried[key]
            own = [u for u in s.topk(topk).indices.tolist() if u != cu][: topk - 1]
            selected[j, 0] = torch.tensor(sorted([cu] + own))
            if trace is not None and chunks.host["length"][j] == 1:
                trace.append((layer, key[1], round(cz, 2), cu, round(z, 2), int(s.argmax())))
        return selected

    torch_ops.seal_units, torch_ops.select_units = sealing, select


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["passkey", "niah"], default="passkey")
    ap.add_argument("--length", type=int, required=True, help="prompt tokens")
    ap.add_argument("--depths", type=float, nargs="+", required=True)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--infllm", help="InfLLM config (JSON)")
    g.add_argument("--full", action="store_true", help="vLLM's CPU_ATTN instead (<= 8192 tokens)")
    ap.add_argument("--force-needle", action="store_true", help="force the needle's units into every selection")
    ap.add_argument("--exact-select", action="store_true",
                    help="score candidates by sum_h max_k <q̄_h, k> over every raw key of the unit "
                         "(what representatives approximate; reads every key), instead of the config's score")
    ap.add_argument("--carry", action="store_true",
                    help="with --exact-select: carry the most confident layer's top unit up the layers "
                         "(an experiment, exact_select's docstring)")
    ap.add_argument("--share-from", type=int,
                    help="with --exact-select: the layers above this one read its selection "
                         "(an experiment, exact_select's docstring)")
    ap.add_argument("--sketch-bits", type=int, default=0,
                    help="the exact score (unit_score 'exact', retrieval_layer) of b-bit key sketches instead of "
                         "the keys (torch_ops.exact_unit_scores' sketch_bits; a study of a cheaper score)")
    ap.add_argument("--exact-layers", help="with --exact-select: only these layers score exactly, e.g. 18 or "
                                           "14-18 (0-based, inclusive); the others by the config's rule")
    ap.add_argument("--force-layers", help="force the needle only in these layers, e.g. 14-29 (0-based, "
                                           "inclusive; default every layer); with --exact-select the "
                                           "other layers select by the exact score")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack-start", type=int, default=0,
                    help="--task niah: read the essays from the first sentence at or after this token "
                         "(other text around the needle; --seed changes only the key)")
    args = ap.parse_args(argv)
    if (args.force_needle or args.exact_select) and args.full:
        ap.error("--force-needle and --exact-select need --infllm")
    if args.force_layers and not args.force_needle:
        ap.error("--force-layers needs --force-needle")
    def layer_range(text):
        a, _, b = text.partition("-")
        return range(int(a), int(b or a) + 1)

    layers = layer_range(args.force_layers) if args.force_layers else None
    exact_layers = layer_range(args.exact_layers) if args.exact_layers else None
    if exact_layers is not None and not args.exact_select:
        ap.error("--exact-layers needs --exact-select")

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    if args.force_needle or args.exact_select or args.sketch_bits:
        os.environ["VLLM_INFLLM_CPU_KERNEL"] = "torch"  # the wrappers below are on the torch ops
    from vllm_infllm.core.config import InfLLMConfig
    from vllm_infllm.core.ops import torch_ops

    cfg = json.loads(args.infllm) if args.infllm else None
    needle_units: list[int] = []
    forced_calls = [0]
    trace: list = []
    if (args.carry or args.share_from is not None) and not args.exact_select:
        ap.error("--carry and --share-from need --exact-select")
    if args.sketch_bits:  # select_units_exact (and exact_select) read exact_unit_scores by name
        import functools

        torch_ops.exact_unit_scores = functools.partial(torch_ops.exact_unit_scores, sketch_bits=args.sketch_bits)
    if args.exact_select:
        exact_select(torch_ops, carry=args.carry, trace=trace, share_from=args.share_from,
                     exact_layers=exact_layers)
    config = InfLLMConfig.from_dict(cfg) if cfg is not None else None
    if args.force_needle:
        select = torch_ops.select_units
        layer_of: dict[int, int] = {}  # a layer's representatives address -> its index (first-run order)

        def forced(query, memory, block_table, chunks, cos, sin, config_, num_kv_heads):
            sel = select(query, memory, block_table, chunks, cos, sin, config_, num_kv_heads)
            forced_calls[0] += 1
            if layers is not None and layer_of.setdefault(memory.reprs.data_ptr(), len(layer_of)) not in layers:
                return sel
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
    from vllm_infllm.tools.needles import make_prompt, needle_span

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
    prompts, sentences = zip(*(make_prompt(args.task, tok, args.length, d, args.seed, args.haystack_start)
                               for d in args.depths), strict=True)
    t = time.time()
    if args.force_needle or args.carry:
        outs = []
        for p, sentence in zip(prompts, sentences, strict=True):
            n_ids = len(llm.get_tokenizer()(p.text)["input_ids"])
            start, end = needle_span(p, sentence, tok, n_ids)
            first = (start - config.n_init) // config.block_size
            last = (end - config.n_init) // config.block_size
            needle_units[:] = range(max(first, 0), last + 1)
            trace.clear()
            outs += llm.generate([p.text], sp, use_tqdm=False)
            if args.carry:  # the answering query's carried unit, by layer
                answer = [t for t in trace if t[1] == n_ids - 1]  # the prompt's last query
                print(f"carry {p.key}: needle units {needle_units}; (layer, z, unit): "
                      + " ".join(f"{t[0]}:{t[2]}:{t[3]}" for t in answer)
                      + "; own (layer, z, unit): " + " ".join(f"{t[0]}:{t[4]}:{t[5]}" for t in answer), flush=True)
        if forced_calls[0] == 0 and args.force_needle:
            raise RuntimeError("--force-needle: the select_units wrapper never ran (the runtime "
                               "did not use the torch ops), so nothing was forced")
    else:
        outs = llm.generate([p.text for p in prompts], sp, use_tqdm=False)
    cells = []
    for d, p, o in zip(args.depths, prompts, outs, strict=True):
        a = o.outputs[0].text
        cells.append(f"{d}:{'OK' if p.is_correct(a) else 'MISS ' + repr(a)}")
    what = "full (CPU_ATTN)" if cfg is None else (f"infllm {cfg}" + (" forced needle" if args.force_needle else "")
                                                  + (f" in layers {args.force_layers}" if args.force_layers else "")
                                                  + (" exact selection" if args.exact_select else "")
                                                  + (f" in layers {args.exact_layers}" if args.exact_layers else "")
                                                  + (f" of {args.sketch_bits}-bit sketches" if args.sketch_bits else "")
                                                  + (" carried up" if args.carry else "")
                                                  + (f" shared from layer {args.share_from}"
                                                     if args.share_from is not None else ""))
    if args.haystack_start:
        what += f" essays from token {args.haystack_start}"
    print(f"RESULT length={args.length} {what} ({time.time() - t:.0f} s): " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
