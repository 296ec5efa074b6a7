"""Which attention layers InfLLM can run, and each layer's own rotary table.

InfLLM re-rotates keys and queries to its fixed global distance with the model's *own* cos/sin
table (docs/design.md section 3.3), so every InfLLM layer needs the exact rotary module its
attention module applies before attention, and the backend must refuse what its re-rotation
cannot invert. vLLM builds a layer's attention impl inside the model's constructor, before the
impl can see its parent module, so the binding happens right after vLLM has built the model
(`patch_model_loader` wraps `BaseModelLoader.create_model`): each InfLLM layer gets the
`rotary_emb` module beside it in the module tree (or the nearest one above it), whatever its head
size, layer type or RoPE parameters. Every rejection is raised there, before the weights load,
with the reason and a fix.

What the re-rotation handles (`RotaryTable`): tables that are a pure rotation by angles linear
in the position, times a constant attention factor (YaRN's and LongRoPE's mscale, divided out
here), in any channel layout the core's `RopeLayout` knows (partial rotary, GPT-J pairs). What it
refuses: multi-dimensional positions (M-RoPE), dual-chunk attention, FoPE, DeepSeek's MLA RoPE.

Sliding-window layers of hybrid models are not InfLLM layers: the backend runs them with vLLM's
own exact sliding-window kernel (`window.py`), so nothing here applies to them.
"""

from __future__ import annotations

import logging
import weakref

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import AttentionType

from ..core.rope import RopeLayout

logger = logging.getLogger("vllm.infllm")

#: Attribute set on our wrapper so that patching twice is a no-op.
_MARK = "_vllm_infllm_wrapper"


def layer_rejection_reasons(attn_type: str, alibi_slopes: list[float] | None) -> list[str]:
    """Features of a full-attention layer the InfLLM semantics do not cover (empty = supported).
    Logit soft-capping and learned sinks are supported (passed to the ops)."""
    reasons = []
    if attn_type != AttentionType.DECODER:
        reasons.append(f"attn_type={attn_type}")
    if alibi_slopes is not None:
        reasons.append("ALiBi (InfLLM moves keys by rotation; ALiBi's linear bias has no rotary table)")
    return reasons


def _pure_rotation_classes() -> tuple[type, ...]:
    """vLLM's rotary embeddings whose table is cos/sin of angle_i * p (times a constant): the
    composition R(a) R(b) = R(a + b) InfLLM's re-rotation needs holds for them."""
    from vllm.model_executor.layers import rotary_embedding as re

    names = ["RotaryEmbedding", "LinearScalingRotaryEmbedding", "Llama3RotaryEmbedding",
             "NTKScalingRotaryEmbedding", "DynamicNTKScalingRotaryEmbedding",
             "DynamicNTKAlphaRotaryEmbedding", "YaRNScalingRotaryEmbedding", "Gemma4RotaryEmbedding",
             "Phi3LongRoPEScaledRotaryEmbedding"]
    return tuple(getattr(re, n) for n in names if hasattr(re, n))


#: Why vLLM's other rotary embeddings cannot be re-rotated, by class name, with what to do.
_REFUSED = {
    "DualChunkRotaryEmbedding": "dual-chunk attention RoPE (remove dual_chunk_attention_config)",
    "DeepseekScalingRotaryEmbedding": "DeepSeek's YaRN variant (MLA models are not supported)",
    "FourierRotaryEmbedding": "Fourier position embedding (FoPE: not a rotation by the position alone)",
}


def rotary_cache(rope) -> tuple[torch.Tensor, float]:
    """The table `[rows, rotary_dim]` (cos half, sin half) a rotary module rotates with, and the
    constant attention factor it carries (YaRN's and LongRoPE's mscale; 1 elsewhere).

    LongRoPE (Phi-3/Phi-4) keeps a short and a long table in one buffer and vLLM picks one for the
    whole engine (`use_long_rope`: max_model_len beyond the original context), each scaled by its
    own mscale; every other module has one `cos_sin_cache`."""
    if hasattr(rope, "long_short_cos_sin_cache"):
        o = rope.original_max_position_embeddings
        cache = rope.long_short_cos_sin_cache
        if rope.use_long_rope:
            return cache[o:], float(rope.long_mscale)
        return cache[:o], float(rope.short_mscale)
    return rope.cos_sin_cache, float(getattr(rope, "mscale", 1.0))


