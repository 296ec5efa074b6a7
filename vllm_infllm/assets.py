"""`python -m vllm_infllm.assets {convert,verify,where}`; see vllm_infllm.tools.assets."""

from __future__ import annotations

import sys

from .tools.assets import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
