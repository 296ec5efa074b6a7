"""The vLLM plugin wiring: entry point, registry, CPU platform patch.

Every check runs in a fresh interpreter (the ``python_subprocess`` fixture), because
plugin loading and the registry are per-process global state.
"""

from __future__ import annotations

CLASS_PATH = "vllm_infllm.adapter.backend.InfLLMAttentionBackend"
CPU_ATTN_PATH = "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"


def test_import_is_light(python_subprocess):
    python_subprocess(
        """
import sys
import vllm_infllm, vllm_infllm.assets, vllm_infllm.tools.assets, vllm_infllm.demo
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vllm", "transformers"))
assert not heavy, heavy
assert callable(vllm_infllm.register)
"""
    )


def test_entry_point_registers_backend(python_subprocess):
    python_subprocess(
        f"""
import importlib.metadata as md
eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "infllm"]
assert len(eps) == 1 and eps[0].value == "vllm_infllm:register", eps

from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
assert "INFLLM" not in E.__members__
import vllm.plugins
vllm.plugins.load_general_plugins()          # discovers and calls our entry point
assert E["INFLLM"].get_path() == {CLASS_PATH!r}, E["INFLLM"].get_path()
assert E.CUSTOM.is_overridden() and E.CUSTOM.get_path() == {CLASS_PATH!r}
assert E({CLASS_PATH!r}) is E["INFLLM"]       # value lookup (what unpickling does)
assert E("") is E.TORCH_SDPA                  # we did not clobber the "" value

# the CLI / config spelling is case-insensitive
from vllm.config import AttentionConfig
assert AttentionConfig(backend="infllm").backend is E["INFLLM"]
assert AttentionConfig(backend="custom").backend is E.CUSTOM

# register() again (vLLM may call plugins several times per process): harmless
from vllm.platforms.cpu import CpuPlatform
members = list(E.__members__)
func = CpuPlatform.__dict__["get_attn_backend_cls"].__func__
import vllm_infllm
vllm_infllm.register(); vllm_infllm.register()
assert list(E.__members__) == members
assert CpuPlatform.__dict__["get_attn_backend_cls"].__func__ is func   # not wrapped twice
assert not getattr(func.__wrapped__, "_vllm_infllm_wrapper", False)
assert E["INFLLM"].get_path() == E.CUSTOM.get_path() == {CLASS_PATH!r}
""",
        env={"VLLM_PLUGINS": None},
    )


def test_plugin_can_be_disabled(python_subprocess):
    python_subprocess(
        """
import vllm.plugins
vllm.plugins.load_general_plugins()
from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
assert "INFLLM" not in E.__members__ and not E.CUSTOM.is_overridden()
""",
        env={"VLLM_PLUGINS": ""},
    )


# A child script prelude: plugins loaded, vLLM's real selector called for a
# SmolLM2-like layer (head_size 64) under a real VllmConfig, the
# AttentionSelectorConfig that vLLM 0.32 builds captured on its way to the platform.
_SELECT = f"""
import torch
import vllm.plugins
vllm.plugins.load_general_plugins()
from vllm.config import AttentionConfig, VllmConfig, set_current_vllm_config
from vllm.platforms import current_platform
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
from vllm.v1.attention.selector import AttentionSelectorConfig, get_attn_backend
assert current_platform.is_cpu()

captured = []
_patched = CpuPlatform.__dict__["get_attn_backend_cls"].__func__
assert getattr(_patched, "_vllm_infllm_wrapper", False)
def _spy(cls, selected_backend, attn_selector_config, num_heads=None):
    captured.append(attn_selector_config)
    return _patched(cls, selected_backend, attn_selector_config, num_heads)
CpuPlatform.get_attn_backend_cls = classmethod(_spy)

def select(backend, **kw):
    cfg = VllmConfig(attention_config=AttentionConfig(backend=backend))
    with set_current_vllm_config(cfg):
        args = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", num_heads=9)
        args.update(kw)
        return get_attn_backend(**args)

CPU_ATTN_PATH = {CPU_ATTN_PATH!r}
CLASS_PATH = {CLASS_PATH!r}
"""

_STUB_BACKEND = """
# A stand-in for vllm_infllm.adapter.backend, so that these checks do not depend on the
# backend's progress: a real AttentionBackend subclass (real validate_configuration).
import sys, types
from vllm.v1.attention.backend import AttentionBackend
stub = types.ModuleType("vllm_infllm.adapter.backend")
class InfLLMAttentionBackend(AttentionBackend):
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    @staticmethod
    def get_name(): return "INFLLM"
    @staticmethod
    def get_impl_cls(): raise NotImplementedError
    @staticmethod
    def get_builder_cls(): raise NotImplementedError
InfLLMAttentionBackend.__module__ = "vllm_infllm.adapter.backend"
stub.InfLLMAttentionBackend = InfLLMAttentionBackend
sys.modules["vllm_infllm.adapter.backend"] = stub
"""


