"""The vLLM adapter: everything that knows vLLM, kept thin over `vllm_infllm.core`.

    plugin.py         register(): the `vllm.general_plugins` entry point (registry entries)
    platform.py       make vLLM's CPU platform honour an InfLLM backend selection
    engine_args.py    validate the InfLLM config and extend the RoPE table before start-up
    vllm_config.py    the InfLLM config read out of vLLM's `additional_config`
    backend.py        the attention backend: Metadata / Builder / Backend / Impl
    side_state.py     the per-block side state packed into extra head slots of each KV page
    model_support.py  which layers InfLLM runs, and the model's own rotary table
    cpu_tuning.py     glibc malloc tuning for the CPU path

Importing this package is cheap (no torch, no vLLM): vLLM calls `register()` in every process.
"""
