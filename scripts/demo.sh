#!/usr/bin/env bash
# The main job: set up (idempotent), then the passkey demo on the embedded SmolLM2.
#   bash scripts/demo.sh                          # 12K-token prompts, 3 depths
#   bash scripts/demo.sh --length 16000 --control # arguments go to python -m vllm_infllm.demo
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m vllm_infllm.demo "$@"
