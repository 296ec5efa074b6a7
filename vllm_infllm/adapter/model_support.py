"""Which attention layers InfLLM can run, and the model's own rotary table.

InfLLM re-rotates keys and queries to its fixed global distance with the model's *own* cos/sin
table (docs/design.md section 3.3), so the backend must find the exact `RotaryEmbedding` the
model applies before attention, and must refuse what its re-rotation cannot invert. Every
rejection is raised while vLLM builds the model, before any request, with the reason and a fix.

Sliding-window layers of hybrid models are not InfLLM layers: the backend runs them with vLLM's
own exact sliding-window kernel (`window.py`), so nothing here applies to them. The RoPE of an
InfLLM layer is the table of its layer type ("full_attention"), which hybrids such as Gemma 3
configure apart from that of their sliding layers.
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.v1.attention.backend import AttentionType

#: The layer type of the layers InfLLM runs, in transformers' `layer_types` vocabulary.
FULL_ATTENTION = "full_attention"


def layer_rejection_reasons(
    attn_type: str,
    alibi_slopes: list[float] | None,
    logits_soft_cap: float | None,
    sinks: Any,
) -> list[str]:
    """Features of a full-attention layer the InfLLM semantics do not cover (empty = supported)."""
    reasons = []
    if attn_type != AttentionType.DECODER:
        reasons.append(f"attn_type={attn_type}")
    if alibi_slopes is not None:
        reasons.append("ALiBi")
    if logits_soft_cap:
        reasons.append(f"logits_soft_cap={logits_soft_cap}")
    if sinks is not None:
        reasons.append("learned attention sinks")
    return reasons


def rope_parameters_of_layer_type(hf_config: Any, layer_type: str = FULL_ATTENTION) -> dict | None:
    """The RoPE parameters the model gives layers of `layer_type`.

    transformers keeps one dict for the whole model (Llama, Qwen, ...), or one per layer type
    (Gemma 3: ``{"sliding_attention": {theta 1e4}, "full_attention": {theta 1e6}}``), and vLLM's
    model code passes a layer the entry of its type.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    return params


def lookup_model_rope(vllm_config: VllmConfig, head_size: int):
    """The model's own ``RotaryEmbedding`` instance of its full-attention layers, or raise.

    ``get_rope`` caches instances in ``_ROPE_DICT`` by (head_size, rotary_dim, max_position,
    is_neox, rope params, dca, dtype, mrope factor). Calling it with the arguments the model
    used returns the *same* object. A call with other arguments would silently build a new
    table, so we only accept an instance that already existed before our call, and fall back to
    scanning the cache for a unique match on ``head_size``.

    Hold the module, not ``rope.cos_sin_cache``: ``_match_cos_sin_cache_dtype`` may replace
    the buffer (dtype/device change) on the model's first forward.
    """
    from vllm.model_executor.layers import rotary_embedding as re_mod

    mc = vllm_config.model_config
    hf = mc.hf_text_config
    existing = {id(v) for v in re_mod._ROPE_DICT.values()}
    candidate = re_mod.get_rope(
        head_size,
        max_position=getattr(hf, "max_position_embeddings", 8192),
        rope_parameters=rope_parameters_of_layer_type(hf, FULL_ATTENTION),
        is_neox_style=True,
        dtype=mc.dtype,
    )
    if id(candidate) in existing:
        return candidate
    # We just created an unrelated table: drop it again and search.
    for k, v in list(re_mod._ROPE_DICT.items()):
        if v is candidate:
            del re_mod._ROPE_DICT[k]
    matches = [v for v in re_mod._ROPE_DICT.values() if getattr(v, "head_size", None) == head_size]
    if len(matches) == 1:
        return matches[0]
    raise RuntimeError(
        f"infllm: cannot identify the rotary embedding of the model's full-attention layers "
        f"(head_size={head_size}; get_rope's cache holds {len(matches)} tables of that head size, "
        "and none was built with the model config's rope_parameters). InfLLM re-rotates keys "
        "with that exact table; report the model with this message, or use another "
        "--attention-backend for it."
    )


def rope_rejection_reason(rope) -> str | None:
    """Why InfLLM's delta re-rotation cannot use this rotary module (None = usable)."""
    from vllm.model_executor.layers.rotary_embedding import (
        LinearScalingRotaryEmbedding,
        Llama3RotaryEmbedding,
        RotaryEmbedding,
    )

    if rope.rotary_dim != rope.head_size:
        return f"partial rotary (rotary_dim={rope.rotary_dim} != head_size={rope.head_size})"
    if not rope.is_neox_style:
        return "GPT-J style (interleaved) RoPE"
    # Tables that are pure rotations R(theta_i * p): composition R(a)R(b)=R(a+b) holds.
    if type(rope) not in (RotaryEmbedding, Llama3RotaryEmbedding, LinearScalingRotaryEmbedding):
        return f"unsupported rotary embedding {type(rope).__name__}"
    return None


def model_rope_for_layer(vllm_config: VllmConfig, head_size: int):
    """The model's rotary module for a layer InfLLM will run, checked; raises ValueError."""
    rope = lookup_model_rope(vllm_config, head_size)
    reason = rope_rejection_reason(rope)
    if reason:
        raise ValueError(
            f"infllm does not support this model: {reason}. InfLLM re-rotates keys "
            "and queries with the model's own RoPE table, which needs full-width, "
            "NeoX-style, pure-rotation RoPE; use another --attention-backend for it."
        )
    rows = rope.cos_sin_cache.shape[0]
    max_len = vllm_config.model_config.max_model_len
    if max_len > rows:
        # VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 alone leaves the table short: the model's
        # RoPE then reads past it (NaN on CPU in 0.32) for positions >= rows.
        raise ValueError(
            f"infllm: max_model_len={max_len} exceeds the model's RoPE table "
            f"({rows} rows). Also pass hf_overrides={{'max_position_embeddings': "
            f"{max_len}}} (--hf-overrides '{{\"max_position_embeddings\": {max_len}}}')."
        )
    return rope
