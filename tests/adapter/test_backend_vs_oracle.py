"""The real backend classes, driven without an engine, against the oracle beyond the window.

In the style of vLLM's `tests/v1/attention/test_attention_backends.py` (`run_attention_backend`):
the real `InfLLMMetadataBuilder` builds metadata from `CommonAttentionMetadata`, real
`InfLLMAttentionImpl`s (one per layer, built under a real `VllmConfig`, so they find the model's
own rotary table through vLLM's `get_rope` cache) run `do_kv_cache_update` + `forward` on KV
pages made by vLLM's own `create_kv_cache_views` from the backend's `customize_spec` (so the side
state lives in the pages, as in the engine). q and k are rotated by vLLM's `RotaryEmbedding`, as
the model does before attention.

The schedule goes far past `n_local` with real selection (more candidates than `topk`): several
scheduler steps mixing decodes (first, as vLLM's runner orders them) with prefill pieces that are
not chunk-aligned, a request that arrives late, padding rows, a random block table, two layers,
and a second round whose requests reuse the first round's physical blocks (stale K/V and side
state) in another order. Every layer's output for every token is compared with the oracle, and
every sealed unit's representatives with the oracle's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_infllm.core.config import InfLLMConfig
from vllm_infllm.core.reference import infllm_reference_trace
from vllm_infllm.testing import Request, max_abs_err

# A GQA model small enough for the oracle's per-query loop: 6 query heads over 2 KV heads.
HQ, HKV, D = 6, 2, 64
LAYERS = 2
MAX_POS = 4096
# 128-token blocks (the backend's memory units), a 256-token window, 2 units per chunk.
INFLLM = {"n_init": 128, "n_local": 256, "topk": 2, "repr_topk": 4, "chunk": 128}
CFG = InfLLMConfig(**INFLLM)
PAD = 3  # padding rows appended to some steps (slot -1), as vLLM pads for CUDA graphs


@dataclasses.dataclass
class Scheduled:
    """One request of the test schedule: its pre-RoPE q/k/v and the tokens of each step."""

    request: Request
    arrival: int  # first step it is scheduled in
    done: int = 0  # tokens already computed

    def piece(self, step: int) -> int:
        i = step - self.arrival
        return self.request.pieces[i] if 0 <= i < len(self.request.pieces) else 0


def make_request(prefill_pieces, decode_steps, gen) -> Request:
    """Pre-RoPE q/k/v with a leading layer axis: [LAYERS, T, heads, D]."""
    total = sum(prefill_pieces) + decode_steps
    q = torch.randn(LAYERS, total, HQ, D, generator=gen)
    k = torch.randn(LAYERS, total, HKV, D, generator=gen)
    v = torch.randn(LAYERS, total, HKV, D, generator=gen)
    return Request(list(prefill_pieces) + [1] * decode_steps, sum(prefill_pieces), q, k, v)


# The modes beyond the paper (docs/design.md section 2.7), all at once.
MODES = {**INFLLM, "unit_score": "minmax", "selection": "kv_head", "positions": "ordered",
         "contiguity": 1, "select_queries": 32, "chunking": "step"}
# The paper's representatives kept apart (repr_topk keys per query head: the largest side state).
MAX_TOPK = {**INFLLM, "unit_score": "max_topk", "selection": "kv_head", "chunking": "step"}


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    return _vllm_config(tmp_path_factory, INFLLM)


@pytest.fixture(scope="module")
def vllm_config_modes(tmp_path_factory):
    return _vllm_config(tmp_path_factory, MODES)


@pytest.fixture(scope="module")
def vllm_config_max_topk(tmp_path_factory):
    return _vllm_config(tmp_path_factory, MAX_TOPK)


# Load-independent chunking (docs/design.md 2.3; the default, as in INFLLM) with per-KV-head
# selection: the stored selections in the pages hold one set per KV head.
ALIGNED = {**INFLLM, "chunking": "aligned", "selection": "kv_head"}


@pytest.fixture(scope="module")
def vllm_config_aligned(tmp_path_factory):
    return _vllm_config(tmp_path_factory, ALIGNED)


def _vllm_config(tmp_path_factory, infllm):
    from transformers import LlamaConfig
    from vllm.config import ModelConfig, VllmConfig

    path = tmp_path_factory.mktemp("tiny_llama_config")
    LlamaConfig(
        vocab_size=256, hidden_size=HQ * D, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
        max_position_embeddings=MAX_POS, rope_theta=10000.0,
    ).save_pretrained(path)  # config only: nothing here loads weights
    model = ModelConfig(model=str(path), max_model_len=MAX_POS, dtype="float32", skip_tokenizer_init=True)
    return VllmConfig(model_config=model, additional_config={"infllm": dict(infllm)})


class Backend:
    """The backend's classes set up as vLLM's runner would, for `LAYERS` layers."""

    def __init__(self, vllm_config, num_blocks: int):
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.rotary_embedding import get_rope
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec,
            KVCacheLayout,
            KVCacheTensor,
            create_kv_cache_views,
        )

        from vllm_infllm.adapter.backend import InfLLMAttentionBackend

        hf = vllm_config.model_config.hf_text_config
        with set_current_vllm_config(vllm_config):
            # What the model does before building its attention layers: create its RoPE.
            self.rope = get_rope(D, max_position=MAX_POS, rope_parameters=hf.rope_parameters,
                                 is_neox_style=True, dtype=torch.float32)
            spec = InfLLMAttentionBackend.customize_spec(
                FullAttentionSpec(block_size=128, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
            )
            self.impls = [
                InfLLMAttentionBackend.get_impl_cls()(num_heads=HQ, head_size=D, scale=D**-0.5,
                                                      num_kv_heads=HKV)
                for _ in range(LAYERS)
            ]
        self.builder = InfLLMAttentionBackend.get_builder_cls()(
            spec, [f"layer.{i}" for i in range(LAYERS)], vllm_config, torch.device("cpu")
        )
        page = spec.page_size_bytes
        raw = torch.randn(LAYERS * num_blocks * page // 4).view(torch.int8)  # stale garbage everywhere
        tensor = KVCacheTensor(size=raw.numel(), layers=[f"layer.{i}" for i in range(LAYERS)],
                               layer_stride=num_blocks * page, block_stride=page)
        self.kv_caches = create_kv_cache_views(raw, spec, num_blocks, KVCacheLayout.LBHNC, tensor)
        # Padded pages: the K/V view, each block's side state after its K/V in the page.
        assert self.kv_caches[0].shape == (num_blocks, HKV, 128, 2 * D)
        assert self.kv_caches[0].stride(0) * 4 == page > HKV * 128 * 2 * D * 4
        assert all(impl.rope is self.rope for impl in self.impls)  # found the model's own table

    def rotate(self, positions, q, k):
        """RoPE at absolute positions with the model's module, as the model applies it."""
        q, k = self.rope.forward_native(positions, q.clone(), k.clone())
        return q.view(-1, HQ, D), k.view(-1, HKV, D)


