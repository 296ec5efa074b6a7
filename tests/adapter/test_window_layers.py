"""Sliding-window layers of hybrid models through the InfLLM backend, driven without an engine.

Real vLLM `Attention` layers are built under a `VllmConfig` that selects INFLLM (as the model
would build them), so vLLM's selector, our impl and our builder decide everything themselves:
a layer with a window wraps vLLM's CPU_ATTN impl, a KV-cache group of such layers gets CPU_ATTN's
builder, the spec stays vLLM's `SlidingWindowSpec` (no side state). The pages are strided as the
engine makes them next to InfLLM layers (padded to the InfLLM page by vLLM's page unification).
The schedule runs far past the window, with chunked prefill, decodes and a random block table,
and every token's output is compared with the oracle's sliding-window mode
(`sliding_window_reference`). A disabled hybrid KV-cache manager is refused with the fix.
"""

from __future__ import annotations

import pytest
import torch

from vllm_infllm.core.reference import sliding_window_reference
from vllm_infllm.core.rope import rope_table, rotate
from vllm_infllm.testing import max_abs_err, random_block_table

HQ, HKV, D = 6, 2, 64
WINDOW = 100
MAX_POS = 2048


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    import vllm_infllm

    vllm_infllm.register()
    from transformers import LlamaConfig
    from vllm.config import CacheConfig, ModelConfig, VllmConfig
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    path = tmp_path_factory.mktemp("window_config")
    LlamaConfig(vocab_size=256, hidden_size=HQ * D, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                max_position_embeddings=MAX_POS).save_pretrained(path)  # config only
    model = ModelConfig(model=str(path), max_model_len=MAX_POS, dtype="float32", skip_tokenizer_init=True)
    return VllmConfig(model_config=model, cache_config=CacheConfig(block_size=128),
                      attention_config=AttentionConfig(backend=AttentionBackendEnum["INFLLM"]))


def _layers(vllm_config, windows: dict[str, int | None]):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(vllm_config):
        # What the model does before its attention layers: create its RoPE (the full layers' own).
        get_rope(D, max_position=MAX_POS, rope_parameters=vllm_config.model_config.hf_text_config.rope_parameters,
                 is_neox_style=True, dtype=torch.float32)
        return {name: Attention(HQ, D, D**-0.5, num_kv_heads=HKV, cache_config=vllm_config.cache_config,
                                per_layer_sliding_window=w, prefix=name)
                for name, w in windows.items()}


