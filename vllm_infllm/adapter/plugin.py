"""The vLLM plugin entry point (`vllm.general_plugins`: ``infllm = "vllm_infllm:register"``).

Only the registry entries live here; the backend module is imported by vLLM when chosen. This
module imports neither torch nor vLLM at import time: vLLM calls :func:`register` in every
process it starts (API server, engine core, each worker).
"""

from __future__ import annotations

#: Name under which the backend is registered in vLLM's ``AttentionBackendEnum``.
BACKEND_NAME = "INFLLM"
#: Import path of the backend class (resolved lazily by vLLM).
BACKEND_CLASS = "vllm_infllm.adapter.backend.InfLLMAttentionBackend"


def register() -> None:
    """vLLM general-plugin hook: register the InfLLM attention backend.

    Idempotent (vLLM may call it several times per process) and light: it only
    touches vLLM's backend registry and wraps the CPU platform's backend
    selector; the backend module itself is imported by vLLM only when chosen.

    * ``INFLLM`` becomes a new ``AttentionBackendEnum`` member whose path is
      :data:`BACKEND_CLASS`.
    * ``CUSTOM`` (a static member) is overridden to the same class.  A
      dynamically added member does not survive pickling into a ``spawn``-ed
      worker (it is unpickled before plugins load); ``CUSTOM`` does.
    * On the CPU platform, vLLM ignores the selected backend; see
      :func:`vllm_infllm.adapter.platform.patch_cpu_platform`.
    * Once vLLM has built a model, its InfLLM layers are bound to their own
      rotary tables; see :func:`vllm_infllm.adapter.model_support.patch_model_loader`.
    """
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        # With a string, register_backend creates the member *and* records
        # the override; always pass the class path (without it the member's
        # value is "" and it would alias TORCH_SDPA's value).
        register_backend(BACKEND_NAME, BACKEND_CLASS)
    elif AttentionBackendEnum[BACKEND_NAME].get_path() != BACKEND_CLASS:
        raise RuntimeError(
            f"attention backend {BACKEND_NAME} is already registered to "
            f"{AttentionBackendEnum[BACKEND_NAME].get_path()!r}, not {BACKEND_CLASS!r}"
        )
    member = AttentionBackendEnum[BACKEND_NAME]
    if "__reduce_ex__" not in vars(member):
        # A spawn-started process (vLLM's CPU engine core always is) unpickles the config
        # before it loads plugins, and the dynamic member does not exist there yet: pickle
        # it as "register, then look it up" instead of "AttentionBackendEnum(<value>)".
        object.__setattr__(member, "__reduce_ex__", lambda protocol: (_backend_member, (BACKEND_NAME,)))

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_CLASS:
        # Another plugin owns CUSTOM. Do not steal it silently: INFLLM still
        # works (fork start method); only the spawn-safe alias is unavailable.
        import logging

        logging.getLogger(__name__).warning(
            "AttentionBackendEnum.CUSTOM is already registered to %r; "
            "vllm_infllm leaves it alone (use --attention-backend INFLLM).",
            custom.get_path(),
        )
    else:
        register_backend(custom, BACKEND_CLASS)

    from .engine_args import patch_engine_args
    from .model_support import patch_model_loader
    from .platform import patch_cpu_platform, patch_kv_cache_spec_registration

    patch_cpu_platform()
    patch_engine_args()
    patch_kv_cache_spec_registration()
    patch_model_loader()


def _backend_member(name: str):
    """Unpickle our AttentionBackendEnum member in a process that has not loaded plugins."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register()
    return AttentionBackendEnum[name]
