"""The real backend classes, driven without an engine, against the oracle beyond the window.

In the style of vLLM's `tests/v1/attention/test_attention_backends.py` (`run_attention_backend`):
the real `InfLLMMetadataBuilder` builds metadata from `CommonAttentionMetadata`, real
`InfLLMAttentionImpl`s (one per layer, built under a real `VllmConfig`, each bound to the rotary
module beside it in a model-shaped module tree by the plugin's own `bind_rotary_tables`) run
`do_kv_cache_update` + `forward` on KV pages made by vLLM's own `create_kv_cache_views` from the
backend's `customize_spec` (so the side state lives in the pages, as in the engine). q and k are
rotated by vLLM's rotary module from `get_rope`, as the model does before attention: plain RoPE,
and the layouts and variants models use (partial rotary, GPT-J pairs, YaRN with its attention
factor), with Gemma 2's logit soft-capping and GPT-OSS's sink logits.

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
from vllm_infllm.testing import Request, max_abs_err, oracle_rope, scale_rotated

# A GQA model small enough for the oracle's per-query loop: 6 query heads over 2 KV heads.
HQ, HKV, D = 6, 2, 64
LAYERS = 2
MAX_POS = 4096
# 128-token blocks (the backend's memory units), a 256-token window, 2 units per chunk.
INFLLM = {**InfLLMConfig.PAPER, "n_init": 128, "n_local": 256, "topk": 2, "repr_topk": 4, "chunk": 128}
CFG = InfLLMConfig.paper(**INFLLM)
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


def make_request(prefill_pieces, decode_steps, gen, scale_qk=1.0) -> Request:
    """Pre-RoPE q/k/v with a leading layer axis: [LAYERS, T, heads, D]."""
    total = sum(prefill_pieces) + decode_steps
    q = torch.randn(LAYERS, total, HQ, D, generator=gen) * scale_qk
    k = torch.randn(LAYERS, total, HKV, D, generator=gen) * scale_qk
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


# One layer selects for the layer above it (docs/design.md 2.7): layer 0 by the exact score.
RETRIEVAL = {**INFLLM, "retrieval_layer": 0, "unit_score": "minmax", "selection": "kv_head"}


@pytest.fixture(scope="module")
def vllm_config_retrieval(tmp_path_factory):
    return _vllm_config(tmp_path_factory, RETRIEVAL)


# unit_score="sketch" below a retrieval layer: the box and the 4-bit codes in the side state.
SKETCH = {**INFLLM, "retrieval_layer": 1, "unit_score": "sketch", "positions": "ordered"}


@pytest.fixture(scope="module")
def vllm_config_sketch(tmp_path_factory):
    return _vllm_config(tmp_path_factory, SKETCH)


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


class _Layer(torch.nn.Module):
    """Where vLLM's models keep an attention layer: `self_attn.attn` (with its impl) beside the
    `self_attn.rotary_emb` it applies to q and k."""

    def __init__(self, impl, rope):
        super().__init__()
        self.rotary_emb = rope
        self.attn = torch.nn.Module()
        self.attn.impl = impl


class Backend:
    """The backend's classes set up as vLLM's runner would, for `LAYERS` layers.

    `model`: the model's RoPE (`get_rope` keyword arguments), `softcap` and `sinks` (True:
    random sink logits per query head, as GPT-OSS's parameter)."""

    def __init__(self, vllm_config, num_blocks: int, model: dict | None = None):
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.rotary_embedding import get_rope
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec,
            KVCacheLayout,
            KVCacheTensor,
            create_kv_cache_views,
        )

        from vllm_infllm.adapter.backend import InfLLMAttentionBackend
        from vllm_infllm.adapter.model_support import bind_rotary_tables

        model = model or {}
        hf = vllm_config.model_config.hf_text_config
        rope_args = model.get("rope", dict(rope_parameters=hf.rope_parameters, is_neox_style=True))
        self.softcap = model.get("softcap", 0.0)
        self.sinks = torch.randn(HQ, generator=torch.Generator().manual_seed(3)) * 2 if model.get("sinks") else None
        with set_current_vllm_config(vllm_config):
            # What the model does before building its attention layers: create its RoPE.
            self.rope = get_rope(D, max_position=MAX_POS, dtype=torch.float32, **rope_args)
            spec = InfLLMAttentionBackend.customize_spec(
                FullAttentionSpec(block_size=128, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
            )
            self.impls = [
                InfLLMAttentionBackend.get_impl_cls()(num_heads=HQ, head_size=D, scale=D**-0.5,
                                                      num_kv_heads=HKV, logits_soft_cap=self.softcap or None,
                                                      sinks=self.sinks)
                for _ in range(LAYERS)
            ]
        # The model's module tree, bound as the plugin binds a model vLLM has just built.
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(_Layer(impl, self.rope) for impl in self.impls)
        assert bind_rotary_tables(self.model, vllm_config) == LAYERS
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
        assert all(impl.rotary.rope is self.rope for impl in self.impls)  # found the model's own table

    def rotate(self, positions, q, k):
        """RoPE at absolute positions with the model's module, as the model applies it."""
        q, k = self.rope.forward_native(positions, q.clone(), k.clone())
        return q.view(-1, HQ, D), k.view(-1, HKV, D)


@dataclasses.dataclass
class AttentionLayer:
    """What the impl reads of vLLM's `Attention` module: its name, which holds the layer index."""

    layer_name: str


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
            impl.forward(AttentionLayer(f"model.layers.{layer}.self_attn.attn"), q, k, v, kv_cache, md, output=out)
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
    layout, cos, sin, mscale = oracle_rope(backend.rope)

    def scaled(x):  # the attention factor (YaRN) scales the rotated channels of q and k
        return scale_rotated(x, layout, mscale)

    chose = 0
    traces = {}  # (layer, request) -> the oracle's trace (a layer above retrieval_layer reads it)
    for layer in range(LAYERS):
        memory = backend.impls[layer]._layer_memory(backend.kv_caches[layer])
        for i, s in enumerate(schedule):
            r = s.request
            trace = traces[layer, i] = infllm_reference_trace(
                scaled(r.q[layer]), scaled(r.k[layer]), r.v[layer], cos, sin, cfg, r.prompt_len,
                step_bounds=r.step_bounds(), rope=layout, softcap=backend.softcap, sinks=backend.sinks, layer=layer,
                retrieval=traces.get((cfg.retrieval_layer, i)))
            err = max_abs_err(outs[layer][i], trace.out)
            assert err <= 2e-4, f"layer {layer} request {i}: max |out - oracle| = {err:.2e}"
            for unit, reprs in trace.reprs.items():
                blk = int(block_table[i, cfg.init_blocks + unit])
                assert bool(memory.sealed[blk]), (layer, i, unit)
                # the backend keeps keys in the ops' NeoX channel order (core/rope.py)
                stored = memory.reprs[blk]
                if cfg.unit_score == "sketch":  # the box, then the codes: decode them to compare
                    stored = torch.cat([stored[: 2 * HKV], decoded_sketch(stored, HKV)])
                torch.testing.assert_close(stored, reprs[:, layout.perm], rtol=1e-4, atol=1e-4)
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
    _check_modes(vllm_config_modes, InfLLMConfig.paper(**MODES), rows=2 * HKV)  # min and max per KV head


def test_backend_matches_oracle_with_the_representatives_kept_apart(vllm_config_max_topk):
    """unit_score="max_topk": repr_topk keys per query head, in pages padded for them."""
    cfg = InfLLMConfig.paper(**MAX_TOPK)
    _check_modes(vllm_config_max_topk, cfg, rows=HQ * cfg.repr_topk)


# The models' RoPE layouts and softmax variants (get_rope arguments as vLLM's model code passes
# them: partial_rotary_factor for StableLM/Phi/GPT-NeoX, is_neox_style=False for GPT-J, YaRN
# for GPT-OSS/Qwen), alone and together.
MODEL_VARIANTS = {
    "partial-rotary": dict(rope=dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
    "gptj-partial": dict(rope=dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                                   is_neox_style=False)),
    "yarn": dict(rope=dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 1024})),
    "softcap-sinks": dict(softcap=3.0, sinks=True),
    "gpt-oss-like": dict(rope=dict(rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0,
                                                    "original_max_position_embeddings": 512, "beta_fast": 32.0,
                                                    "beta_slow": 1.0}), sinks=True),
}


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_backend_matches_oracle_for_the_models_variants(vllm_config, variant):
    """Each model variant through the real Builder and Impl beyond the window: q and k rotated
    by vLLM's own rotary module, whose table the plugin binds (YaRN's attention factor divided
    out, partial and GPT-J channels permuted to NeoX); outputs and representatives against the
    oracle, which rotates as the model defines it."""
    model = MODEL_VARIANTS[variant]
    backend = _check_modes(vllm_config, CFG, rows=HQ, model=model, scale_qk=2.0 if "softcap" in model else 1.0)
    table = backend.impls[0].rotary
    if "yarn" in str(model):
        assert table.attention_factor > 1.0  # YaRN's mscale, divided out of the re-rotation
    permuted = "partial_rotary_factor" in str(model) or "is_neox_style" in str(model)
    assert table.layout.is_canonical != permuted