def rope_rejection_reason(rope) -> str | None:
    """Why InfLLM's re-rotation cannot use this rotary module (None = usable)."""
    name = type(rope).__name__
    if type(rope) in _pure_rotation_classes():  # exact types: a subclass may rotate otherwise
        return None
    if name in _REFUSED:
        return _REFUSED[name]
    if "MRotaryEmbedding" in [c.__name__ for c in type(rope).__mro__]:
        return "multimodal RoPE (M-RoPE: a position per axis, not one per token)"
    return f"unsupported rotary embedding {name}"


class RotaryTable:
    """One rotary module of the model, as the ops need it: a full-width NeoX table of pure
    rotations, and the channel permutation that makes the model's layout NeoX.

    vLLM's table (`rotary_cache`) is `[rows, rotary_dim]` (cos half, sin half), in the layout of
    `rope.is_neox_style` over the first `rotary_dim` channels, scaled by a constant attention
    factor where the RoPE variant has one (YaRN's and LongRoPE's `mscale`, which scales q·k by
    mscale²: the model's attention at every distance includes it, so only the re-rotation must
    not apply it again). q and k reach the ops through `layout.to_neox`. Shared by every layer
    that applies the same module; the table is rebuilt only when vLLM replaces its buffer (dtype
    or device on first use).
    """

    _shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, rope: torch.nn.Module):
        self.rope = rope
        self.layout = RopeLayout(rope.head_size, rope.rotary_dim, bool(getattr(rope, "is_neox_style", True)))
        table, self.attention_factor = rotary_cache(rope)
        self._key: tuple | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        # The table must start at the identity times the attention factor: a rotation by 0.
        # (fp32 explicitly: vLLM builds the model under its dtype as torch's default, bf16 for
        # most checkpoints.)
        row0 = table[0].float()
        half = rope.rotary_dim // 2
        want = torch.cat((torch.full((half,), self.attention_factor, dtype=torch.float32),
                          torch.zeros(half, dtype=torch.float32)))
        if not torch.allclose(row0.cpu(), want, rtol=1e-2, atol=1e-2):
            raise ValueError(
                f"infllm does not support this model: the rotary table of {type(rope).__name__} does "
                f"not start at the identity times {self.attention_factor} (row 0: "
                f"{row0[:4].tolist()} ...); use another --attention-backend for it"
            )

    @classmethod
    def of(cls, rope: torch.nn.Module) -> RotaryTable:
        table = cls._shared.get(rope)
        if table is None:
            table = cls._shared[rope] = cls(rope)
        return table

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[rows, D/2]` as the ops read them (views of vLLM's buffer when the model's
        table already is a full-width NeoX table of pure rotations)."""
        cache = rotary_cache(self.rope)[0]
        # Built once per buffer and device (every layer asks at every step).
        key = (cache.data_ptr(), cache.dtype, cache.device, tuple(cache.shape), device)
        if self._key == key:
            return self._tables
        if cache.device != device:
            cache = cache.to(device)
        half = self.layout.rotary_dim // 2
        if self.layout.is_canonical and self.attention_factor == 1.0:
            self._tables = cache[:, :half], cache[:, half:]
        else:  # divide out the attention factor in fp32; pad the passed channels
            f = cache.float() / self.attention_factor
            self._tables = self.layout.canonical_table(f[:, :half].contiguous(), f[:, half:].contiguous())
        self._key = key
        return self._tables


def rotary_module_of(model: torch.nn.Module, layer_name: str) -> torch.nn.Module:
    """The rotary module an attention layer's queries and keys pass through: the `rotary_emb`
    beside the layer in the module tree (vLLM's models: `<...>.self_attn.rotary_emb` beside
    `<...>.self_attn.attn`), else the nearest one above it."""
    parts = layer_name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        rope = getattr(model.get_submodule(".".join(parts[:i])), "rotary_emb", None)
        if isinstance(rope, torch.nn.Module):
            return rope
    raise ValueError(
        f"infllm: cannot find the rotary embedding of layer {layer_name}: no `rotary_emb` module "
        "beside it or above it. InfLLM re-rotates keys with the model's own table; report the "
        "model with this message, or use another --attention-backend for it."
    )


def bind_rotary_tables(model: torch.nn.Module, vllm_config: VllmConfig | None) -> int:
    """Give every InfLLM layer of `model` the rotary table of its own attention module (checked);
    returns how many layers were bound. Raises ValueError for a table InfLLM cannot use."""
    max_len = vllm_config.model_config.max_model_len if vllm_config is not None and vllm_config.model_config else 0
    bound, described = 0, set()
    for name, module in model.named_modules():
        impl = getattr(module, "impl", None)
        if not hasattr(impl, "bind_rotary") or getattr(impl, "window_impl", None) is not None:
            continue  # not an InfLLM layer, or a sliding-window layer (vLLM's kernel)
        rope = rotary_module_of(model, name)
        reason = rope_rejection_reason(rope)
        if reason:
            raise ValueError(
                f"infllm does not support this model: {reason} (layer {name}). InfLLM re-rotates "
                "keys and queries with the model's own RoPE table, which must be a rotation by "
                "the position alone; use another --attention-backend for it."
            )
        rows = rotary_cache(rope)[0].shape[0]
        fixed = hasattr(rope, "mscale") or hasattr(rope, "long_short_cos_sin_cache")  # YaRN, LongRoPE
        if max_len > rows and fixed:  # a length fixed by the scaling (engine_args.py)
            raise ValueError(
                f"infllm: max_model_len={max_len} exceeds the model's {type(rope).__name__} table "
                f"({rows} rows, fixed by its RoPE scaling; lengthening it would change the "
                f"model's RoPE). Use max_model_len <= {rows}."
            )
        if max_len > rows:
            # VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 alone leaves the table short: the model's
            # RoPE then reads past it (NaN on CPU in 0.32) for positions >= rows.
            raise ValueError(
                f"infllm: max_model_len={max_len} exceeds the model's RoPE table "
                f"({rows} rows). Also pass hf_overrides={{'max_position_embeddings': "
                f"{max_len}}} (--hf-overrides '{{\"max_position_embeddings\": {max_len}}}')."
            )
        table = RotaryTable.of(rope)
        impl.bind_rotary(table)
        bound += 1
        if id(table) not in described:  # once per table, not per layer
            described.add(id(table))
            layout = table.layout
            logger.info(
                "infllm: layer %s and the others applying its rotary module re-rotate with %s "
                "(head size %d, rotary_dim %d, %s layout, attention factor %.4g)%s", name,
                type(rope).__name__, layout.head_size, layout.rotary_dim,
                "NeoX" if layout.neox else "GPT-J", table.attention_factor,
                "" if layout.is_canonical else ": q and k channels permuted to NeoX order",
            )
    return bound


def patch_model_loader() -> None:
    """Bind InfLLM layers to their rotary tables as soon as vLLM has built a model (before its
    weights load): wraps `BaseModelLoader.create_model`, which vLLM's loaders build through."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    orig = BaseModelLoader.create_model
    if getattr(orig, _MARK, False):
        return

    def create_model(self, vllm_config, model_config, *args, **kwargs):
        model = orig(self, vllm_config, model_config, *args, **kwargs)
        bind_rotary_tables(model, vllm_config)
        return model

    setattr(create_model, _MARK, True)
    create_model.__doc__ = orig.__doc__
    BaseModelLoader.create_model = create_model
