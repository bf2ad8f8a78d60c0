"""casa_hf in lmms-eval (the `casa-hf[eval]` extra, docs/evaluation.md): the model `casa` (`lmms_model`) and the
`casa_synthetic_*` tasks (`synthetic_tasks`, their YAML files in `LMMS_TASKS`, passed to lmms-eval's
`--include_path`; `python -m casa_hf.evaluation` prints that folder)."""

from pathlib import Path

LMMS_TASKS = Path(__file__).resolve().parent / "lmms_tasks"


def lmms_manifest():
    """The `lmms_eval.models` entry point: the model `casa` (`lmms_model.Casa`), imported only when asked for."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="casa", simple_class_path="casa_hf.evaluation.lmms_model.Casa")


__all__ = ["LMMS_TASKS", "lmms_manifest"]
