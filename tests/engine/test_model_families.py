"""The model families vLLM users run, in a real vLLM CPU engine: tiny random-weight models built
from transformers configs at test time (no downloads).

For each family, ``LLM(..., attention_backend="infllm")`` with a 384-token window must

- give the same greedy tokens as vLLM's CPU_ATTN while every prompt is shorter than ``n_local``
  (InfLLM's full-attention layers are then exactly dense attention), on a batch with chunked
  prefill and prefix caching on;
- beyond the window (one 900-token prompt, chunked prefill, then decodes), give every layer the
  output of the oracle on that layer's own inputs: InfLLM layers `infllm_reference_trace`,
  sliding-window layers `sliding_window_reference`, each with the model's RoPE layout, table,
  attention factor, soft-capping and sinks. Forward hooks capture each layer's q and k before
  the model's rotary module (the oracle applies RoPE itself, computed apart from vLLM's table),
  its v, and its output.

Where a family has sliding-window layers (window 64), they run vLLM's own kernel inside our
backend (adapter/window.py) and their blocks are freed by vLLM's sliding-window manager. The
probe checks which kernel each layer ran and that every InfLLM layer holds the rotary module
beside it in the model. Families InfLLM cannot run fail while the engine starts, naming the
feature and a fix (test_unsupported_family_fails_at_start).

The engines run one after another in one subprocess (this file is also the child script;
engine_child.py says why and how).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from engine_child import ChildResults, report, run_child

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
# A window of 384 tokens, so that memory units are read by the long prompt (900 tokens: up to 3
# candidates, 2 selected per chunk) while the batch of short prompts stays dense.
INFLLM = {"n_init": 128, "n_local": 384, "topk": 2, "chunk": 128}
PROMPT_LENS = [3, 40, 129, 300, 380]
SHARED_PREFIX = 260
LONG_PROMPT, LONG_DECODE = 900, 4


def _family_config(family: str):
    """(config class name, config kwargs, model class name) of a tiny model of `family`."""
    untied = dict(COMMON, tie_word_embeddings=False)
    if family == "qwen2":  # q/k/v biases
        return "Qwen2Config", untied, "Qwen2ForCausalLM"
    if family == "qwen3":  # QK-norm before RoPE
        return "Qwen3Config", untied, "Qwen3ForCausalLM"
    if family == "mistral-swa":  # every layer a sliding-window layer (no layer_types)
        return "MistralConfig", dict(untied, sliding_window=WINDOW), "MistralForCausalLM"
    if family == "gemma3":
        # Gemma 3's shape: sliding and full layers interleaved, one KV head, head size 256,
        # QK-norm, a RoPE table per layer type (base 1e4 sliding, 1e6 full).
        cfg = dict(untied, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
        return "Gemma3TextConfig", cfg, "Gemma3ForCausalLM"
    if family == "gemma2":  # logit soft-capping in every layer, sliding and full interleaved
        cfg = dict(COMMON, query_pre_attn_scalar=64, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                   final_logit_softcapping=30.0, tie_word_embeddings=True)
        return "Gemma2Config", cfg, "Gemma2ForCausalLM"
    if family == "stablelm":  # partial rotary: the first quarter of each head, NeoX halves
        cfg = {k: v for k, v in untied.items() if k != "head_dim"}
        return "StableLmConfig", dict(cfg, partial_rotary_factor=0.25), "StableLmForCausalLM"
    if family == "gptj":  # GPT-J: interleaved pairs (2i, 2i+1) over the first rotary_dim channels
        cfg = dict(vocab_size=512, n_embd=256, n_layer=4, n_head=4, rotary_dim=32, n_positions=2048,
                   n_inner=512, initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        return "GPTJConfig", cfg, "GPTJForCausalLM"
    if family == "llama-yarn":  # YaRN: a table scaled by the attention factor (mscale)
        cfg = dict(untied, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 512})
        return "LlamaConfig", cfg, "LlamaForCausalLM"
    if family == "gpt-oss":  # learned sinks, YaRN, sliding and full interleaved, a small MoE
        cfg = dict(untied, intermediate_size=256, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                   layer_types=["sliding_attention", "full_attention"] * 2,
                   rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 512,
                                    "rope_theta": 150000.0})
        return "GptOssConfig", cfg, "GptOssForCausalLM"
    if family == "phi3-longrope":  # Phi-4-mini's shape: LongRoPE on 3/4 of each head
        cfg = dict(untied, original_max_position_embeddings=512, partial_rotary_factor=0.75, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 24,
            "long_factor": [1.0 + i / 8 for i in range(24)], "original_max_position_embeddings": 512,
            "partial_rotary_factor": 0.75})
        return "Phi3Config", cfg, "Phi3ForCausalLM"
    if family == "bloom":  # ALiBi: not supported
        cfg = dict(vocab_size=512, hidden_size=256, n_layer=2, n_head=4, initializer_range=0.1,
                   bos_token_id=1, eos_token_id=2)
        return "BloomConfig", cfg, "BloomForCausalLM"
    raise KeyError(family)


def make_tiny_model(family: str, path: Path) -> Path:
    import transformers

    config_cls, kwargs, model_cls = _family_config(family)
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**kwargs)
    cfg.architectures = [model_cls]
    getattr(transformers, model_cls)(cfg).to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path


def make_prompts() -> tuple[list[list[int]], list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(3, COMMON["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    round1 = [rnd(n) for n in PROMPT_LENS]
    prefix = round1[-1][:SHARED_PREFIX]
    return round1, [prefix + rnd(17), prefix + rnd(100), rnd(7)], rnd(LONG_PROMPT)


# ---------------------------------------------------------------- child process


class _Capture:
    """Forward hooks on every attention module of the model: q and k before its rotary module,
    v and the attention output, per step, while `on`. A rotary module may be shared by all
    layers (vLLM's `get_rope` caches them), so its hook files the call under the attention
    module that is running."""

    def __init__(self):
        self.on = False
        self.steps: dict[str, list[dict]] = {}
        self.current: str | None = None

    def install(self, model):
        ropes = set()
        for name, mod in model.named_modules():
            if not (hasattr(mod, "rotary_emb") and hasattr(mod, "attn")):
                continue
            steps = self.steps.setdefault(name, [])

            def enter(_m, _args, _kwargs, name=name):
                self.current = name

            def after_attn(_m, args, out, steps=steps):
                if self.on:
                    steps[-1].update(v=args[2].clone(), out=out.clone())

            mod.register_forward_pre_hook(enter, with_kwargs=True)
            mod.attn.register_forward_hook(after_attn)
            if id(mod.rotary_emb) not in ropes:
                ropes.add(id(mod.rotary_emb))
                mod.rotary_emb.register_forward_pre_hook(self._before_rope)
        return len(self.steps)

    def _before_rope(self, _m, args):
        if self.on:
            positions, q, k = args[:3]
            self.steps[self.current].append({"pos": positions.clone(), "q": q.clone(), "k": k.clone()})


def _oracle_errors(model, capture: _Capture, prompt_len: int, hf_config) -> list[dict]:
    """Each layer's captured output against the oracle on its captured inputs."""
    from vllm_infllm.core.config import InfLLMConfig
    from vllm_infllm.core.reference import infllm_reference_trace, sliding_window_reference
    from vllm_infllm.testing import max_abs_err, oracle_rope, scale_rotated

    cfg = InfLLMConfig(**INFLLM)
    softcap = float(getattr(hf_config, "attn_logit_softcapping", None) or 0.0)
    rows = []
    for name, mod in model.named_modules():
        if name not in capture.steps:
            continue
        steps = capture.steps[name]
        pos = torch.cat([s["pos"] for s in steps])
        assert torch.equal(pos, torch.arange(len(pos))), "one request, positions in order"
        impl = mod.attn.impl
        window_impl = getattr(impl, "window_impl", None)
        Hq, Hkv, D = impl.num_heads, impl.num_kv_heads, impl.head_size
        layout, cos, sin, factor = oracle_rope(mod.rotary_emb)
        q = scale_rotated(torch.cat([s["q"] for s in steps]).view(-1, Hq, D).float(), layout, factor)
        k = scale_rotated(torch.cat([s["k"] for s in steps]).view(-1, Hkv, D).float(), layout, factor)
        v = torch.cat([s["v"] for s in steps]).view(-1, Hkv, D).float()
        out = torch.cat([s["out"] for s in steps]).view(-1, Hq, D).float()
        sinks = getattr(mod, "sinks", None)
        sinks = None if sinks is None else sinks.detach().float()
        model_args = dict(rope=layout, softcap=softcap, sinks=sinks)
        if window_impl is not None:
            want = sliding_window_reference(q, k, v, cos, sin, window_impl.sliding_window, impl.scale, **model_args)
            selected = 0
        else:
            trace = infllm_reference_trace(q, k, v, cos, sin, cfg, prompt_len, impl.scale, **model_args)
            want = trace.out
            selected = sum(c.num_candidates > cfg.topk for c in trace.chunks)
        plain = torch.nn.functional.scaled_dot_product_attention(  # dense attention, for contrast
            *(x.transpose(0, 1) for x in (layout.rotate(q, cos, sin, pos),
                                          layout.rotate(k, cos, sin, pos).repeat_interleave(Hq // Hkv, 1),
                                          v.repeat_interleave(Hq // Hkv, 1))),
            is_causal=True, scale=impl.scale).transpose(0, 1)
        rows.append({"layer": name, "kind": "window" if window_impl is not None else "infllm",
                     "tokens": len(pos), "err": max_abs_err(out, want), "vs_dense": max_abs_err(out, plain),
                     "chunks_selecting": selected})
    return rows


def _engine(model_dir: str, backend: str) -> dict:
    """One engine, two generate rounds (and for InfLLM the long prompt with the layers
    captured), JSON result. Runs in the child process."""
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
        additional_config={"infllm": INFLLM},
    )
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    round1, round2, long_prompt = make_prompts()
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
                "impl_rope_is_layer_rope": getattr(getattr(impl, "rotary", None), "rope", None) is rope,
            })
        return layers

    # The KV-cache groups the engine core made, and the block manager of each.
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    groups = [
        {"spec": type(g.kv_cache_spec).__name__, "manager": type(m).__name__, "layers": len(g.layer_names)}
        for g, m in zip(scheduler.kv_cache_config.kv_cache_groups, managers, strict=True)
    ]
    result = {
        "round1": [list(o.outputs[0].token_ids) for o in out1],
        "round2": [list(o.outputs[0].token_ids) for o in out2],
        "layers": llm.apply_model(probe)[0],
        "groups": groups,
    }
    if backend == "infllm":  # beyond the window: every layer against the oracle
        capture = _Capture()
        assert llm.apply_model(capture.install)[0] > 0
        capture.on = True
        sp_long = SamplingParams(temperature=0.0, max_tokens=LONG_DECODE, ignore_eos=True, detokenize=False)
        llm.generate([TokensPrompt(prompt_token_ids=long_prompt)], sp_long, use_tqdm=False)
        capture.on = False
        hf = llm.llm_engine.model_config.hf_text_config
        result["oracle"] = llm.apply_model(lambda m: _oracle_errors(m, capture, LONG_PROMPT, hf))[0]
    del llm
    return result


def _child(jobs: list[list[str]]) -> None:
    """Runs inside a fresh process: each job [model folder, backend] in turn, one line each."""
    import vllm_infllm

    vllm_infllm.register()  # the entry point is not installed in the dev venv
    for job in jobs:
        report(job, _engine, *job)


def run_engines(jobs: list[tuple[Path, str]], timeout: int = 1800) -> ChildResults:
    """The (model folder, backend) engines in one child; `.result([folder, backend])` each."""
    return run_child(__file__, json.dumps([[str(m), b] for m, b in jobs]), timeout=timeout)


# ---------------------------------------------------------------- tests

# family -> the layers' expected kind, in order ("infllm" or "window")
SUPPORTED = {
    "qwen2": ["infllm"] * 4,
    "qwen3": ["infllm"] * 4,
    "gemma3": ["window", "infllm"] * 2,
    "gemma2": ["window", "infllm"] * 2,
    "mistral-swa": ["window"] * 4,
    "stablelm": ["infllm"] * 4,
    "gptj": ["infllm"] * 4,
    "llama-yarn": ["infllm"] * 4,
    "gpt-oss": ["window", "infllm"] * 2,
    "phi3-longrope": ["infllm"] * 4,
}


@pytest.fixture(scope="module")
def family_engines(request, tmp_path_factory):
    """The families this session's tests ask for, each a tiny model with CPU_ATTN and InfLLM,
    all in one engine child: (the models' folders, the child's results)."""
    families = [item.callspec.params["family"] for item in request.session.items
                if item.originalname == "test_family_matches_cpu_attn_and_the_oracle"]
    root = tmp_path_factory.mktemp("families")
    models = {f: make_tiny_model(f, root / f) for f in families}
    return models, run_engines([(models[f], b) for f in families for b in ("CPU_ATTN", "infllm")])


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("family", list(SUPPORTED))
def test_family_matches_cpu_attn_and_the_oracle(family, family_engines):
    models, results = family_engines
    ref = results.result([str(models[family]), "CPU_ATTN"])
    ours = results.result([str(models[family]), "infllm"])
    print(json.dumps({k: ours[k] for k in ("layers", "groups", "oracle")}, indent=1))

    # The reference ran vLLM's own backend (its engine ran in the child after other families' InfLLM ones).
    assert {lay["impl"] for lay in ref["layers"]} == {"CPUAttentionBackendImpl"}, ref["layers"]
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
    # Inside the window: vLLM's own dense attention, token for token.
    assert ours["round1"] == ref["round1"]
    assert ours["round2"] == ref["round2"]
    # Beyond it: every layer is the oracle's function of its own inputs, and not dense attention.
    rows = ours["oracle"]
    assert [r["kind"] for r in rows] == SUPPORTED[family]
    for r in rows:
        assert r["tokens"] == LONG_PROMPT + LONG_DECODE - 1
        assert r["err"] < 5e-4, r  # fp32; outputs are O(1), dense attention differs by O(1)
        assert r["vs_dense"] > 1e-3, r  # the window (sliding or InfLLM's) really cut keys
        if r["kind"] == "infllm":
            assert r["chunks_selecting"] >= 2, r  # units were chosen among more candidates than topk


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("family,expect", [("bloom", "ALiBi")])
def test_unsupported_family_fails_at_start(family, expect, tmp_path):
    """What InfLLM cannot run is refused while the model is built, before any request, with the
    feature named and what to do instead."""
    model = make_tiny_model(family, tmp_path / family)
    results = run_engines([(model, "infllm")], timeout=600)
    row = results.row([str(model), "infllm"])
    assert "result" not in row and "error" in row, row
    text = row["error"] + results.proc.stderr
    assert "infllm does not support" in text and expect in text, text[-4000:]
    assert "attention-backend" in text or "hf-overrides" in text, text[-4000:]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    _child(json.loads(sys.argv[2]))
    os._exit(0)  # skip slow interpreter teardown of the engine
