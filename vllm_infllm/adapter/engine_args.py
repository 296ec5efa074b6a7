"""Engine-argument hook: validate the InfLLM config and allow long contexts, before start-up.

When InfLLM is the selected backend, `EngineArgs.create_model_config` is wrapped to
1. validate `additional_config["infllm"]`, so a typo fails before any weights load;
2. raise the model's `max_position_embeddings` to `max_model_len` when the user asks for more
   than the model was trained on. InfLLM never shows the model a relative distance beyond
   n_local, but the model still rotates q/k at absolute positions, so vLLM's RoPE table must
   have `max_model_len` rows. Without this, vLLM refuses the length (or, with
   VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 alone, reads past the table and returns NaN logits).
   Same as passing `--hf-overrides '{"max_position_embeddings": N}'` by hand.

Runs in the process that builds the engine config (`LLM(...)`, `vllm serve`); plugins are
loaded before that call in both.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("vllm.infllm")

_MARK = "_vllm_infllm_wrapper"


def selects_infllm(engine_args) -> bool:
    from .platform import is_infllm_selection

    backend = engine_args.attention_backend
    if backend is None:
        backend = getattr(engine_args.attention_config, "backend", None)
    if isinstance(backend, str):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if backend.lower() == "auto" or backend.upper() not in AttentionBackendEnum.__members__:
            return False
        backend = AttentionBackendEnum[backend.upper()]
    return is_infllm_selection(backend)


def _trained_length(engine_args) -> int | None:
    """max_position_embeddings of the model's (text) config, or None if it cannot be read here."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(
            engine_args.hf_config_path or engine_args.model,
            trust_remote_code=engine_args.trust_remote_code,
            revision=engine_args.revision,
        )
    except Exception as e:  # remote/unusual models: leave the decision to vLLM
        logger.debug("infllm: could not read the model config early: %s", e)
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "max_position_embeddings", None)


def prepare_engine_args(engine_args) -> None:
    """Validate the InfLLM config and extend the RoPE table for long max_model_len."""
    from .vllm_config import infllm_config_from_additional

    infllm_config_from_additional(engine_args.additional_config)  # raises InfLLMConfigError
    if engine_args.speculative_config:
        from ..core.config import InfLLMConfigError

        raise InfLLMConfigError(
            "infllm: speculative decoding is not supported: a verify step scores several draft "
            "tokens as one selection chunk, so answers would differ from plain decoding (and the "
            "exact sequence lengths the plan needs are not on the host in async spec decode). "
            "Remove --speculative-config / speculative_config."
        )

    want = engine_args.max_model_len
    overrides = engine_args.hf_overrides
    if want is None or callable(overrides) or "max_position_embeddings" in (overrides or {}):
        return
    trained = _trained_length(engine_args)
    if trained is not None and want > trained:
        engine_args.hf_overrides = {**(overrides or {}), "max_position_embeddings": int(want)}
        logger.info(
            "infllm: max_model_len=%d > the model's trained %d positions: extending its RoPE "
            "table (hf_overrides max_position_embeddings=%d); InfLLM keeps attention distances "
            "within n_local.",
            want, trained, want,
        )


def patch_engine_args() -> None:
    """Wrap `EngineArgs.create_model_config` (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_model_config
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def create_model_config(self):
        if selects_infllm(self):
            prepare_engine_args(self)
        return original(self)

    setattr(create_model_config, _MARK, True)
    EngineArgs.create_model_config = create_model_config
