"""A real vLLM engine (CPU build) with the real model: SmolLM2-135M reads beyond InfLLM's local
window, the sliding-window control does not, and batching / prefix caching do not change it.

Each test runs its engines in a subprocess (in-process engine: VLLM_ENABLE_V1_MULTIPROCESSING=0)
so a crash cannot take pytest down and no engine state leaks between tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vllm_infllm.tools.assets import default_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.engine]

MODEL = default_model_dir()


@pytest.fixture(autouse=True)
def _model_converted():
    assert (MODEL / "config.json").exists(), f"{MODEL} missing: run scripts/setup.sh"

SMALL_WINDOW = {"n_local": 512, "topk": 4}
LENGTH = 4000
# At 4K tokens the needles of depths 0.5 and 0.7 lie ~2000 and ~1200 tokens before the question,
# far outside the 512-token window; depth 0.9 (~400 tokens back) is inside it.
DEPTHS = [0.5, 0.7, 0.9]

RUNNER = textwrap.dedent(
    """
    import json, sys
    import vllm_infllm
    vllm_infllm.register()  # as the entry point does in an installed package
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm_infllm.tools.passkey import make_passkey_prompt

    spec = json.loads(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    prompts = [make_passkey_prompt(tok, n, d) for n, d in spec["prompts"]]
    sp = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0)
    result = {}
    for name, kw in spec["engines"].items():
        llm = LLM(model=spec["model"], enforce_eager=True, dtype="float32", max_model_len=8192,
                  attention_backend="infllm", **kw)
        rounds = []
        for mode in spec["modes"]:
            if mode == "batch":
                outs = llm.generate([p.text for p in prompts], sp, use_tqdm=False)
            else:  # one by one
                outs = [llm.generate([p.text], sp, use_tqdm=False)[0] for p in prompts]
            rounds.append([
                {"key": p.key, "text": o.outputs[0].text, "ids": list(o.outputs[0].token_ids),
                 "ok": p.is_correct(o.outputs[0].text), "tokens": p.num_tokens,
                 "needle": p.needle_token}
                for p, o in zip(prompts, outs)
            ])
        result[name] = rounds
        del llm
    print("RESULT " + json.dumps(result))
    """
)


def run_engines(engines: dict, prompts, modes=("batch",), timeout=1500):
    spec = {"model": str(MODEL), "engines": engines, "prompts": prompts, "modes": list(modes)}
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_passkey_beyond_window_and_control_fails():
    prompts = [(LENGTH, d) for d in DEPTHS]
    result = run_engines(
        {
            "infllm": {"additional_config": {"infllm": SMALL_WINDOW}},
            "control": {"additional_config": {"infllm": {**SMALL_WINDOW, "topk": 0}}},
        },
        prompts,
    )
    infllm, control = result["infllm"][0], result["control"][0]
    assert all(r["tokens"] > 3500 for r in infllm)
    assert [r["ok"] for r in infllm] == [True] * len(DEPTHS), infllm
    # The window + sinks control cannot see a needle that left its window.
    outside = [r for r in control if r["tokens"] - r["needle"] > SMALL_WINDOW["n_local"] + 100]
    assert len(outside) == 2 and not any(r["ok"] for r in outside), control


def test_prefix_caching_and_batching_do_not_change_answers():
    # Different lengths in one generate call == one by one (prefix caching off: every request
    # computes its own blocks), and a prefix-cached engine answers the same prompts right both
    # the first time and when they hit its cache.
    prompts = [(1500, 0.3), (3000, 0.5), (LENGTH, 0.9)]
    result = run_engines(
        {
            "no_prefix_cache": {"additional_config": {"infllm": SMALL_WINDOW},
                                "enable_prefix_caching": False, "max_num_batched_tokens": 8192},
            "prefix_cache": {"additional_config": {"infllm": SMALL_WINDOW},
                             "enable_prefix_caching": True, "max_num_batched_tokens": 8192},
        },
        prompts,
        modes=("batch", "single"),
    )
    batch, single = result["no_prefix_cache"]
    assert [r["ids"] for r in batch] == [r["ids"] for r in single]
    assert all(r["ok"] for r in batch), batch
    first, cached = result["prefix_cache"]
    assert all(r["ok"] for r in first + cached), (first, cached)
