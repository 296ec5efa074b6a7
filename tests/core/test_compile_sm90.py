"""The Triton kernels compiled for Hopper (sm_90) on this machine, without a GPU.

benchmarks/ops/compile_check.py records every kernel variant the runtime launches over a server's
steps (long and unaligned prefills, mixed steps, decode batches of every size) and compiles each
with Triton's own pipeline and bundled ptxas; it exits 1 when a variant fails to build, spills
registers, needs more shared memory than an sm_90 block has, or when the variants are not bounded.
The interpreter (test_triton_ops.py) checks what the kernels compute; only a real compile shows
registers, spills and shared memory.

Run in a subprocess: Triton must be imported there without TRITON_INTERPRET, which this process
may have set for test_triton_ops.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _compile_check(tmp_path, *args: str) -> dict:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # real compiles, nothing shared
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.ops.compile_check", *args, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    report["rc"], report["log"] = res.returncode, res.stdout[-6000:] + res.stderr[-2000:]
    return report


PAPER = '{"unit_score": "mean_topk", "positions": "fixed"}'


@pytest.mark.parametrize("infllm,attends", [(PAPER, 4), ("{}", 3)], ids=["paper", "defaults"])
def test_variants_are_bounded_over_batch_sizes(tmp_path, infllm, attends):
    # Decode steps of every batch size 1..256 plus the prefill shapes: the same few kernels.
    rep = _compile_check(tmp_path, "--no-compile", "--max-batch", "256", "--infllm", infllm)
    assert rep["rc"] == 0 and rep["ok"], rep["log"]
    per = {}
    for v in rep["variants"]:
        per.setdefault((v["layout"], v["dtype"]), []).append(v)
    assert len(per) == 15  # 5 head layouts x 3 dtypes
    for key, vs in per.items():
        kernels = sorted(v["kernel"] for v in vs)
        # attend: decode (inline scores), prefill (LSE out), split attend, split scores; the
        # default's sketch reads no attention mass: no score pass, and decode needs no inline one
        assert kernels.count("_attend_kernel") == attends, (key, kernels)
        assert len(vs) <= 11, (key, kernels)


@pytest.mark.slow
@pytest.mark.parametrize("args", [("--infllm", PAPER),
                                  ("--infllm", "{}"),  # the defaults: the sketch, "ordered"
                                  ("--infllm", '{"selection": "kv_head", "positions": "ordered", '
                                               '"unit_score": "max_topk"}'),
                                  # layer 0 minmax, layer 1 the retrieval layer (the exact score), layer 2 reads it
                                  ("--infllm", '{"unit_score": "minmax", "contiguity": 1, "select_queries": 16, '
                                               '"chunking": "step", "retrieval_layer": 1}'),
                                  # the models' softmax variants, with the sketch below a retrieval layer
                                  # (not with "ordered": its D-64 split decode with softcap spills, see
                                  # benchmarks/RESULTS.md section 7)
                                  ("--softcap", "50", "--sinks", "--infllm",
                                   '{"unit_score": "sketch", "positions": "fixed", "retrieval_layer": 1}')],
                         ids=["paper", "defaults", "kv_head-ordered-max_topk", "minmax-contiguity-last-retrieval",
                              "softcap-sinks-sketch-retrieval"])
def test_kernels_compile_for_sm90_without_spills(tmp_path, args):
    # bf16 at head sizes 64, 128 and 256 (the --quick set), decode batches up to 40 so that both
    # the split and the one-program decode kernels are built; the paper's rule, the modes beyond
    # it and the models' softmax variants (Gemma 2's soft-capping, GPT-OSS's sinks): their own
    # attend variants.
    rep = _compile_check(tmp_path, "--quick", "--max-batch", "40", *args)
    assert rep["rc"] == 0 and rep["ok"], rep["log"]
    built = [v for v in rep["variants"] if "regs" in v]
    assert {v["layout"] for v in built} == {"SmolLM2-135M", "Llama-3-8B", "Gemma-2-9B (D 256)"}
    for v in built:
        assert v["spill_stores"] == 0 and v["spill_loads"] == 0, v
        assert 0 < v["regs"] <= 255 and v["shared_bytes"] <= 232_448, v
    kernels = {v["kernel"] for v in built}
    if any("retrieval_layer" in a for a in args):  # the retrieval layer's kernel was built too
        assert "_score_exact_kernel" in kernels, sorted(kernels)
    if any("sketch" in a or a == "{}" for a in args):  # the sketch (the default) scored its codes
        assert "_score_sketch_kernel" in kernels, sorted(kernels)