def run_schedule(backend: Backend, schedule: list[Scheduled], block_table: torch.Tensor, pad_steps):
    """Run every step of the schedule through builder + impls; returns per-layer outputs. The
    builder gets each request's prompt length, as vLLM's model runner gives it."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_infllm.adapter import prompt_lengths

    outs = [[torch.full((s.request.total, HQ, D), float("nan")) for s in schedule] for _ in range(LAYERS)]
    steps = max(s.arrival + len(s.request.pieces) for s in schedule)
    for step in range(steps):
        active = [i for i, s in enumerate(schedule) if schedule[i].piece(step)]
        active.sort(key=lambda i: schedule[i].piece(step) > 1)  # decodes first, as vLLM orders them
        qsl, seq_lens, rows = [0], [], []
        for i in active:
            s = schedule[i]
            n = s.piece(step)
            rows.append((i, s.done, s.done + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(s.done + n)
        num_tokens = qsl[-1]
        pad = PAD if step in pad_steps else 0
        positions = torch.cat([torch.arange(a, b) for _, a, b in rows] + [torch.zeros(pad, dtype=torch.long)])
        slots = torch.cat([block_table[i, torch.arange(a, b) // 128].long() * 128 + torch.arange(a, b) % 128
                           for i, a, b in rows] + [torch.full((pad,), -1)])
        qsl_t = torch.tensor(qsl, dtype=torch.int32)
        seq_t = torch.tensor(seq_lens, dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=qsl_t, query_start_loc_cpu=qsl_t, seq_lens=seq_t, num_reqs=len(active),
            num_actual_tokens=num_tokens + pad, max_query_len=max(b - a for _, a, b in rows),
            max_seq_len=max(seq_lens), block_table_tensor=block_table[active], slot_mapping=slots,
            seq_lens_cpu_upper_bound=seq_t, positions=positions,
        )
        with prompt_lengths.given([schedule[i].request.prompt_len for i in active]):
            md = backend.builder.build(common_prefix_len=0, common_attn_metadata=common)
        for layer, (impl, kv_cache) in enumerate(zip(backend.impls, backend.kv_caches, strict=True)):
            q = torch.cat([schedule[i].request.q[layer, a:b] for i, a, b in rows] + [torch.randn(pad, HQ, D)])
            k = torch.cat([schedule[i].request.k[layer, a:b] for i, a, b in rows] + [torch.randn(pad, HKV, D)])
            v = torch.cat([schedule[i].request.v[layer, a:b] for i, a, b in rows] + [torch.randn(pad, HKV, D)])
            q, k = backend.rotate(positions, q, k)
            out = torch.full_like(q, float("nan"))
            impl.do_kv_cache_update(None, k, v, kv_cache, md.slot_mapping)
            impl.forward(None, q, k, v, kv_cache, md, output=out)
            for j, (i, a, b) in enumerate(rows):
                outs[layer][i][a:b] = out[qsl[j] : qsl[j + 1]]
        for i, _, b in rows:
            schedule[i].done = b
    return outs


def block_table_for(schedule: list[Scheduled], blocks: torch.Tensor) -> torch.Tensor:
    """A block table giving each request, in order, the next of `blocks` (physical ids)."""
    widths = [-(-s.request.total // 128) for s in schedule]
    assert sum(widths) <= len(blocks)
    table = torch.zeros(len(schedule), max(widths), dtype=torch.int32)
    at = 0
    for i, w in enumerate(widths):
        table[i, :w] = blocks[at : at + w]
        at += w
    return table


def check_against_oracle(backend: Backend, schedule, block_table, outs, cfg=CFG):
    cache = backend.rope.cos_sin_cache
    cos, sin = cache[:, : D // 2], cache[:, D // 2 :]
    chose = 0
    for layer in range(LAYERS):
        memory = backend.impls[layer]._layer_memory(backend.kv_caches[layer])
        for i, s in enumerate(schedule):
            r = s.request
            trace = infllm_reference_trace(r.q[layer], r.k[layer], r.v[layer], cos, sin, cfg,
                                           r.prompt_len, step_bounds=r.step_bounds())
            err = max_abs_err(outs[layer][i], trace.out)
            assert err <= 2e-4, f"layer {layer} request {i}: max |out - oracle| = {err:.2e}"
            for unit, reprs in trace.reprs.items():
                blk = int(block_table[i, cfg.init_blocks + unit])
                assert bool(memory.sealed[blk]), (layer, i, unit)
                torch.testing.assert_close(memory.reprs[blk], reprs, rtol=1e-4, atol=1e-4)
            chose += sum(c.num_candidates > cfg.topk for c in trace.chunks)
    assert chose >= 8 * LAYERS, f"only {chose} chunks made a real selection (more candidates than topk)"


def test_backend_matches_oracle_beyond_window_with_recycled_blocks(vllm_config):
    g = torch.Generator().manual_seed(0)
    num_blocks = 40
    backend = Backend(vllm_config, num_blocks)

    # Round 1: far beyond n_local=256 (up to 12 memory units), mixed steps, a late arrival.
    round1 = [
        Scheduled(make_request([300, 417, 300], 6, g), arrival=0),  # unaligned prefill pieces
        Scheduled(make_request([900], 12, g), arrival=1),  # one long piece: several waves
        Scheduled(make_request([129, 1], 20, g), arrival=0),  # short prompt, long decode, into memory
        Scheduled(make_request([600, 1], 4, g), arrival=3),  # arrives while others decode
    ]
    perm = torch.randperm(num_blocks, generator=g)
    table1 = block_table_for(round1, perm)
    at = sum(-(-s.request.total // 128) for s in round1)  # blocks round 1 used
    outs = run_schedule(backend, round1, table1, pad_steps={0, 2})
    check_against_oracle(backend, round1, table1, outs)

    # Round 2: new requests on the same physical blocks, in another order. The blocks hold the
    # first round's K/V, scores and sealed flags: the backend must start each one afresh.
    round2 = [
        Scheduled(make_request([500, 260], 8, g), arrival=0),
        Scheduled(make_request([1000], 5, g), arrival=0),
    ]
    used = perm[:at][torch.randperm(at, generator=g)]
    table2 = block_table_for(round2, used)
    at = sum(-(-s.request.total // 128) for s in round2)
    memory = backend.impls[0]._layer_memory(backend.kv_caches[0])
    assert int(memory.sealed[used[:at].long()].sum()) >= 5  # stale flags the backend must reset
    outs = run_schedule(backend, round2, table2, pad_steps={1})
    check_against_oracle(backend, round2, table2, outs)


def test_backend_matches_oracle_in_the_modes_beyond_the_paper(vllm_config_modes):
    """minmax unit scores, per-KV-head selection, ordered positions, contiguity and the chunk's
    last queries selecting, through the real Builder and Impl: side-state pages sized for either
    representative layout, the views the config's."""
    _check_modes(vllm_config_modes, InfLLMConfig(**MODES), rows=2 * HKV)  # min and max per KV head


