"""The InfLLM config as vLLM users give it: `additional_config={"infllm": {...}}`.

Pure Python (no torch, no vLLM imports): the engine-args hook validates it before any engine
process exists, the backend reads it again where vLLM builds each layer.
"""

from __future__ import annotations

from typing import Any

from ..core.config import InfLLMConfig, InfLLMConfigError, OffloadConfig

#: Tokens per kernel block == tokens per InfLLM memory unit (docs/design.md section 3.1).
INFLLM_BLOCK_SIZE = 128


def infllm_config_from_additional(additional_config: dict | None) -> InfLLMConfig:
    """`additional_config["infllm"]` as a validated InfLLMConfig (block size fixed at 128);
    its "offload" entry is read by `offload_config_from_additional`."""
    config = InfLLMConfig.from_dict((additional_config or {}).get("infllm"))
    if config.block_size != INFLLM_BLOCK_SIZE:
        raise InfLLMConfigError(
            f"infllm config: block_size={config.block_size} is not supported by the vLLM "
            f"backend: memory units are vLLM's {INFLLM_BLOCK_SIZE}-token kernel blocks. "
            f"Fix: drop block_size (or set it to {INFLLM_BLOCK_SIZE})."
        )
    return config


def infllm_config_from_vllm(vllm_config: Any) -> InfLLMConfig:
    """The InfLLM config of a `VllmConfig` (or anything with `additional_config`)."""
    return infllm_config_from_additional(vllm_config.additional_config)


def offload_config_from_additional(additional_config: dict | None) -> OffloadConfig | None:
    """`additional_config["infllm"]["offload"]` validated, or None when offload is off."""
    values = (additional_config or {}).get("infllm")
    if not isinstance(values, dict) or "offload" not in values:
        return None
    return OffloadConfig.from_dict(values["offload"], infllm_config_from_additional(additional_config))


def offload_config_from_vllm(vllm_config: Any) -> OffloadConfig | None:
    return offload_config_from_additional(vllm_config.additional_config)
