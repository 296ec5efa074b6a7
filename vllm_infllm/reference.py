"""The oracle's public name: `vllm_infllm.reference.infllm_attention_reference`.

The implementation lives in `vllm_infllm.core.reference`; this module re-exports it unchanged
(same objects, same contract).
"""

from __future__ import annotations

from .core.reference import (
    ChunkTrace,
    ReferenceTrace,
    infllm_attention_reference,
    infllm_reference_trace,
    selection_chunks,
    sliding_window_reference,
)

__all__ = [
    "ChunkTrace",
    "ReferenceTrace",
    "infllm_attention_reference",
    "infllm_reference_trace",
    "selection_chunks",
    "sliding_window_reference",
]