def test_backend_matches_oracle_with_the_representatives_kept_apart(vllm_config_max_topk):
    """unit_score="max_topk": repr_topk keys per query head, in pages padded for them."""
    cfg = InfLLMConfig(**MAX_TOPK)
    _check_modes(vllm_config_max_topk, cfg, rows=HQ * cfg.repr_topk)


def _check_modes(vllm_config, cfg, rows):
    g = torch.Generator().manual_seed(1)
    backend = Backend(vllm_config, num_blocks=24)
    schedule = [
        Scheduled(make_request([300, 417, 300], 6, g), arrival=0),
        Scheduled(make_request([129, 1], 20, g), arrival=0),
        Scheduled(make_request([600, 1], 4, g), arrival=2),
    ]
    table = block_table_for(schedule, torch.randperm(24, generator=g))
    outs = run_schedule(backend, schedule, table, pad_steps={1})
    memory = backend.impls[0]._layer_memory(backend.kv_caches[0])
    assert memory.reprs.shape[1] == rows
    check_against_oracle(backend, schedule, table, outs, cfg)


def test_backend_with_aligned_chunking_matches_the_step_free_oracle(vllm_config_aligned):
    """chunking="aligned": the builder takes each request's prompt length (from vLLM's runner;
    here given), the steps continue chunks with the selections stored in the pages, and the
    oracle's result does not depend on the step bounds it is given (the aligned rule ignores
    them). Without the prompt lengths the builder refuses to guess."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    g = torch.Generator().manual_seed(2)
    backend = Backend(vllm_config_aligned, num_blocks=24)
    schedule = [
        Scheduled(make_request([300, 417, 300], 6, g), arrival=0),  # steps end inside chunks
        Scheduled(make_request([129, 1], 20, g), arrival=0),
        Scheduled(make_request([600, 1], 4, g), arrival=2),
    ]
    table = block_table_for(schedule, torch.randperm(24, generator=g))
    outs = run_schedule(backend, schedule, table, pad_steps={1})
    memory = backend.impls[0]._layer_memory(backend.kv_caches[0])
    assert memory.chosen.shape == (24, HKV, CFG.topk)
    check_against_oracle(backend, schedule, table, outs, InfLLMConfig(**ALIGNED))

    t = torch.tensor([0, 4], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=t, query_start_loc_cpu=t, seq_lens=torch.tensor([4], dtype=torch.int32),
        num_reqs=1, num_actual_tokens=4, max_query_len=4, max_seq_len=4, block_table_tensor=table[:1],
        slot_mapping=torch.arange(4), seq_lens_cpu_upper_bound=torch.tensor([4], dtype=torch.int32),
    )
    with pytest.raises(RuntimeError, match="needs each request's prompt length"):
        backend.builder.build(common_prefix_len=0, common_attn_metadata=common)
