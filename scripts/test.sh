#!/usr/bin/env bash
# Set up (idempotent, fast when done), lint, and run the test suite.
#   bash scripts/test.sh                  # everything (times by machine: README, "The two commands")
#   bash scripts/test.sh -m "not slow"    # the fast tier: no real engines
#   bash scripts/test.sh tests/core -x    # arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

# Lint first (about a second): the tree stays clean (rules in pyproject.toml, [tool.ruff]).
if ! .venv/bin/ruff check --quiet .; then
    echo "[test] ruff found the problems above: fix them (many with .venv/bin/ruff check --fix .)" >&2
    exit 1
fi

# Tests never touch the network; engine tests set their own VLLM_* variables.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

rc=0
# The 20 slowest tests are listed at the end: the suite must stay under 30 minutes.
.venv/bin/python -m pytest -q --durations=20 "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: failing" >&2
fi
exit "$rc"
