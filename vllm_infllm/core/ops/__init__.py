"""Paged InfLLM ops, one module per device, same signatures and semantics:

    torch_ops   plain torch: the CPU path, and the reference the kernels are tested against
    triton_ops  Triton kernels: the CUDA path (imports triton; tested in its interpreter on CPU)

Each module has write_kv, seal_units, select_units and attend (docs/design.md section 3.4);
`core.runtime.infllm_forward` drives them wave by wave.
"""

from __future__ import annotations

from types import ModuleType

import torch


def for_device(device: torch.device | str) -> ModuleType:
    """The op module for tensors on `device`: Triton kernels on CUDA, torch elsewhere."""
    if torch.device(device).type == "cuda":
        from . import triton_ops

        return triton_ops
    from . import torch_ops

    return torch_ops
