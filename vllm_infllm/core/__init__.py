"""The vLLM-free core of InfLLM: everything that defines and computes the attention.

    config.py     the knobs (InfLLMConfig) and their validation
    rope.py       rotary helpers: re-rotation of keys and queries to InfLLM's global distance
    reference.py  the oracle: an fp32, loop-by-loop implementation of the semantics
                  (docs/design.md section 2) for one contiguous sequence
    plan.py       the step plan: a varlen batch cut into selection chunks and waves, and the
                  per-block side state (LayerMemory) the ops read and write
    runtime.py    one layer's InfLLM attention over a paged KV cache: seal -> select -> attend
    stats.py      what a step attended (queries, memory units, keys), counted from its plan
    offload.py    memory units outside the KV pool: which may leave it, the store, the ops' view
    ops/          the paged ops, same signatures: torch_ops (CPU, and the reference for the
                  kernels) and triton_ops (CUDA)

Nothing under this package imports vLLM (a test imports every module with vLLM blocked), so it
runs and is tested on machines without vLLM, e.g. a GPU machine with only torch and Triton.
Imports point one way: vllm_infllm.tools -> vllm_infllm.adapter -> vllm_infllm.core.
"""