def test_sliding_layer_runs_vllms_kernel_and_matches_the_oracle(vllm_config):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from vllm_infllm.adapter.backend import InfLLMAttentionBackend, InfLLMAttentionImpl

    name = "model.layers.0.self_attn.attn"
    layer = _layers(vllm_config, {name: WINDOW})[name]
    assert layer.attn_backend is InfLLMAttentionBackend
    assert isinstance(layer.impl, InfLLMAttentionImpl) and isinstance(layer.impl.window_impl, CPUAttentionBackendImpl)
    spec = layer.get_kv_cache_spec(vllm_config)
    assert type(spec) is SlidingWindowSpec and spec.sliding_window == WINDOW  # no side state
    assert spec.page_size_padded is None and spec.num_head_slots is None
    with set_current_vllm_config(vllm_config):
        builder = InfLLMAttentionBackend.get_builder_cls()(spec, [name], vllm_config, torch.device("cpu"))
    assert isinstance(builder.window_builder, CPUAttentionMetadataBuilder)
    assert builder.window_builder.window_size == WINDOW

    # Pages strided as vLLM lays them out next to InfLLM layers: padded to an InfLLM page.
    with set_current_vllm_config(vllm_config):
        infllm_page = InfLLMAttentionBackend.customize_spec(
            FullAttentionSpec(block_size=128, num_kv_heads=HKV, head_size=D, dtype=torch.float32)).page_size_bytes
    assert infllm_page > spec.page_size_bytes
    lens = [700, 450]
    gen = torch.Generator().manual_seed(0)
    table, num_blocks = random_block_table(lens, 128, 3, gen)
    raw = torch.randn(num_blocks * infllm_page // 4, generator=gen)  # stale garbage everywhere
    kv_cache = raw.as_strided((num_blocks, HKV, 128, 2 * D), (infllm_page // 4, 128 * 2 * D, 2 * D, 1))
    cos, sin = rope_table(D, MAX_POS)
    qkv = [(torch.randn(n, HQ, D, generator=gen), torch.randn(n, HKV, D, generator=gen),
            torch.randn(n, HKV, D, generator=gen)) for n in lens]
    outs = [torch.full((n, HQ, D), float("nan")) for n in lens]

    # Steps: chunked prefill pieces of 96 tokens for both, then the rest as decodes.
    done = [0, 0]
    prompt = [620, 450]
    while any(d < n for d, n in zip(done, lens, strict=True)):
        rows = []
        for r in sorted(range(2), key=lambda r: done[r] < prompt[r]):  # decodes first
            if done[r] < lens[r]:
                n = min(96, prompt[r] - done[r]) if done[r] < prompt[r] else 1
                rows.append((r, done[r], done[r] + n))
        qsl = [0]
        for _, a, b in rows:
            qsl.append(qsl[-1] + b - a)
        pos = torch.cat([torch.arange(a, b) for _, a, b in rows])
        slots = torch.cat([table[r, torch.arange(a, b) // 128].long() * 128 + torch.arange(a, b) % 128
                           for r, a, b in rows])
        q = torch.cat([rotate(qkv[r][0][a:b], cos, sin, torch.arange(a, b)) for r, a, b in rows])
        k = torch.cat([rotate(qkv[r][1][a:b], cos, sin, torch.arange(a, b)) for r, a, b in rows])
        v = torch.cat([qkv[r][2][a:b] for r, a, b in rows])
        qsl_t = torch.tensor(qsl, dtype=torch.int32)
        seq_t = torch.tensor([b for _, _, b in rows], dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=qsl_t, query_start_loc_cpu=qsl_t, seq_lens=seq_t, num_reqs=len(rows),
            num_actual_tokens=qsl[-1], max_query_len=max(b - a for _, a, b in rows),
            max_seq_len=int(seq_t.max()), block_table_tensor=table[[r for r, _, _ in rows]],
            slot_mapping=slots, seq_lens_cpu_upper_bound=seq_t, positions=pos,
        )
        md = builder.build(common_prefix_len=0, common_attn_metadata=common)
        out = torch.empty(qsl[-1], HQ, D)
        layer.impl.do_kv_cache_update(layer, k, v, kv_cache, slots)
        layer.impl.forward(layer, q, k, v, kv_cache, md, out)
        for i, (r, a, b) in enumerate(rows):
            outs[r][a:b] = out[qsl[i]:qsl[i + 1]]
            done[r] = b

    for r, n in enumerate(lens):
        want = sliding_window_reference(*qkv[r], cos, sin, WINDOW)
        assert max_abs_err(outs[r], want) < 2e-4, (r, max_abs_err(outs[r], want))
        # ... and it is not full attention: past the window the outputs differ.
        full = sliding_window_reference(*qkv[r], cos, sin, n)
        assert max_abs_err(outs[r][WINDOW + 50:], full[WINDOW + 50:]) > 1e-2


def test_a_sliding_layer_refuses_a_disabled_hybrid_kv_cache_manager(vllm_config):
    """Without vLLM's hybrid KV-cache manager, sliding and full-attention layers would share one
    KV-cache group (one metadata builder for two kernels): refused while the model is built,
    with the flag to remove."""
    vllm_config.scheduler_config.disable_hybrid_kv_cache_manager = True
    try:
        with pytest.raises(ValueError, match="disable-hybrid-kv-cache-manager"):
            _layers(vllm_config, {"model.layers.1.self_attn.attn": WINDOW})
        # Full-attention layers do not care.
        _layers(vllm_config, {"model.layers.2.self_attn.attn": None})
    finally:
        vllm_config.scheduler_config.disable_hybrid_kv_cache_manager = False
