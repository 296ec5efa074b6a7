"""glibc malloc tuning for the CPU path, applied once per process by the backend's impl."""

from __future__ import annotations

import ctypes
import os
import sys

_MALLOC_TUNED: bool | None = None


def tune_cpu_malloc() -> bool:
    """Let glibc keep freed temporaries of up to 128 MiB in the heap (mallopt), once per process.

    The torch ops allocate a few MiB of temporaries per layer (gathered blocks, logits). With
    glibc's default, a size past its adaptive mmap threshold is mmap'ed and unmapped each time,
    so every layer pays page faults for fresh memory: measured on the 2-core CPU machine, a
    decode layer at 4K context took 2.5 ms instead of 0.7 ms, and prefill 35% longer
    (benchmarks/RESULTS.md section 4). vLLM tries to preload tcmalloc for the same reason, but
    only for spawned workers and only when its wheel bundles it. Off with
    VLLM_INFLLM_MALLOC_TUNING=0; a no-op off glibc. Returns whether the tuning is in effect.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is not None:
        return _MALLOC_TUNED
    _MALLOC_TUNED = False
    if os.environ.get("VLLM_INFLLM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        _MALLOC_TUNED = bool(libc.mallopt(m_mmap_threshold, 128 << 20)) and bool(
            libc.mallopt(m_trim_threshold, 256 << 20)
        )
    except (OSError, AttributeError):  # not glibc
        pass
    return _MALLOC_TUNED
