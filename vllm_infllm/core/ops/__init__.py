"""Paged InfLLM ops, one module per device, same signatures and semantics:

    torch_ops   plain torch: the reference the kernels are tested against, and the CPU path
                where the native kernels are not built (or VLLM_INFLLM_CPU_KERNEL=torch)
    native_ops  the CPU path: the native kernels of csrc/cpu (built by `native.py`)
    triton_ops  Triton kernels: the CUDA path (imports triton; tested in its interpreter on CPU)

Each module has write_kv, seal_units, select_units, hold_selections and attend (docs/design.md
section 3.4); `core.runtime.infllm_forward` drives them wave by wave.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

_cpu_choice: tuple[str | None, ModuleType] | None = None  # (VLLM_INFLLM_CPU_KERNEL, module)


def for_device(device: torch.device | str) -> ModuleType:
    """The op module for tensors on `device`: Triton kernels on CUDA; on CPU the native kernels,
    or the torch ops (VLLM_INFLLM_CPU_KERNEL, see `native.py`)."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if kind == "cuda":
        from . import triton_ops

        return triton_ops
    global _cpu_choice
    env = os.environ.get("VLLM_INFLLM_CPU_KERNEL")
    if _cpu_choice is not None and _cpu_choice[0] == env:  # called twice per layer: decided once
        return _cpu_choice[1]
    from . import native

    if native.available():
        from . import native_ops as chosen
    else:
        from . import torch_ops as chosen
    _cpu_choice = (env, chosen)
    return chosen



# Set by core.runtime._cpu_threads while it runs a small step's torch ops on one thread.
_step_threads: int | None = None


def cpu_threads() -> int:
    """The intra-op threads this process runs its CPU ops with. Inside a small step, which the
    runtime runs on one thread (fork/join barriers of dozens of small torch ops cost more than
    a second thread gains), the count before it lowered it: a native kernel is one fork per
    layer, and it does gain from every thread."""
    return _step_threads or torch.get_num_threads()
