# Sourced by scripts/setup_*.sh: makes the virtual environment of a tool that pins its own packages, the CPU torch
# installed in it first, from the sourcing script's arguments (VENV_DIR [--system-site-packages]). Sets VENV, ROOT
# (this checkout), TORCH (its version) and `pip` (an install command for the new environment).
VENV=${1:?usage: $(basename "$0") VENV_DIR [--system-site-packages]}
SHARED=${2:-}
if [ -n "$SHARED" ] && [ "$SHARED" != "--system-site-packages" ]; then
    echo "$(basename "$0"): unknown option $SHARED (the only one: --system-site-packages)" >&2
    exit 2
fi
TORCH=${CASA_TORCH_VERSION:-2.13.0}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

"${PYTHON:-python3}" -m venv $SHARED "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet)
"${pip[@]}" "torch==$TORCH"   # first: the CPU build where pip finds one (a CPU index, a local wheel)
