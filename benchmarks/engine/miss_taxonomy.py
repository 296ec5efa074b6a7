"""Why InfLLM misses a needle: every miss of a grid classified from what each layer selected.

    python -m benchmarks.engine.miss_taxonomy --lengths 4000 8000 16000 32000 --depths 0.1 0.5 0.9 \
        --infllm '{"n_local": 1024, "topk": 4}' --out benchmarks/results/miss_taxonomy
    python -m benchmarks.engine.miss_taxonomy --task niah ...   # the essay needle instead

`--task passkey` (default): the prompts of `vllm_infllm/tools/passkey.py`; `--task niah`: the
number needle in Paul Graham essays of `vllm_infllm/tools/niah.py` ("The special magic number is
N."), the prompts of longctx_eval.py for the same lengths, depths and seed.

Prompts run one at a time through `LLM(attention_backend="infllm")` (greedy, 8 new tokens, fp32,
eager, prefix caching off, as longctx_eval.py), on the torch ops (VLLM_INFLLM_CPU_KERNEL=torch:
the native kernels select in C++, out of a wrapper's reach; tests/core/test_native_ops.py holds
the two equal). A wrapper around `torch_ops.select_units` records,
for the query that produces the answer (the prompt's last token, a selection chunk of its own),
the units every layer selected. The needle sentence ("The pass key is N. Remember it. N is the
pass key.", or the essay needle) covers tokens [s, e]; for that query a token is attended without selection when it is
in init, in the local window or in the remainder (past the last candidate unit), and otherwise
only when its unit is selected. Per prompt, over the L layers: `full` layers selected every
needle unit that needs selecting, `partial` some, `none` none. A miss is then

  attended   the whole needle was attended without selection (window / init / remainder): the
             model saw it and did not copy it;
  copy       every layer selected all of the needle's units, and the model did not copy it;
  boundary   the needle spans several units and every layer selected at least one of them, but
             some layer not all;
  selection  some layer selected none of the needle's units (reported: in how many layers).

With selection="kv_head" each KV head chooses its own units: a layer counts as selecting a unit
when any of its KV heads did, and `groups_full` lists per layer how many KV heads hold the whole
needle. Hits get the same counts, for comparison. The chunk that reads the question (the prompt's last
prefill chunk before the answering token) is recorded too: it selects by the mean of its queries,
mostly filler, and what it fails to bring in, the question's tokens never see. Writes OUT.json
and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time


def classify(needle: tuple[int, int], answer_pos: int, cfg, layers: list[list[int]]) -> dict:
    """The taxonomy of one prompt from the needle's token span, the answering query's position
    and each layer's selected unit ids (vLLM-free: unit u holds tokens n_init + u*B ...)."""
    s, e = needle
    B = cfg.block_size
    w = cfg.window_start(answer_pos)
    num_cand = cfg.num_candidates(answer_pos)
    r0 = cfg.n_init + num_cand * B  # remainder [r0, w) is attended: not yet a candidate
    # Needle tokens that only selection can bring: candidates' tokens [n_init, r0).
    need = sorted({(t - cfg.n_init) // B for t in range(s, e + 1) if cfg.n_init <= t < r0})
    full = partial = none = 0
    missing_in = []  # layers that selected none of the needle's units
    for layer, sel in enumerate(layers):
        got = len(set(need) & set(sel))
        if got == len(need):
            full += 1
        elif got:
            partial += 1
        else:
            none += 1
            missing_in.append(layer)
    if not need:
        kind = "attended"
    elif none:
        kind = "selection"
    elif partial:
        kind = "boundary"
    else:
        kind = "copy"
    return {"needle_units": need, "window_start": w, "num_candidates": num_cand, "layers": len(layers),
            "full": full, "partial": partial, "none": none, "missing_in": missing_in if need else [],
            "kind": kind}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["passkey", "niah"], default="passkey")
    ap.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt tokens")
    ap.add_argument("--depths", type=float, nargs="+", required=True)
    ap.add_argument("--infllm", default='{"n_local": 1024, "topk": 4}', help="InfLLM config (JSON)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the wrapper must see the worker
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["VLLM_INFLLM_CPU_KERNEL"] = "torch"  # the recording wrapper is on the torch ops
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_infllm.core.config import InfLLMConfig
    from vllm_infllm.core.ops import torch_ops
    from vllm_infllm.tools.assets import default_model_dir
    from vllm_infllm.tools.needles import make_prompt, needle_span

    cfg_dict = json.loads(args.infllm)
    cfg = InfLLMConfig.from_dict(cfg_dict)
    answer_pos = {"pos": -1}
    # Per layer, per selection group (one group, or one per KV head with selection="kv_head"):
    recorded: list[list[list[int]]] = []  # the answering query's selection
    question: list[list[list[int]]] = []  # the selection of the chunk holding the question
    select = torch_ops.select_units

    def recording(query, memory, block_table, chunks, cos, sin, config, num_kv_heads):
        sel = select(query, memory, block_table, chunks, cos, sin, config, num_kv_heads)
        if chunks.n == 1:
            c0, length, p = chunks.host["c0"][0], chunks.host["length"][0], answer_pos["pos"]
            groups = [[u for u in g if u >= 0] for g in sel[0].tolist()]
            if c0 == p and length == 1:
                recorded.append(groups)
            elif c0 <= p - 1 < c0 + length:  # the question's last token, before the answering one
                question.append(groups)
        return sel

    def union(per_layer):  # a layer holds a unit when any of its groups selected it
        return [sorted(set().union(*groups)) for groups in per_layer]

    torch_ops.select_units = recording  # the runtime looks ops up on the module at call time

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
            needle = needle_span(p, sentence, tok, len(ids))
            answer_pos["pos"] = len(ids) - 1
            recorded.clear()
            question.clear()
            out = llm.generate([p.text], sp, use_tqdm=False)[0].outputs[0].text
            if not recorded:
                raise RuntimeError("the select_units wrapper recorded nothing: the runtime did not "
                                   "use the torch ops, so there is no selection to classify")
            row = {"length": n, "depth": d, "prompt_tokens": len(ids), "needle": needle,
                   "distance": len(ids) - 1 - needle[1], "answer": out, "ok": p.is_correct(out)}
            row.update(classify(needle, len(ids) - 1, cfg, union(recorded)))
            # Per layer: how many selection groups (KV heads, or the one layer set) hold every
            # needle unit; with selection="kv_head" a layer can hold it in a few heads only.
            need = set(row["needle_units"])
            row["groups_full"] = [sum(need <= set(g) for g in groups) for groups in recorded]
            # The chunk that reads the question selects by the mean of its queries (mostly filler).
            q = classify(needle, len(ids) - 1, cfg, union(question))
            row["question_chunk"] = {k: q[k] for k in ("full", "partial", "none", "layers", "missing_in")}
            rows.append(row)
            print(f"{n} d{d}: {'OK  ' if row['ok'] else 'MISS'} {row['kind']:9s} full/partial/none "
                  f"{row['full']}/{row['partial']}/{row['none']} of {row['layers']} layers "
                  f"(none in {row['missing_in']}), units "
                  f"{row['needle_units']}, distance {row['distance']}; question chunk full "
                  f"{row['question_chunk']['full']} of {row['question_chunk']['layers']}; answer {out!r}", flush=True)

    misses = [r for r in rows if not r["ok"]]
    kinds = {k: sum(r["kind"] == k for r in misses) for k in ("attended", "copy", "boundary", "selection")}
    # Selection misses where nearly every layer had the needle behave like copy misses.
    near = sum(r["kind"] == "selection" and r["none"] <= max(1, r["layers"] // 10) for r in misses)
    lines = [f"# Miss taxonomy: {args.task}, InfLLM {cfg_dict}, seed {args.seed}", "",
             f"{sum(r['ok'] for r in rows)}/{len(rows)} found; misses by kind: "
             + ", ".join(f"{k} {v}" for k, v in kinds.items())
             + f" (selection misses with the needle missing in <= 10% of layers: {near};"
             f" {time.time() - t0:.0f} s)", "",
             "| length | depth | found | kind | answering query: layers full / partial / none "
             "| layers without the needle | question chunk: layers full | needle units | distance | answer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        qc = r["question_chunk"]
        lines.append(f"| {r['length']} | {r['depth']} | {'yes' if r['ok'] else 'no'} | {r['kind']} | "
                     f"{r['full']} / {r['partial']} / {r['none']} | {r['missing_in']} | "
                     f"{qc['full']} of {qc['layers']} | "
                     f"{r['needle_units']} | {r['distance']} | {r['answer']!r} |")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"task": args.task, "config": cfg_dict, "seed": args.seed,
                                                    "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
