"""Sliding-window layers of hybrid models, run by vLLM's own exact kernel inside our backend.

Gemma 3 interleaves five sliding-window layers (window 512 or 1024) with one full-attention
layer; Mistral, Qwen2 and others can configure windows too. A sliding layer's attention is
already bounded, so InfLLM has nothing to add there: with ``--attention-backend infllm`` the
full-attention layers run InfLLM and each sliding layer runs *its own* sliding-window attention,
exactly (its window, no init, no memory units, no remainder).

vLLM already has that kernel for each device, reading the same logical cache layout as ours
(``[num_blocks, Hkv, block_size, 2*D]``, LBHNC): CPU_ATTN on CPU, TRITON_ATTN on CUDA. So a
sliding layer's `InfLLMAttentionImpl` wraps that backend's impl, and the metadata builder of
a KV-cache group of sliding layers wraps that backend's builder. The specs of sliding layers
stay vLLM's `SlidingWindowSpec` (no side state), so vLLM's hybrid block manager keeps freeing
their blocks outside the window (`SlidingWindowManager`). vLLM pads their pages to the InfLLM
layers' padded page (`unify_kv_cache_spec_page_size`), as it does for any two page sizes.

One KV-cache group must hold one kind of layer (a builder serves a whole group): that is so
whenever vLLM's hybrid KV-cache manager is on, its default. With it off
(``--disable-hybrid-kv-cache-manager``) sliding and full layers would share a group, so a
sliding layer refuses that while the model is built.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.infllm")

#: vLLM's backend for exact sliding-window layers, per device type.
_WINDOW_BACKENDS = {
    "cpu": ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend"),
    "cuda": ("vllm.v1.attention.backends.triton_attn", "TritonAttentionBackend"),
}


def window_backend(device_type: str):
    """vLLM's attention backend class that runs sliding-window layers on `device_type`."""
    if device_type not in _WINDOW_BACKENDS:
        raise ValueError(
            f"infllm: no sliding-window kernel for device type {device_type!r} (InfLLM runs the "
            f"sliding-window layers of hybrid models with vLLM's own kernel, known for "
            f"{sorted(_WINDOW_BACKENDS)}); use another --attention-backend for this model"
        )
    import importlib

    module, name = _WINDOW_BACKENDS[device_type]
    return getattr(importlib.import_module(module), name)


def make_window_impl(vllm_config, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                     alibi_slopes, sliding_window: int, kv_cache_dtype: str, logits_soft_cap,
                     attn_type: str, kv_sharing_target_layer_name, extra_impl_args: dict[str, Any]):
    """The impl of vLLM's sliding-window backend for one layer (same arguments as ours).

    Refuses a disabled hybrid KV-cache manager here, while the model is built: without it vLLM
    puts sliding and full-attention layers in one KV-cache group, whose one metadata builder
    cannot serve both kernels.
    """
    device_type = "cpu"
    if vllm_config is not None and vllm_config.device_config is not None:
        device_type = vllm_config.device_config.device_type
    sched = getattr(vllm_config, "scheduler_config", None)
    if sched is not None and sched.disable_hybrid_kv_cache_manager:
        raise ValueError(
            f"infllm: this model has sliding-window layers (window {sliding_window}), which InfLLM "
            "runs with vLLM's own kernel in KV-cache groups of their own; that needs vLLM's hybrid "
            "KV-cache manager, which is disabled (--disable-hybrid-kv-cache-manager, or a KV "
            "connector without hybrid support). Remove the flag, or use another --attention-backend."
        )
    backend = window_backend(device_type)
    logger.info(
        "infllm: a sliding-window layer (window %d) runs %s's exact sliding-window attention; "
        "InfLLM runs the model's full-attention layers.", sliding_window, backend.get_name(),
    )
    return backend.get_impl_cls()(
        num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
        logits_soft_cap, attn_type, kv_sharing_target_layer_name, **extra_impl_args,
    )


def make_window_builder(kv_cache_spec, layer_names: list[str], vllm_config, device):
    """vLLM's sliding-window metadata builder for a KV-cache group of sliding layers."""
    backend = window_backend(device.type)
    builder = backend.get_builder_cls()(kv_cache_spec, layer_names, vllm_config, device)
    # CPU_ATTN's builder takes the group's window from layers whose impl is its own class, and
    # finds none here (ours wraps it), so it would plan the work as if there were no window:
    # still exact (the kernel applies each layer's window), but it splits work over the whole
    # context. The group's spec holds the window its layers share.
    if getattr(builder, "window_size", None) == -1:
        builder.window_size = kv_cache_spec.sliding_window
    return builder
