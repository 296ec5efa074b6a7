"""InfLLM (training-free long-context memory) as an out-of-tree vLLM attention backend.

Importing this package is deliberately cheap: it must not import torch or vLLM,
because vLLM calls :func:`register` (our ``vllm.general_plugins`` entry point) in
every process it starts (API server, engine core, each worker).

Select the backend with ``--attention-backend infllm`` (or ``CUSTOM``, the
spelling that also survives ``spawn``-started workers) and configure it with
``--additional-config '{"infllm": {...}}'``.

Layers (imports point one way, tools -> adapter -> core; docs/design.md section 5):

    core/      vLLM-free: config, RoPE helpers, the oracle, the step plan, runtime, ops
    adapter/   the vLLM plugin, platform and engine-args hooks, the attention backend
    tools/     assets (offline model and data), the passkey demo, prompt builders
    testing.py helpers shared by tests and benchmarks (core only)
"""

from __future__ import annotations

from .adapter.plugin import BACKEND_CLASS, BACKEND_NAME, register

__version__ = "0.1.0"

__all__ = ["BACKEND_CLASS", "BACKEND_NAME", "__version__", "register"]
