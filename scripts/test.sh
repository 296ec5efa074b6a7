#!/usr/bin/env bash
# Set up (idempotent, fast when done) and run the test suite.
#   bash scripts/test.sh                  # everything
#   bash scripts/test.sh tests/core -x    # arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

# Tests never touch the network; engine tests set their own VLLM_* variables.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

rc=0
.venv/bin/python -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: failing" >&2
fi
exit "$rc"
