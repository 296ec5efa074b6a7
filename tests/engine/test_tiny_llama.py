"""The InfLLM backend in a real vLLM engine (CPU build) on a tiny random-weight GQA Llama.

A real ``vllm.LLM`` with ``attention_backend="infllm"``, every prompt shorter than ``n_local``
(where InfLLM is exactly dense attention), must produce the same greedy tokens as vLLM's CPU_ATTN
backend, on a batch with mixed prefill/decode, prompts spanning several 128-token blocks, chunked
prefill, and prefix caching on/off. The engines run one after another in one subprocess (this file
is also the child script; engine_child.py says why and how).
Beyond the window, the adapter is checked against the oracle without an engine
(tests/adapter/test_backend_vs_oracle.py).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_child import ChildResults, report, run_child

# ---------------------------------------------------------------- tiny model and prompts

TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    initializer_range=0.1,  # peaked logits: greedy ties are unlikely
    tie_word_embeddings=False,
)
MAX_MODEL_LEN = 1024
MAX_TOKENS = 12
PROMPT_LENS = [3, 40, 129, 300, 520]
SHARED_PREFIX = 260  # > 2 blocks: second round hits the prefix cache


def make_tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **TINY)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_prompts() -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(3, TINY["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    round1 = [rnd(n) for n in PROMPT_LENS]
    prefix = round1[-1][:SHARED_PREFIX]
    round2 = [prefix + rnd(17), prefix + rnd(150), rnd(7)]
    return round1, round2


# ---------------------------------------------------------------- child process


#: What our backend does in the child (the engines run in-process), counted per engine: forward
#: calls with metadata, and steps whose batch mixes decodes and prefills.
COUNTS = {"forward_calls": 0, "mixed_batches": 0}


def _count_backend_calls() -> None:
    from vllm_infllm.adapter.backend import InfLLMAttentionImpl, InfLLMMetadataBuilder

    counts = COUNTS

    build, forward = InfLLMMetadataBuilder.build, InfLLMAttentionImpl.forward

    @functools.wraps(build)
    def counted_build(self, *args, **kwargs):
        md = build(self, *args, **kwargs)
        counts["mixed_batches"] += bool(md.num_decodes and md.num_prefills)
        return md

    InfLLMMetadataBuilder.build = counted_build

    @functools.wraps(forward)
    def counted_forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        if attn_metadata is not None:
            counts["forward_calls"] += 1
        return forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

    InfLLMAttentionImpl.forward = counted_forward


def _prefix_cache_hits(llm) -> float:
    # vLLM's metrics live in the process's Prometheus registry: they add up over the engines
    # this child ran, so each engine reads the change over its own rounds.
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


def _engine(model_dir: str, backend: str, prefix_caching: bool, unit_score: str) -> dict:
    """One engine, two generate rounds, JSON result. Runs in the child process."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    COUNTS.update(forward_calls=0, mixed_batches=0)
    t0 = time.time()
    llm = LLM(
        model=model_dir,
        attention_backend=backend,
        enforce_eager=True,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=96,  # forces chunked prefill of the long prompts
        max_num_seqs=8,
        enable_prefix_caching=prefix_caching,
        skip_tokenizer_init=True,
        seed=0,
        additional_config={"infllm": {"topk": 4, "unit_score": unit_score}},
        disable_log_stats=False,
    )
    t_init = time.time() - t0
    hits0 = _prefix_cache_hits(llm)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    round1, round2 = make_prompts()
    t0 = time.time()
    out1 = llm.generate([TokensPrompt(prompt_token_ids=p) for p in round1], sp, use_tqdm=False)
    out2 = llm.generate([TokensPrompt(prompt_token_ids=p) for p in round2], sp, use_tqdm=False)
    t_gen = time.time() - t0

    hits = _prefix_cache_hits(llm) - hits0
    counts = dict(COUNTS)

    def probe(model):  # runs in the (in-process) worker
        from vllm.model_executor.layers import rotary_embedding as re_mod

        from vllm_infllm.adapter.side_state import side_state_views

        info = {"layers": []}
        for name, mod in model.named_modules():
            if hasattr(mod, "rotary_emb") and hasattr(mod, "attn"):
                rope, impl = mod.rotary_emb, mod.attn.impl
                cache = rope.cos_sin_cache
                half = rope.rotary_dim // 2
                inv = 1.0 / (rope.base ** (torch.arange(0, rope.rotary_dim, 2).float() / rope.rotary_dim))
                p = torch.arange(cache.shape[0]).float()[:, None] * inv
                entry = {
                    "name": name,
                    "impl": type(impl).__name__,
                    "rope_type": type(rope).__name__,
                    "rope_is_cached_instance": any(v is rope for v in re_mod._ROPE_DICT.values()),
                    "shape": list(cache.shape),
                    "dtype": str(cache.dtype),
                    "is_neox_style": rope.is_neox_style,
                    "rotary_dim": rope.rotary_dim,
                    "head_size": rope.head_size,
                    "max_position_embeddings": rope.max_position_embeddings,
                    "cos_first_sin_second": bool(
                        torch.allclose(cache[:, :half].float(), p.cos(), atol=1e-4)
                        and torch.allclose(cache[:, half:].float(), p.sin(), atol=1e-4)
                    ),
                }
                if type(impl).__name__ == "InfLLMAttentionImpl":
                    entry["impl_rope_is_model_rope"] = getattr(getattr(impl, "rotary", None), "rope", None) is rope
                    kv = mod.attn.kv_cache
                    entry["kv_cache_shape"] = list(kv.shape)
                    entry["kv_cache_stride"] = list(kv.stride())
                    s, r, z, _ = side_state_views(kv, impl.num_kv_heads, impl.num_heads, impl.head_size)
                    entry["side_views"] = [list(s.shape), list(r.shape), list(z.shape)]
                info["layers"].append(entry)
        return info

    probe_info = llm.apply_model(probe)[0]
    cfg = llm.llm_engine.vllm_config
    return {
        "backend": backend,
        "prefix_caching": prefix_caching,
        "round1": [list(o.outputs[0].token_ids) for o in out1],
        "round2": [list(o.outputs[0].token_ids) for o in out2],
        "prefix_cache_hits": hits,
        "t_init": round(t_init, 1),
        "t_generate": round(t_gen, 1),
        "block_size": cfg.cache_config.block_size,
        "num_gpu_blocks": cfg.cache_config.num_gpu_blocks,
        "kv_cache_layout": cfg.cache_config.kv_cache_layout,
        "chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
        "probe": probe_info,
        **counts,
    }


