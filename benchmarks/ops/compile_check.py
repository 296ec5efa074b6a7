#!/usr/bin/env python
"""Every Triton kernel variant the runtime launches, compiled for Hopper (sm_90) on a machine
without a GPU: registers, spills, shared memory and compile time per variant.

    python -m benchmarks.ops.compile_check                 # all layouts and dtypes, batch 1-256
    python -m benchmarks.ops.compile_check --quick         # bf16, head sizes 64/128/256
    python -m benchmarks.ops.compile_check --json r.json   # also write the report as JSON
    python -m benchmarks.ops.compile_check --no-compile    # only count the variants
    python -m benchmarks.ops.compile_check --quick --infllm '{"selection": "kv_head", "positions": "ordered"}'
    python -m benchmarks.ops.compile_check --quick --softcap 50 --sinks   # Gemma 2 / GPT-OSS softmax
    python -m benchmarks.ops.compile_check --quick --infllm '{"unit_score": "exact", "retrieval_layer": 1}'

How. The runtime (`core/runtime.py`, `core/ops/triton_ops.py`) is driven as the adapter drives
it: one plan per scheduler step (`plan_decode_step` for pure decode, as the builder does on CUDA,
`plan_step` otherwise), then `write_kv` and `infllm_forward` with the Triton ops, over a list of
steps (long prefills cut into selection chunks, mixed prefill/decode steps, decode-only steps of
every batch size 1..256) on a KV cache packed with its side state as vLLM's pages are
(`adapter/side_state.py`), with a block table as wide as a 1M-token max_model_len and the model's
rotary table in the model dtype as the adapter passes it. Triton's launcher is pointed at a
stand-in Hopper driver and its `jit_cache_hook` records each launch's specialisation (signature,
constexprs, alignment attributes, options) and declines to compile or run it, so nothing touches
a GPU; the distinct records are exactly the kernels Triton would build on an H100/H200 for those
steps. Each is then compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))`, Triton's own pipeline with its bundled ptxas, whose verbose log gives registers, stack and
spill bytes.

Exit status 1 when a variant spills or fails to compile (so the quick test can assert it), or when
the decode steps of different batch sizes need more than `--max-variants` variants in all.
Kernels are compiled into a fresh Triton cache so that the compile times are real, by `--jobs`
processes at once (default: one per CPU; each compile is one thread, most of it Triton's passes and
ptxas), forked after the variants are recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real; must precede the first triton import
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="infllm-sm90-cache-"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from vllm_infllm.adapter.side_state import SideStateLayout, side_state_views  # noqa: E402
from vllm_infllm.core.config import InfLLMConfig  # noqa: E402
from vllm_infllm.core.ops import triton_ops  # noqa: E402
from vllm_infllm.core.plan import LayerMemory, PlanBuffers, plan_decode_step, plan_step  # noqa: E402
from vllm_infllm.core.rope import rope_table  # noqa: E402
from vllm_infllm.core.runtime import infllm_forward  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SMS = 132  # H100 SXM and H200
HOPPER_SMEM = 232_448  # bytes of shared memory one block may use on sm_90 (227 KB)
MAX_MODEL_LEN = 1 << 20  # the engine's max_model_len: block-table width, candidate bound

# (name, Hq, Hkv, D): the head layouts of models people serve.
LAYOUTS = [
    ("Llama-3-8B", 32, 8, 128),
    ("SmolLM2-135M", 9, 3, 64),
    ("Qwen2-7B", 28, 4, 128),
    ("Llama-2-7B (MHA)", 32, 32, 128),
    ("Gemma-2-9B (D 256)", 16, 8, 256),
]
QUICK_LAYOUTS = [LAYOUTS[1], LAYOUTS[0], LAYOUTS[4]]  # D 64, 128, 256
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -------------------------------------------------------------------------- recording launches
class _StandInHopper:
    """Just enough of a Triton driver for the launcher to specialise kernels for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return HOPPER

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@dataclasses.dataclass
class Variant:
    kernel: str
    fn: object  # the JITFunction
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    steps: set = dataclasses.field(default_factory=set)  # the steps that launch it

    def constexprs(self) -> dict:
        """The named constexpr arguments (the part of the key a reader can act on)."""
        names = self.fn.arg_names
        return {names[k[0]]: v for k, v in self.constants.items() if len(k) == 1 and k[0] < len(names)}


