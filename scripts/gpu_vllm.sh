#!/usr/bin/env bash
# The GPU job of casa_hf's vLLM plugin, as one short run (CI has no GPU): tests/test_vllm.py on CUDA (the same
# engines and comparisons as on the CPU: tokens and log-probabilities against casa_hf's generate(), chunked prefill,
# prefix caching turned off, refusals, TP=2 (two GPUs: on one it fails), the OpenAI server), then bench_vllm.py
# against `casa-hf serve` at 1 to 128 concurrent image chats and a 256-frame stream. Each step has its own time limit.
#
# Needs vLLM 0.32's CUDA build with casa_hf in it, e.g. `python -m venv .venv-vllm && .venv-vllm/bin/pip install -e
# ".[vllm]"` (GPU machines reach PyPI; this one's image must bring it): VLLM_PYTHON names that Python. Outputs go to
# $OUT (default results/).
#
#     VLLM_PYTHON=.venv-vllm/bin/python bash scripts/gpu_vllm.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
export CASA_VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm/bin/python}
mkdir -p "$OUT"
status=0
timeout 900 python -m pytest -q -s tests/test_vllm.py | tee "$OUT/vllm_gpu_tests.txt" || status=1
timeout 1200 python benchmarks/bench_vllm.py --model casa-smollm2 --clients 1 8 32 128 --requests 256 \
    --frames 256 --out "$OUT/vllm_gpu" || status=1
exit $status