def decoded_sketch(rows: torch.Tensor, Hkv: int) -> torch.Tensor:
    """unit_score="sketch": the keys a unit's stored rows [R, D] stand for, [Hkv*B, D] (row g*B +
    o), decoded here from the layout config.sketch_code_rows documents (not by the ops)."""
    D = rows.shape[1]
    lo, hi = rows[: 2 * Hkv].float().view(Hkv, 2, D).unbind(1)
    step = ((hi - lo) / 15)[:, None]
    codes = rows[2 * Hkv :].contiguous().view(torch.uint8).view(Hkv, -1, D // 2)
    code = torch.cat([codes & 15, codes >> 4], dim=-1).float()  # low nibble: channel i, high: i + D/2
    return (lo[:, None] + code * step).reshape(-1, D)


def _check_modes(vllm_config, cfg, rows, model=None, scale_qk=1.0):
    g = torch.Generator().manual_seed(1)
    backend = Backend(vllm_config, num_blocks=24, model=model)
    schedule = [
        Scheduled(make_request([300, 417, 300], 6, g, scale_qk), arrival=0),
        Scheduled(make_request([129, 1], 20, g, scale_qk), arrival=0),
        Scheduled(make_request([600, 1], 4, g, scale_qk), arrival=2),
    ]
    table = block_table_for(schedule, torch.randperm(24, generator=g))
    outs = run_schedule(backend, schedule, table, pad_steps={1})
    memory = backend.impls[0]._layer_memory(backend.kv_caches[0])
    assert memory.reprs.shape[1] == rows
    check_against_oracle(backend, schedule, table, outs, cfg)
    return backend


def test_backend_with_a_retrieval_layer_matches_the_oracle(vllm_config_retrieval):
    """retrieval_layer: the impls find their layer index in the layer's name, layer 0 selects by
    the exact score and leaves its choice in the step's plan, layer 1 attends it."""
    _check_modes(vllm_config_retrieval, InfLLMConfig.paper(**RETRIEVAL), rows=2 * HKV)


def test_backend_with_sketch_scores_matches_the_oracle(vllm_config_sketch):
    """unit_score="sketch": the pages hold each unit's box and the 4-bit codes of its keys (fp32
    cache: 2*Hkv + 128*Hkv/8 rows), layer 0 selects by them, layer 1 by the exact score."""
    _check_modes(vllm_config_sketch, InfLLMConfig.paper(**SKETCH), rows=2 * HKV + 128 * HKV // 8)


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
    check_against_oracle(backend, schedule, table, outs, InfLLMConfig.paper(**ALIGNED))

    t = torch.tensor([0, 4], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=t, query_start_loc_cpu=t, seq_lens=torch.tensor([4], dtype=torch.int32),
        num_reqs=1, num_actual_tokens=4, max_query_len=4, max_seq_len=4, block_table_tensor=table[:1],
        slot_mapping=torch.arange(4), seq_lens_cpu_upper_bound=torch.tensor([4], dtype=torch.int32),
    )
    with pytest.raises(RuntimeError, match="needs each request's prompt length"):
        backend.builder.build(common_prefix_len=0, common_attn_metadata=common)
