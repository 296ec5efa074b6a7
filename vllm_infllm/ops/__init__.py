"""Paged InfLLM ops: `torch_ops` (CPU, and the reference) and `triton_ops` (CUDA), same signatures."""

from __future__ import annotations


def for_device(device):
    """The op module for tensors on `device`: Triton kernels on CUDA, torch elsewhere."""
    import torch

    if torch.device(device).type == "cuda":
        from . import triton_ops

        return triton_ops
    from . import torch_ops

    return torch_ops
