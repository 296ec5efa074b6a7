"""Each request's prompt length, for the step plan: what the load-independent chunking needs.

With ``chunking="aligned"`` (docs/design.md section 2.3) the prompt's last query and every
generated token select alone, whatever the scheduler did, so the plan must know where each
prompt ends. vLLM 0.32's ``CommonAttentionMetadata`` does not say (its ``is_prefilling`` is
"not finished before this step", true on the step that ends the prompt too); the model runner's
input batch does (``num_prompt_tokens_cpu_tensor``, by batch row, the rows the metadata has).

:func:`install` wraps ``GPUModelRunner._build_attention_metadata`` (the CPU runner inherits it)
so that, while the runner builds a step's metadata, :func:`current` returns that tensor. The
builder calls :func:`install` when it is created, in the worker, before the first real step.

Three states, never confused:

* inside a real step: the runner's prompt lengths;
* inside a dummy run (warm-up, CUDA-graph capture: the runner passes no
  ``num_scheduled_tokens``): :data:`DUMMY`, and the plan takes each row's sequence as its
  prompt (the outputs are discarded);
* outside the runner (a test driving the builder itself): :data:`UNSET`, unless the caller
  sets them with :func:`given` - the builder then raises instead of guessing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

#: Marker: the runner is building metadata for a dummy run.
DUMMY = "dummy"
#: Marker: no runner is building metadata (nor did a caller give the lengths).
UNSET = "unset"

_MARK = "_vllm_infllm_prompt_lengths"
_current: object = UNSET
_req_ids: list | None = None  # the batch rows' request ids while the runner builds a real step


def request_ids() -> list | None:
    """The request id of each batch row of the step being built (None outside a real step):
    what the offload store is keyed by."""
    return _req_ids


def current() -> object:
    """The prompt lengths of the step being built (a sequence by batch row), DUMMY or UNSET."""
    return _current


@contextlib.contextmanager
def given(prompt_lens: Sequence[int] | object) -> Iterator[None]:
    """Make :func:`current` return `prompt_lens` inside the block (tests, benchmarks)."""
    global _current
    before, _current = _current, prompt_lens
    try:
        yield
    finally:
        _current = before


def install() -> None:
    """Wrap the V1 model runner's metadata builder (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._build_attention_metadata
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _build_attention_metadata(self, *args, **kwargs):
        # A real step passes the scheduler's token counts; dummy runs do not.
        global _req_ids
        real = kwargs.get("num_scheduled_tokens") is not None
        lens = self.input_batch.num_prompt_tokens_cpu_tensor if real else DUMMY
        _req_ids = list(self.input_batch.req_ids) if real else None
        try:
            with given(lens):
                return original(self, *args, **kwargs)
        finally:
            _req_ids = None

    setattr(_build_attention_metadata, _MARK, True)
    GPUModelRunner._build_attention_metadata = _build_attention_metadata