@contextlib.contextmanager
def recording_launches():
    """Within the block, Triton launches are recorded into the yielded dict {key: Variant} and
    neither compiled nor run (the kernels' outputs stay unwritten)."""
    variants: dict[str, Variant] = {}
    step = {"name": ""}

    def hook(*, key, fn, compile, **_):
        k = f"{fn.name}:{key}"
        if k not in variants:
            variants[k] = Variant(
                kernel=fn.name.rsplit(".", 1)[-1], fn=fn.jit_function, signature=compile["signature"],
                constants=compile["constants"], attrs=compile["configs"][0],
                options=dict(num_warps=compile["num_warps"], num_stages=compile["num_stages"],
                             num_ctas=compile["num_ctas"]),
            )
        variants[k].steps.add(step["name"])
        return True  # handled: do not compile, do not launch

    prev_driver, prev_hook = driver._active, knobs.runtime.jit_cache_hook
    prev_sms = triton_ops.multiprocessors
    driver.set_active(_StandInHopper())
    knobs.runtime.jit_cache_hook = hook
    triton_ops.multiprocessors = lambda device: HOPPER_SMS  # the CPU tensors stand in for an H200's
    try:
        yield variants, step
    finally:
        driver._active, knobs.runtime.jit_cache_hook = prev_driver, prev_hook
        triton_ops.multiprocessors = prev_sms


# ------------------------------------------------------------------------------------ the steps
def scheduler_steps(cfg: InfLLMConfig, max_batch: int) -> list[tuple[str, list[int], list[int]]]:
    """(name, query lens, seq lens) of the steps a server runs: the long-prefill and mixed steps,
    then decode-only steps at every batch size 1..max_batch."""
    deep = 20_000
    steps = [
        ("prefill 2048 @20K", [2048], [deep]),
        ("prefill unaligned 700 @9.3K", [700], [9_300]),
        ("mixed prefill+decodes", [512, 1, 1, 1, 37], [10_752, deep, 9_000, 5_000, 300]),
        ("prefill in the dense regime", [300], [300]),
        ("decode in the dense regime", [1, 1], [300, 1_000]),
    ]
    steps += [(f"decode x{n}", [1] * n, [deep - 61 * i for i in range(n)]) for n in range(1, max_batch + 1)]
    return steps


