"""Engine-argument hook: validate the InfLLM config and allow long contexts, before start-up.

When InfLLM is the selected backend, `EngineArgs.create_model_config` is wrapped to
1. validate `additional_config["infllm"]`, so a typo fails before any weights load;
2. raise the model's `max_position_embeddings` to `max_model_len` when the user asks for more
   than the model was trained on. InfLLM never shows the model a relative distance beyond
   n_local, but the model still rotates q/k at absolute positions, so vLLM's RoPE table must
   have `max_model_len` rows. Without this, vLLM refuses the length (or, with
   VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 alone, reads past the table and returns NaN logits).
   Same as passing `--hf-overrides '{"max_position_embeddings": N}'` by hand.
   YaRN's table has a length fixed by its scaling (the original context times the factor,
   whatever max_position_embeddings says), and raising LongRoPE's max_position_embeddings would
   change the model's attention factor (its mscale grows with it): beyond those lengths the
   request is refused here, with the limit.

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


def _text_config(engine_args):
    """The model's (text) transformers config, or None if it cannot be read here."""
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
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _check_retrieval_layer(engine_args, layer: int) -> None:
    """retrieval_layer must name one of the model's full-attention layers, all on this process
    (the layers above read its choice from the step's plan)."""
    from ..core.config import InfLLMConfigError

    if getattr(engine_args, "pipeline_parallel_size", 1) > 1:
        raise InfLLMConfigError(
            "infllm config: retrieval_layer needs every layer in one process (the layers above it read "
            "its selection), and pipeline parallelism splits them. Fix: drop retrieval_layer, or "
            "--pipeline-parallel-size 1."
        )
    text = _text_config(engine_args)
    num = getattr(text, "num_hidden_layers", None)
    if num is not None and layer >= num:
        raise InfLLMConfigError(
            f"infllm config: retrieval_layer={layer} is not a layer of this model ({num} layers, 0-based). "
            f"Fix: a layer index below {num}; find one with python -m vllm_infllm.tools.retrieval_layer."
        )
    types = getattr(text, "layer_types", None)
    if types and layer < len(types) and "sliding" in str(types[layer]):
        full = [i for i, t in enumerate(types) if "sliding" not in str(t)]
        near = min(full, key=lambda i: abs(i - layer)) if full else None
        raise InfLLMConfigError(
            f"infllm config: retrieval_layer={layer} is a sliding-window layer of this model, which "
            f"vLLM's own kernel runs (it selects no memory units). Fix: a full-attention layer"
            + (f", e.g. {near}." if near is not None else ".")
        )


def fixed_rope_length(text_config) -> tuple[str, int] | None:
    """(rope type, rows) when the model's RoPE table cannot be lengthened by raising
    max_position_embeddings without changing the model (YaRN, LongRoPE), else None."""
    params = getattr(text_config, "rope_parameters", None) or {}
    # one dict for the model, or one per layer type (Gemma 3, GPT-OSS)
    per_type = [p for p in params.values() if isinstance(p, dict)] or [params]
    for p in per_type:
        kind = p.get("rope_type", p.get("type"))
        if kind == "yarn":
            return kind, int(p["original_max_position_embeddings"] * p["factor"])
        if kind in ("longrope", "su"):
            return "longrope", int(text_config.max_position_embeddings)
    return None


def prepare_engine_args(engine_args) -> None:
    """Validate the InfLLM config and extend the RoPE table for long max_model_len."""
    from .vllm_config import infllm_config_from_additional

    config = infllm_config_from_additional(engine_args.additional_config)  # raises InfLLMConfigError
    _install_offload(engine_args)
    if config.retrieval_layer >= 0:
        _check_retrieval_layer(engine_args, config.retrieval_layer)
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
    text = _text_config(engine_args)
    trained = getattr(text, "max_position_embeddings", None)
    fixed = fixed_rope_length(text) if text is not None else None
    if fixed is not None and trained is not None and want > trained:
        kind, rows = fixed
        if want > rows or kind == "longrope":
            from ..core.config import InfLLMConfigError

            raise InfLLMConfigError(
                f"infllm: max_model_len={want} is longer than this model's {kind} RoPE table "
                f"({rows} rows, fixed by its scaling). InfLLM keeps attention distances within "
                f"n_local, but the model still rotates at absolute positions, and lengthening a "
                f"{kind} table would change the model's RoPE. Use max_model_len <= {rows}."
            )
    if trained is not None and want > trained:
        engine_args.hf_overrides = {**(overrides or {}), "max_position_embeddings": int(want)}
        logger.info(
            "infllm: max_model_len=%d > the model's trained %d positions: raising its "
            "max_position_embeddings to %d (hf_overrides) so that vLLM admits the length and its "
            "RoPE table covers it; InfLLM keeps attention distances within n_local.",
            want, trained, want,
        )


def _install_offload(engine_args) -> None:
    """With "offload" in the InfLLM config, install the KV connector that copies released
    memory units out of the pool before a step can overwrite them (adapter/offload.py)."""
    import os

    from ..core.config import InfLLMConfigError
    from .offload import CONNECTOR, kv_transfer_config
    from .vllm_config import offload_config_from_additional

    offload = offload_config_from_additional(engine_args.additional_config)
    if offload is None:
        return
    if offload.path is not None and not os.path.isdir(offload.path):
        raise InfLLMConfigError(
            f"infllm config: offload.path={offload.path!r} is not a directory. Fix: create it, or drop "
            "path to keep offloaded units in process memory."
        )
    have = engine_args.kv_transfer_config
    if have is not None and getattr(have, "kv_connector", None) != CONNECTOR:
        raise InfLLMConfigError(
            "infllm: offload copies memory units out of the KV pool through its own KV connector, and "
            f"a kv_transfer_config ({getattr(have, 'kv_connector', have)!r}) is already set. Fix: drop "
            "--kv-transfer-config, or drop 'offload' from the infllm config."
        )
    from vllm.config import KVTransferConfig

    engine_args.kv_transfer_config = KVTransferConfig(**kv_transfer_config())


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