def _child(model_dir: str, jobs: list[list]) -> None:
    """Runs inside a fresh process: each job [backend, prefix caching, unit score] in turn, one
    line each."""
    import vllm_infllm

    vllm_infllm.register()  # the entry point is not installed in the dev venv
    _count_backend_calls()
    for job in jobs:
        report(job, _engine, model_dir, *job)


def run_engines(model_dir: Path, jobs: list[list], timeout: int = 1500) -> ChildResults:
    """The engines [backend, prefix caching, unit score] in one child; `.result(job)` each."""
    return run_child(__file__, str(model_dir), json.dumps(jobs), timeout=timeout)


# ---------------------------------------------------------------- engine test


CASES = [(False, "mean_topk"), (True, "mean_topk"), (True, "minmax")]


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory) -> ChildResults:
    """CPU_ATTN with prefix caching off and on, and InfLLM in each case, in one engine child."""
    model = make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    jobs = [["CPU_ATTN", caching, "mean_topk"] for caching in (False, True)]
    return run_engines(model, jobs + [["infllm", caching, score] for caching, score in CASES])


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("prefix_caching,unit_score", CASES)
def test_engine_matches_cpu_attn(tiny_engines, prefix_caching, unit_score):
    """With prefix caching, InfLLM's block manager (adapter/kv_cache.py) lets a block serve a hit
    only once its representatives are settled: with the paper's representatives that takes
    n_local (4096) more tokens of the writer, which these prompts never reach, so nothing hits;
    with minmax representatives (the block's own keys) every prompt block can."""
    ref = tiny_engines.result(["CPU_ATTN", prefix_caching, "mean_topk"])
    ours = tiny_engines.result(["infllm", prefix_caching, unit_score])
    print(json.dumps({k: v for k, v in ours.items() if k not in ("round1", "round2")}, indent=1))
    print("timings: ref", ref["t_init"], ref["t_generate"], "infllm", ours["t_init"], ours["t_generate"])

    # our backend really ran, on every attention layer, with the model's own rope table
    assert ours["forward_calls"] > 0
    assert ours["mixed_batches"] > 0  # decode + chunked-prefill in one batch
    layers = ours["probe"]["layers"]
    assert len(layers) == TINY["num_hidden_layers"]
    for lay in layers:
        assert lay["impl"] == "InfLLMAttentionImpl"
        assert lay["impl_rope_is_model_rope"] and lay["rope_is_cached_instance"]
        assert lay["cos_first_sin_second"] and lay["is_neox_style"]
        assert lay["shape"] == [TINY["max_position_embeddings"], TINY["head_dim"]]
        # Padded pages: the K/V view (Hkv = 2 slots of [128, 2D] fp32), each block's side state
        # after its K/V: scores 4*128*4 + reprs 4*64*4 + sealed 1, aligned to 3076, + chosen
        # Hkv*topk*4 = 32 -> 3108 bytes; the block stride rounded up to 64 bytes.
        assert lay["kv_cache_shape"][1:] == [2, 128, 128]
        assert lay["kv_cache_stride"][0] * 4 == -(-(2 * 128 * 128 * 4 + 3108) // 64) * 64
    assert all(lay["impl"] == "CPUAttentionBackendImpl" for lay in ref["probe"]["layers"])
    assert ours["block_size"] == 128 and ours["kv_cache_layout"] == "LBHNC"
    # The same VLLM_CPU_KVCACHE_SPACE holds 131072 / 134208 = 0.977 of CPU_ATTN's blocks.
    assert 0.95 * ref["num_gpu_blocks"] <= ours["num_gpu_blocks"] < ref["num_gpu_blocks"], (ours, ref)
    assert ours["chunked_prefill"]
    if prefix_caching:
        assert ref["prefix_cache_hits"] >= 256  # what CPU_ATTN's engine reuses
        if unit_score == "minmax":
            assert ours["prefix_cache_hits"] and ours["prefix_cache_hits"] >= 256
        else:
            assert ours["prefix_cache_hits"] == 0

    assert ours["round1"] == ref["round1"]
    assert ours["round2"] == ref["round2"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    _child(sys.argv[2], json.loads(sys.argv[3]))
    os._exit(0)  # skip slow interpreter teardown of the engine
