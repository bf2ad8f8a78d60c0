"""CASA vision-language models for Hugging Face Transformers: `import casa_hf` registers them with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .casa_cache import CasaCache, CasaDynamicLayer
from .configuration_casa import CasaConfig
from .modeling_casa import CasaForConditionalGeneration, CasaModel, CasaPreTrainedModel, CasaTextModel
from .processing_casa import CasaProcessor

AutoConfig.register(CasaConfig.model_type, CasaConfig, exist_ok=True)
# Official CASA checkpoints load through `AutoModel` and then `generate()`, so `AutoModel` maps to the LM-head class.
AutoModel.register(CasaConfig, CasaForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(CasaConfig, CasaForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(CasaConfig, CasaForConditionalGeneration, exist_ok=True)
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
    "CasaTextModel",
]
