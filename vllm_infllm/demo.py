"""`python -m vllm_infllm.demo`: the passkey demo (scripts/demo.sh); see vllm_infllm.tools.demo."""

from __future__ import annotations

from .tools.demo import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
