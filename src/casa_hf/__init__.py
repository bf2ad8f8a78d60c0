"""CASA vision-language models for Hugging Face Transformers: `import casa_hf` registers them with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
)

from .casa_cache import CasaCache, CasaDynamicLayer, CasaStaticCache, CasaStaticLayer, CasaStaticWindow, CasaWindow
from .configuration_casa import CasaConfig, every_nth_block
from .modeling_casa import CasaForConditionalGeneration, CasaModel, CasaPreTrainedModel, CasaTextModel
from .processing_casa import CasaProcessor

AutoConfig.register(CasaConfig.model_type, CasaConfig, exist_ok=True)
# Official CASA checkpoints load through `AutoModel` and then `generate()`, so `AutoModel` maps to the LM-head class.
AutoModel.register(CasaConfig, CasaForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(CasaConfig, CasaForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(CasaConfig, CasaForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(CasaConfig, CasaForConditionalGeneration, exist_ok=True)
# Code that looks models up by class name or model type reads the static `*_MAPPING_NAMES` tables, which `register()`
# leaves alone: `transformers serve` (loading through AutoModelForMultimodalLM, modality detection), Trainer (label
# shift when smoothing), Transformers' common model tests (labels). CASA goes in the tables of the Auto classes it is
# registered with (the multimodal one as built-in VLMs), never over another entry.
# The lazy Auto mappings stay as they were: they skip model types missing from CONFIG_MAPPING_NAMES, which CASA must
# be (listed there, iterating them would import `transformers.models.casa`), and find CASA through `register()`.
for _names in (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
):
    _names.setdefault(CasaConfig.model_type, CasaForConditionalGeneration.__name__)
del _names
AutoProcessor.register(CasaConfig, CasaProcessor, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "CasaCache",
    "CasaConfig",
    "CasaDynamicLayer",
    "CasaForConditionalGeneration",
    "CasaModel",
    "CasaPreTrainedModel",
    "CasaProcessor",
    "CasaStaticCache",
    "CasaStaticLayer",
    "CasaStaticWindow",
    "CasaTextModel",
    "CasaWindow",
    "every_nth_block",
]