def test_cpu_platform_honours_infllm(python_subprocess):
    python_subprocess(
        _SELECT
        + _STUB_BACKEND
        + """
# no selection: vLLM's own choice, CPU_ATTN
assert select(None).__name__ == "CPUAttentionBackend"
cfg = captured[-1]
assert isinstance(cfg, AttentionSelectorConfig) and cfg.head_size == 64, cfg

# the wrapped classmethod, called as vLLM's selector calls it
get = CpuPlatform.get_attn_backend_cls
assert get(E["INFLLM"], attn_selector_config=cfg, num_heads=9) == CLASS_PATH
assert get(E.CUSTOM, cfg, 9) == CLASS_PATH
assert get(None, cfg) == CPU_ATTN_PATH
assert get(E.CPU_ATTN, cfg) == CPU_ATTN_PATH
assert get(E.FLASH_ATTN, cfg) == CPU_ATTN_PATH          # original behaviour kept

# end to end through vLLM's selector, by enum and by the CLI's string spelling
assert select(E["INFLLM"]) is InfLLMAttentionBackend
assert select("infllm") is InfLLMAttentionBackend
assert select("CUSTOM") is InfLLMAttentionBackend

# an invalid configuration is an error, never a silent fall-back to CPU_ATTN
for bad in (dict(use_mla=True), dict(dtype=torch.float64)):
    try:
        get(E["INFLLM"], cfg._replace(**bad))
    except ValueError as e:
        assert "INFLLM" in str(e) and "not valid" in str(e), e
    else:
        raise AssertionError(f"{bad} accepted")

# CUSTOM owned by another plugin is not ours: the original method decides
from vllm.v1.attention.backends.registry import register_backend
register_backend(E.CUSTOM, "other.plugin.Backend")
assert get(E.CUSTOM, cfg) == CPU_ATTN_PATH
"""
    )


def test_cpu_platform_selects_real_backend(python_subprocess):
    """The same selection with the real vllm_infllm.adapter.backend module."""
    python_subprocess(
        _SELECT
        + """
from vllm_infllm.adapter.backend import InfLLMAttentionBackend
assert InfLLMAttentionBackend.get_name() == "INFLLM"
assert select("infllm") is InfLLMAttentionBackend
assert select(E.CUSTOM) is InfLLMAttentionBackend
assert select(None).__name__ == "CPUAttentionBackend"
try:
    select("infllm", use_mla=True)
except ValueError as e:
    assert "not valid" in str(e), e
else:
    raise AssertionError("MLA accepted")
"""
    )


def test_engine_args_validate_config_and_extend_rope(python_subprocess):
    # With infllm selected, the config is validated and a max_model_len beyond the model's
    # trained length extends its RoPE table, before any engine starts.
    from vllm_infllm.tools.assets import default_model_dir

    model = default_model_dir()
    assert (model / "config.json").exists(), f"{model} missing: run scripts/setup.sh"
    python_subprocess(
        f"""
import vllm.plugins
vllm.plugins.load_general_plugins()
from vllm.engine.arg_utils import EngineArgs
from vllm_infllm.core.config import InfLLMConfigError

def model_config(**kw):
    return EngineArgs(model={str(model)!r}, **kw).create_model_config()

try:
    model_config(attention_backend="infllm", additional_config={{"infllm": {{"top_k": 4}}}})
    raise AssertionError("bad key accepted")
except InfLLMConfigError as e:
    assert "Did you mean 'topk'" in str(e), e
try:
    model_config(attention_backend="infllm", additional_config={{"infllm": {{"block_size": 64, "n_init": 0}}}})
    raise AssertionError("block_size 64 accepted")
except InfLLMConfigError as e:
    assert "kernel blocks" in str(e), e

try:                                                               # rejected before any engine
    model_config(attention_backend="infllm",
                 speculative_config={{"method": "ngram", "num_speculative_tokens": 2}})
    raise AssertionError("speculative decoding accepted")
except InfLLMConfigError as e:
    assert "speculative decoding is not supported" in str(e) and "Remove" in str(e), e

try:                                                               # a layer the model does not have
    model_config(attention_backend="infllm", additional_config={{"infllm": {{"retrieval_layer": 30}}}})
    raise AssertionError("retrieval_layer 30 accepted for a 30-layer model")
except InfLLMConfigError as e:
    assert "not a layer of this model (30 layers" in str(e) and "below 30" in str(e), e
model_config(attention_backend="infllm", additional_config={{"infllm": {{"retrieval_layer": 29}}}})

mc = model_config(attention_backend="infllm", max_model_len=32768)
assert mc.max_model_len == 32768 and mc.hf_text_config.max_position_embeddings == 32768
mc = model_config(attention_backend="infllm")                    # nothing asked: unchanged
assert mc.max_model_len == 8192 and mc.hf_text_config.max_position_embeddings == 8192
try:                                                               # other backends: vLLM's rule
    model_config(max_model_len=32768)
    raise AssertionError("vLLM accepted a length beyond the model without infllm")
except Exception as e:
    assert "max_model_len" in str(e) or "max_position_embeddings" in str(e), e
""",
        env={"VLLM_PLUGINS": None},
    )
