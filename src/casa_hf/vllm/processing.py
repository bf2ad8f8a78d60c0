"""vLLM's multimodal processing for CASA checkpoints: casa_hf's `CasaProcessor` turns images into patches and grids,
and each image stays one placeholder token in the prompt (`<|image_pad|>`), as in casa_hf."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from ..configuration_casa import CasaConfig
from ..processing_casa import CasaProcessor

_DUMMY_IMAGE_SIDE = 448  # pixels: the profiling run's image (CASA's released models use 448/896-px frames)


class CasaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> CasaConfig:
        return self.ctx.get_hf_config(CasaConfig)

    def get_hf_processor(self, **kwargs: object) -> CasaProcessor:
        return self.ctx.get_hf_processor(CasaProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}


class CasaDummyInputsBuilder(BaseDummyInputsBuilder[CasaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> MultiModalDataDict:
        return {
            "image": self._get_dummy_images(
                width=_DUMMY_IMAGE_SIDE,
                height=_DUMMY_IMAGE_SIDE,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


class CasaMultiModalProcessor(BaseMultiModalProcessor[CasaProcessingInfo]):
    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str | None:
        """`CasaProcessor` pairs each image with a placeholder of its text: give it one per image (vLLM tokenized
        the prompt itself)."""
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        # (called without the images' outputs when vLLM's processor cache holds them all)
        grids = hf_inputs.get("image_grid_thw", torch.empty((0, 3), dtype=torch.long))
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", grids.prod(-1)),
            "image_grid_thw": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        """The placeholder stays one token: vLLM only needs to find it."""
        image_token_id = self.info.get_hf_config().image_token_id
        return [PromptReplacement(modality="image", target=[image_token_id], replacement=[image_token_id])]


__all__ = ["CasaDummyInputsBuilder", "CasaMultiModalProcessor", "CasaProcessingInfo"]
