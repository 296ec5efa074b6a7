"""Make vLLM's CPU platform honour an InfLLM backend selection.

vLLM 0.32's ``CpuPlatform.get_attn_backend_cls`` ignores the selected backend:
for non-MLA models it logs "Cannot use ... backend on CPU." and always returns
``CPU_ATTN``.  That would make ``--attention-backend infllm`` silently do nothing
on CPU, so :func:`patch_cpu_platform` wraps it: when the selection is ``INFLLM``,
or ``CUSTOM`` overridden to our class, the wrapper validates the configuration
against our backend class (as ``CudaPlatform`` does for a selected backend) and
returns its path, raising ``ValueError`` if it is not valid -- never a silent
fall-back to ``CPU_ATTN``.  Any other selection goes to the original method.

Only imported from :func:`vllm_infllm.adapter.plugin.register`, i.e. inside a vLLM process, so
importing vLLM modules here is fine.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

logger = logging.getLogger("vllm.infllm")  # under vLLM's handler and log level

#: Attribute set on our wrapper so that patching twice is a no-op.
_MARK = "_vllm_infllm_wrapper"


def is_infllm_selection(selected_backend: Any) -> bool:
    """True if ``selected_backend`` (an ``AttentionBackendEnum`` or None) means InfLLM."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from .plugin import BACKEND_CLASS, BACKEND_NAME

    if selected_backend is None:
        return False
    if selected_backend.name == BACKEND_NAME:
        return True
    return (
        selected_backend is AttentionBackendEnum.CUSTOM
        and selected_backend.is_overridden()
        and selected_backend.get_path() == BACKEND_CLASS
    )


def _select_infllm(cls, selected_backend, attn_selector_config) -> str:
    """Validate the selector config against our backend class; return its path."""
    try:
        backend_cls = selected_backend.get_class()
    except (ImportError, AttributeError, OSError) as e:
        raise ValueError(
            f"Selected backend {selected_backend.name} could not be loaded on CPU: "
            f"[{type(e).__name__}: {e}]"
        ) from e
    reasons = backend_cls.validate_configuration(
        device_capability=cls.get_device_capability(),
        **attn_selector_config._asdict(),
    )
    if reasons:
        raise ValueError(
            f"Selected backend {selected_backend.name} is not valid for this "
            f"configuration on CPU. Reason: {reasons} ({attn_selector_config!r})"
        )
    logger.info("Using %s attention backend on CPU.", selected_backend.name)
    return selected_backend.get_path()


def patch_cpu_platform() -> bool:
    """Wrap ``CpuPlatform.get_attn_backend_cls`` (idempotent).

    Returns True if the wrapper is (now) installed, False if vLLM's CPU platform
    module is unavailable and the current platform is not CPU (nothing to do).
    """
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            raise
        logger.debug("vllm.platforms.cpu not importable; CPU patch not needed")
        return False

    static = inspect.getattr_static(CpuPlatform, "get_attn_backend_cls")
    if not isinstance(static, classmethod):
        raise RuntimeError(
            "vllm_infllm: CpuPlatform.get_attn_backend_cls is no longer a "
            f"classmethod ({type(static).__name__}); this vLLM version is unsupported"
        )
    original = static.__func__
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def get_attn_backend_cls(
        cls,
        selected_backend,
        attn_selector_config,
        num_heads: int | None = None,
    ) -> str:
        if is_infllm_selection(selected_backend):
            return _select_infllm(cls, selected_backend, attn_selector_config)
        return original(cls, selected_backend, attn_selector_config, num_heads)

    setattr(get_attn_backend_cls, _MARK, True)
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    return True


def patch_kv_cache_spec_registration() -> None:
    """Register InfLLM's KV-cache spec and manager (adapter/kv_cache.py) with vLLM's registry.

    vLLM fills its registry on first use (built-in specs, then the platform hook
    ``register_custom_kv_cache_specs``), and only if it is still empty: registering before that
    would leave the built-ins out. So: wrap the hook on the base ``Platform`` (no platform
    overrides it in vLLM 0.32), or register at once if the registry is already filled.
    """
    from vllm.platforms.interface import Platform
    from vllm.v1 import kv_cache_spec_registry

    if kv_cache_spec_registry._REGISTRY_KVCACHESPEC_LIST:
        from .kv_cache import register_kv_cache_spec

        register_kv_cache_spec()
        return
    static = inspect.getattr_static(Platform, "register_custom_kv_cache_specs")
    original = static.__func__
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def register_custom_kv_cache_specs(cls, vllm_config) -> None:
        original(cls, vllm_config)
        from .kv_cache import register_kv_cache_spec

        register_kv_cache_spec()

    setattr(register_custom_kv_cache_specs, _MARK, True)
    Platform.register_custom_kv_cache_specs = classmethod(register_custom_kv_cache_specs)
