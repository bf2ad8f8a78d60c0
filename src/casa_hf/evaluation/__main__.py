"""`python -m casa_hf.evaluation`: print the folder of the `casa_synthetic_*` lmms-eval tasks (`--include_path`)."""

from . import LMMS_TASKS

print(LMMS_TASKS)