def record_variants(layout, dtype: torch.dtype, cfg: InfLLMConfig, max_batch: int, softcap: float = 0.0,
                    sinks: bool = False) -> dict[str, Variant]:
    """Drive write_kv + infllm_forward over `scheduler_steps` and record their launches (with the
    model's logit soft-capping and sink logits when given)."""
    _, Hq, Hkv, D = layout
    sink_logits = torch.zeros(Hq) if sinks else None
    B = cfg.block_size
    # A KV cache packed as vLLM's pages are: Hkv K/V head slots plus the side-state slots. The
    # kernels do not run, so a few blocks and an all-zero block table suffice.
    chosen_shape = cfg.chosen_shape(Hkv)  # the stored chunk selections (chunking="aligned")
    chosen_ints = 0 if chosen_shape is None else chosen_shape[0] * chosen_shape[1]
    rows = cfg.repr_rows(Hq, Hkv, dtype.itemsize)
    lay = SideStateLayout(Hq, D, B, dtype, rows, chosen_ints)
    nb = 8
    pages = torch.zeros(nb, Hkv + lay.num_extra_slots(), B, 2 * D, dtype=dtype)
    scores, reprs, sealed, chosen = side_state_views(pages, Hkv, Hq, D, rows, chosen_shape)
    memory = LayerMemory(reprs=reprs, scores=scores, sealed=sealed, chosen=chosen)
    kv_cache = pages[:, :Hkv]
    # vLLM's block table: a persistent [max_num_seqs, cdiv(max_model_len, B)] int32 buffer.
    table = torch.zeros(max(max_batch, 8), -(-MAX_MODEL_LEN // B), dtype=torch.int32)
    # The model's rotary table as the adapter passes it: vLLM's cos_sin_cache [rows, D], cast to
    # the model dtype at the first forward, split into two column views (row stride D).
    cache = torch.cat(rope_table(D, 32), dim=-1).to(dtype)
    cos, sin = cache[:, : D // 2], cache[:, D // 2 :]
    decode_buffers = PlanBuffers(max_batch, "cpu")
    max_candidates = cfg.num_candidates(MAX_MODEL_LEN - 1)
    with recording_launches() as (variants, step):
        for name, q_lens, s_lens in scheduler_steps(cfg, max_batch):
            step["name"] = name
            qsl = [0]
            for n in q_lens:
                qsl.append(qsl[-1] + n)
            T = qsl[-1]
            q = torch.zeros(T, Hq, D, dtype=dtype)
            k = torch.zeros(T, Hkv, D, dtype=dtype)
            slots = torch.zeros(T, dtype=torch.int64)
            if max(q_lens) <= 1:  # pure decode: the static plan the CUDA builder uses
                plan = plan_decode_step(qsl, s_lens, cfg, decode_buffers, max_candidates)
            else:
                plan = plan_step(qsl, s_lens, cfg, device="cpu")
            triton_ops.write_kv(kv_cache, k, k, slots, memory)
            # retrieval_layer L: a layer below it, L itself (the exact score) and one above (reads L's units)
            for layer in range(max(0, cfg.retrieval_layer - 1), cfg.retrieval_layer + 2) if cfg.retrieval_layer >= 0 \
                    else [None]:
                infllm_forward(q, kv_cache, table, plan, memory, cos, sin, cfg, D**-0.5, torch.empty_like(q),
                               ops=triton_ops, softcap=softcap, sinks=sink_logits, layer=layer)
    return variants


# ------------------------------------------------------------------------------------ compiling
_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_variant(v: Variant) -> dict:
    """Compile one variant for sm_90 with Triton's pipeline; read ptxas' verbose log."""
    log = io.StringIO()
    prev = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' -v output to stdout
    knobs.compilation.always_compile = True  # a cache hit (same kernel, other layout) prints no log
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(v.fn, v.signature, v.constants, v.attrs), target=HOPPER,
                               options=v.options)
    except Exception as e:  # a kernel that does not build for sm_90 is a finding, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = prev
    res = {"compile_s": round(time.perf_counter() - t0, 2), "shared_bytes": k.metadata.shared}
    text = log.getvalue()
    for name, rx in _PTXAS.items():
        m = rx.search(text)
        res[name] = int(m.group(1)) if m else None
    return res


_SHOWN = ("PHASE", "SPLITS", "BLOCK_M", "QT", "G", "TOPK", "SCORES", "SOFTCAP", "SINKS", "BLOCK_Q", "BLOCK_U",
          "RESET", "BLOCK_D")


_TO_COMPILE: list[Variant] = []  # what the forked workers compile, by index (they inherit it)


def _compile_nth(i: int) -> dict:
    return compile_variant(_TO_COMPILE[i])


def compile_all(variants: list[Variant], jobs: int) -> list[dict]:
    """compile_variant of each, `jobs` at a time in forked processes (a fork inherits the
    recorded kernels, which do not pickle)."""
    if jobs <= 1 or len(variants) <= 1:
        return [compile_variant(v) for v in variants]
    _TO_COMPILE[:] = variants
    try:
        with multiprocessing.get_context("fork").Pool(min(jobs, len(variants))) as pool:
            return pool.map(_compile_nth, range(len(variants)), chunksize=1)
    finally:
        _TO_COMPILE.clear()


def describe(v: Variant) -> str:
    ce = v.constexprs()
    return " ".join(f"{k}={ce[k]}" for k in _SHOWN if k in ce)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="bf16, head sizes 64/128/256 only")
    ap.add_argument("--no-compile", action="store_true", help="count the variants, do not compile")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-variants", type=int, default=16,
                    help="fail when one layout x dtype needs more variants than this in all")
    ap.add_argument("--only", help="compile only the kernels whose name contains this")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--infllm", default="{}",
                    help='InfLLM config over the package defaults (JSON), e.g. \'{"positions": "ordered"}\'')
    ap.add_argument("--softcap", type=float, default=0.0, help="the model's logit soft-capping (Gemma 2: 50)")
    ap.add_argument("--sinks", action="store_true", help="the model has learned sink logits (GPT-OSS)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at once (default: the CPUs)")
    args = ap.parse_args(argv)

    cfg = InfLLMConfig.from_dict(json.loads(args.infllm))  # default: the package defaults
    layouts = QUICK_LAYOUTS if args.quick else LAYOUTS
    dtypes = {"bf16": DTYPES["bf16"]} if args.quick else DTYPES
    print(f"# Triton kernels for sm_90 (triton {triton.__version__}, torch {torch.__version__})")
    print(f"config: {cfg}; softcap {args.softcap}, sinks {args.sinks}; steps: long/unaligned/mixed prefills "
          f"and decode batches 1..{args.max_batch}\n")
    recorded = {(layout, dname): record_variants(layout, dtype, cfg, args.max_batch, args.softcap, args.sinks)
                for layout in layouts for dname, dtype in dtypes.items()}
    todo = [] if args.no_compile else [v for vs in recorded.values() for v in vs.values()
                                       if not args.only or args.only in v.kernel]
    compiled = dict(zip(map(id, todo), compile_all(todo, args.jobs), strict=True))
    report, ok = [], True
    for layout in layouts:
        for dname in dtypes:
            variants = recorded[layout, dname]
            total = len(variants)
            head = f"## {layout[0]} (Hq {layout[1]}, Hkv {layout[2]}, D {layout[3]}), {dname}: {total} variants"
            if total > args.max_variants:
                head += f"  <-- more than {args.max_variants}"
                ok = False
            print(head)
            print("| kernel | constexprs | launched by | regs | spill st/ld B | stack B | smem B | compile s |")
            print("|---|---|---|---|---|---|---|---|")
            for v in sorted(variants.values(), key=lambda v: (v.kernel, describe(v))):
                steps = sorted(v.steps, key=len)
                decode_n = sorted(int(s.split("x")[1]) for s in v.steps if s.startswith("decode x"))
                by = ", ".join(s for s in steps if not s.startswith("decode x"))
                if decode_n:
                    by = (by + "; " if by else "") + f"decode batch {decode_n[0]}..{decode_n[-1]} ({len(decode_n)})"
                row = {"layout": layout[0], "dtype": dname, "kernel": v.kernel, "constexprs": describe(v),
                       "launched_by": by}
                if id(v) in compiled:
                    row.update(compiled[id(v)])
                    if (row.get("error") or row.get("spill_stores") or row.get("spill_loads")
                            or row.get("shared_bytes", 0) > HOPPER_SMEM):
                        ok = False
                report.append(row)
                if "error" in row:
                    cells = f"| FAILED: {row['error']} | | | | |"
                elif "regs" not in row:
                    cells = "| | | | | |"
                else:
                    cells = (f"| {row['regs']} | {row['spill_stores']}/{row['spill_loads']} | {row['stack']} "
                             f"| {row['shared_bytes']} | {row['compile_s']} |")
                print(f"| {v.kernel} | {describe(v)} | {by} {cells}", flush=True)
            print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": ok, "triton": triton.__version__, "variants": report}, f, indent=1)
    print("OK: every variant compiles, none spills or exceeds the shared memory of a block, variants bounded"
          if ok else f"FAILED (spills, errors, shared memory over {HOPPER_SMEM} B, or too many variants; see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
