"""Which rotary embeddings InfLLM re-rotates, and how a layer finds its own, with vLLM's real
rotary modules (`get_rope`, as the models call it) and no engine."""

from __future__ import annotations

import pytest
import torch

from vllm_infllm.testing import oracle_rope

_CONFIG = {}


@pytest.fixture(scope="module", autouse=True)
def vllm_config(tmp_path_factory):
    """A model config to build rotary modules under, as vLLM builds a model (LongRoPE reads it)."""
    from transformers import LlamaConfig
    from vllm.config import ModelConfig, VllmConfig

    path = tmp_path_factory.mktemp("rope_config")
    LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                num_attention_heads=4, head_dim=64, max_position_embeddings=1024).save_pretrained(path)
    _CONFIG["vllm"] = VllmConfig(model_config=ModelConfig(model=str(path), max_model_len=1024, dtype="float32",
                                                          skip_tokenizer_init=True))
    yield _CONFIG["vllm"]
    _CONFIG.clear()


def _rope(head_size=64, max_position=1024, is_neox_style=True, **params):
    """The module `get_rope` gives a model (built under a vLLM config, as in a model)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(_CONFIG["vllm"]):
        return get_rope(head_size, max_position=max_position, is_neox_style=is_neox_style,
                        rope_parameters={"rope_theta": 10000.0, **params}, dtype=torch.float32)


ACCEPTED = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "dynamic-ntk": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "partial": {"partial_rotary_factor": 0.5},
    # max_model_len 1024 > 256: vLLM uses the long table, scaled by its mscale, for the engine
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
                 "original_max_position_embeddings": 256, "partial_rotary_factor": 0.5},
}
REFUSED = {
    "mrope": ({"mrope_section": [8, 12, 12]}, "M-RoPE"),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_pure_rotation_tables_are_accepted_and_made_neox(name):
    """Accepted tables become pure full-width NeoX rotations: row a+b is row a composed with
    row b (the property the re-rotation needs), and the attention factor divided out is the
    length of the table's entries (the oracle's reading of the table)."""
    from vllm_infllm.adapter.model_support import RotaryTable, rope_rejection_reason

    rope = _rope(**ACCEPTED[name])
    assert rope_rejection_reason(rope) is None
    table = RotaryTable.of(rope)
    assert RotaryTable.of(rope) is table  # one per module, shared by its layers
    cos, sin = table.tables(torch.device("cpu"))
    assert cos.shape[1] == 32
    a, b = 300, 123
    torch.testing.assert_close(cos[a + b], cos[a] * cos[b] - sin[a] * sin[b], rtol=0, atol=2e-5)
    torch.testing.assert_close(sin[a + b], sin[a] * cos[b] + cos[a] * sin[b], rtol=0, atol=2e-5)
    layout, ocos, osin, factor = oracle_rope(rope)
    assert table.attention_factor == pytest.approx(factor, rel=1e-6)
    assert (factor > 1.01) == (name in ("yarn", "longrope"))
    want_cos, want_sin = layout.canonical_table(ocos, osin)
    torch.testing.assert_close(cos.float(), want_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.float(), want_sin, rtol=0, atol=1e-5)


def test_a_bf16_models_table_is_accepted():
    """vLLM builds a model with its dtype as torch's default (bf16 for most checkpoints), and the
    table is checked right then: the check once built its fp32 comparison in that default dtype
    and refused every bf16 model with "Float did not match BFloat16"."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vllm_infllm.adapter.model_support import RotaryTable

    with set_current_vllm_config(_CONFIG["vllm"]), set_default_torch_dtype(torch.bfloat16):
        rope = get_rope(64, max_position=1024, is_neox_style=True, rope_parameters={"rope_theta": 10000.0},
                        dtype=torch.bfloat16)
        table = RotaryTable.of(rope)
    cos, sin = table.tables(torch.device("cpu"))
    a, b = 300, 123  # still a rotation table, to bf16's precision
    torch.testing.assert_close(cos[a + b].float(), (cos[a] * cos[b] - sin[a] * sin[b]).float(), rtol=0, atol=3e-2)


@pytest.mark.parametrize("name", list(REFUSED))
def test_other_tables_are_refused_with_the_reason(name):
    from vllm_infllm.adapter.model_support import rope_rejection_reason

    params, reason = REFUSED[name]
    assert reason in rope_rejection_reason(_rope(**params))
    assert "unsupported rotary embedding Identity" in rope_rejection_reason(torch.nn.Identity())


def test_a_layer_binds_the_rotary_module_beside_it():
    """Each InfLLM layer gets the `rotary_emb` of its own attention module (two tables of one
    head size in one model: Gemma 3's), else the nearest one above; no rotary module, no table
    InfLLM can use, or a table shorter than max_model_len are errors naming the layer and fix."""
    from types import SimpleNamespace

    from vllm_infllm.adapter.model_support import bind_rotary_tables

    class Impl:
        window_impl = None
        rotary = None

        def bind_rotary(self, table):
            self.rotary = table

    def attention(rope):
        m = torch.nn.Module()
        m.attn = torch.nn.Module()
        m.attn.impl = Impl()
        if rope is not None:
            m.rotary_emb = rope
        return m

    local, glob = _rope(), _rope(rope_type="linear", factor=3.0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([attention(local), attention(glob), attention(None)])
    model.rotary_emb = glob  # a model-level table: the layer without its own finds it
    cfg = SimpleNamespace(model_config=SimpleNamespace(max_model_len=1024))
    assert bind_rotary_tables(model, cfg) == 3
    assert [lay.attn.impl.rotary.rope for lay in model.layers] == [local, glob, glob]

    del model.rotary_emb
    with pytest.raises(ValueError, match="cannot find the rotary embedding of layer layers.2.attn"):
        bind_rotary_tables(model, cfg)
    model.layers[2].rotary_emb = _rope(mrope_section=[8, 12, 12])
    with pytest.raises(ValueError, match="M-RoPE.*layers.2.attn"):
        bind_rotary_tables(model, cfg)
    del model.layers[2]
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's RoPE table"):
        bind_rotary_tables(model, SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096)))


@pytest.mark.parametrize("rope,want,error", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 1500, None),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 4096, "<= 2048"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
      "original_max_position_embeddings": 256}, 2048, "<= 1024"),
    ({"rope_type": "default"}, 4096, None),
])
def test_long_max_model_len_on_scaled_rope(tmp_path, rope, want, error):
    """A max_model_len past the trained length raises max_position_embeddings so the RoPE table
    is long enough (engine_args.py), except where that cannot work: YaRN's table length is
    original x factor whatever max_position_embeddings says, and raising LongRoPE's would change
    its attention factor. Those are refused before the engine starts, with the limit."""
    from transformers import LlamaConfig
    from vllm.engine.arg_utils import EngineArgs

    from vllm_infllm.adapter.engine_args import prepare_engine_args
    from vllm_infllm.core.config import InfLLMConfigError

    LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=1024, rope_parameters={"rope_theta": 10000.0, **rope}).save_pretrained(tmp_path)
    args = EngineArgs(model=str(tmp_path), attention_backend="infllm", max_model_len=want)
    if error:
        with pytest.raises(InfLLMConfigError, match=error):
            prepare_engine_args(args)
    else:
        prepare_engine_args(args)
        assert args.hf_overrides == {"max_position_embeddings": want}
