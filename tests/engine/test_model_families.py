"""The model families vLLM users run, in a real vLLM CPU engine: tiny random-weight models built
from transformers configs at test time (no downloads).

For each family, ``LLM(..., attention_backend="infllm")`` must give the same greedy tokens as
vLLM's CPU_ATTN while every prompt is shorter than ``n_local`` (InfLLM's full-attention layers
are then exactly dense attention), on a batch with chunked prefill and prefix caching on. Where
a family has sliding-window layers, the prompts run well past the window, so those layers
(vLLM's own kernel inside our backend, adapter/window.py) really drop keys, and their blocks
are freed by vLLM's sliding-window manager. The probe checks which kernel each layer ran and
that every InfLLM layer holds the rotary table of its own layer type.

Families that InfLLM cannot run yet must fail while the engine starts, naming the feature and a
fix (tests/engine/test_model_families.py::test_unsupported_family_fails_at_start).

Each engine runs in its own subprocess (this file is also the child script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMMON = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    initializer_range=0.1,  # peaked logits: greedy ties are unlikely
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
WINDOW = 64  # sliding window of the hybrid families: every prompt but the shortest exceeds it
MAX_MODEL_LEN = 1024
MAX_TOKENS = 8
PROMPT_LENS = [3, 40, 129, 300, 520]
SHARED_PREFIX = 260


def _family_config(family: str):
    """(config class name, config kwargs, model class name) of a tiny model of `family`."""
    if family == "qwen2":  # q/k/v biases
        return "Qwen2Config", dict(COMMON, tie_word_embeddings=False), "Qwen2ForCausalLM"
    if family == "qwen3":  # QK-norm before RoPE
        return "Qwen3Config", dict(COMMON, tie_word_embeddings=False), "Qwen3ForCausalLM"
    if family == "mistral-swa":  # every layer a sliding-window layer (no layer_types)
        return "MistralConfig", dict(COMMON, sliding_window=WINDOW, tie_word_embeddings=False), "MistralForCausalLM"
    if family == "gemma3":
        # Gemma 3's shape: sliding and full layers interleaved, one KV head, head size 256,
        # QK-norm, a RoPE table per layer type (base 1e4 sliding, 1e6 full).
        cfg = dict(COMMON, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                   tie_word_embeddings=False)
        return "Gemma3TextConfig", cfg, "Gemma3ForCausalLM"
    if family == "gemma2":  # logit soft-capping: not supported yet
        cfg = dict(COMMON, head_dim=64, query_pre_attn_scalar=64, sliding_window=WINDOW,
                   attn_logit_softcapping=50.0, tie_word_embeddings=True)
        return "Gemma2Config", cfg, "Gemma2ForCausalLM"
    if family == "stablelm":  # partial rotary (rotary_dim < head size): not supported yet
        cfg = {k: v for k, v in COMMON.items() if k != "head_dim"}
        return "StableLmConfig", dict(cfg, partial_rotary_factor=0.25, tie_word_embeddings=False), "StableLmForCausalLM"
    raise KeyError(family)


def make_tiny_model(family: str, path: Path) -> Path:
    import transformers

    config_cls, kwargs, model_cls = _family_config(family)
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**kwargs)
    cfg.architectures = [model_cls]
    getattr(transformers, model_cls)(cfg).to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path


def make_prompts() -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(3, COMMON["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    round1 = [rnd(n) for n in PROMPT_LENS]
    prefix = round1[-1][:SHARED_PREFIX]
    return round1, [prefix + rnd(17), prefix + rnd(150), rnd(7)]


# ---------------------------------------------------------------- child process


def _child(model_dir: str, backend: str) -> dict:
    """Runs inside a fresh process: one engine, two generate rounds, JSON result."""
    import vllm_infllm

    vllm_infllm.register()  # the entry point is not installed in the dev venv

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model_dir,
        attention_backend=backend,
        enforce_eager=True,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=96,  # chunked prefill of the long prompts, mixed with decodes
        max_num_seqs=8,
        enable_prefix_caching=True,
        skip_tokenizer_init=True,
        seed=0,
        additional_config={"infllm": {"topk": 4}},
    )
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    round1, round2 = make_prompts()
    out1 = llm.generate([TokensPrompt(prompt_token_ids=p) for p in round1], sp, use_tqdm=False)
    out2 = llm.generate([TokensPrompt(prompt_token_ids=p) for p in round2], sp, use_tqdm=False)

    def probe(model):  # runs in the (in-process) worker
        layers = []
        for name, mod in model.named_modules():
            if not (hasattr(mod, "rotary_emb") and hasattr(mod, "attn")):
                continue
            impl, rope = mod.attn.impl, mod.rotary_emb
            window = getattr(impl, "window_impl", None)
            layers.append({
                "name": name,
                "impl": type(impl).__name__,
                "window_impl": type(window).__name__ if window is not None else None,
                "sliding_window": mod.attn.sliding_window,
                "rope_base": float(rope.base),
                "impl_rope_is_layer_rope": getattr(impl, "rope", None) is rope,
            })
        return layers

    # The KV-cache groups the engine core made, and the block manager of each.
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    groups = [
        {"spec": type(g.kv_cache_spec).__name__, "manager": type(m).__name__, "layers": len(g.layer_names)}
        for g, m in zip(scheduler.kv_cache_config.kv_cache_groups, managers, strict=True)
    ]
    return {
        "round1": [list(o.outputs[0].token_ids) for o in out1],
        "round2": [list(o.outputs[0].token_ids) for o in out2],
        "layers": llm.apply_model(probe)[0],
        "groups": groups,
    }


def run_engine(model_dir: Path, backend: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, __file__, "child", str(model_dir), backend]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def engine_result(proc: subprocess.CompletedProcess) -> dict:
    marker = "@@RESULT@@"
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise AssertionError(
        f"engine child failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


# ---------------------------------------------------------------- tests

# family -> the layers' expected kind, in order ("infllm" or "window")
SUPPORTED = {
    "qwen2": ["infllm"] * 4,
    "qwen3": ["infllm"] * 4,
    "gemma3": ["window", "infllm"] * 2,
    "mistral-swa": ["window"] * 4,
}


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("family", list(SUPPORTED))
def test_family_matches_cpu_attn(family, tmp_path):
    model = make_tiny_model(family, tmp_path / family)
    ref = engine_result(run_engine(model, "CPU_ATTN"))
    ours = engine_result(run_engine(model, "infllm"))
    print(json.dumps(ours["layers"], indent=1))

    kinds = ["window" if lay["window_impl"] else "infllm" for lay in ours["layers"]]
    assert kinds == SUPPORTED[family]
    # InfLLM layers get InfLLM's spec and block manager; sliding layers keep vLLM's, which frees
    # their blocks outside the window.
    managers = {(g["spec"], g["manager"]) for g in ours["groups"]}
    expect = set()
    if "infllm" in kinds:
        expect.add(("InfLLMAttentionSpec", "InfLLMKVCacheManager"))
    if "window" in kinds:
        expect.add(("SlidingWindowSpec", "SlidingWindowManager"))
    assert managers == expect, ours["groups"]
    for lay in ours["layers"]:
        assert lay["impl"] == "InfLLMAttentionImpl"
        if lay["window_impl"]:
            assert lay["window_impl"] == "CPUAttentionBackendImpl" and lay["sliding_window"] == WINDOW
        else:
            assert lay["sliding_window"] is None and lay["impl_rope_is_layer_rope"]
    if family == "gemma3":  # each InfLLM layer found the full-attention table, not the sliding one
        assert {lay["rope_base"] for lay in ours["layers"] if not lay["window_impl"]} == {1e6}
    assert ours["round1"] == ref["round1"]
    assert ours["round2"] == ref["round2"]


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("family,expect", [
    ("gemma2", "logits_soft_cap=50.0"),
    ("stablelm", "partial rotary (rotary_dim=16 != head_size=64)"),
])
def test_unsupported_family_fails_at_start(family, expect, tmp_path):
    """What InfLLM cannot run yet is refused while the model is built, before any request,
    with the feature named and another backend suggested."""
    proc = run_engine(make_tiny_model(family, tmp_path / family), "infllm", timeout=600)
    assert "@@RESULT@@" not in proc.stdout
    text = proc.stdout + proc.stderr
    assert "infllm does not support" in text and expect in text, text[-4000:]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    res = _child(sys.argv[2], sys.argv[3])
    print("@@RESULT@@" + json.dumps(res), flush=True)
    os._exit(0)  # skip slow interpreter teardown of the engine
