"""A casa_hf checkpoint as a vLLM model: the backbone on vLLM's layers (paged self-attention, tensor-parallel
projections and MLP), the CASA sub-layers and vision tower as casa_hf and Transformers compute them.

Self-attention sees text only, as in casa_hf, so vLLM's paged KV cache holds text K/V only. Each CASA sub-layer keeps,
per request, its window (`request_windows.py`); its q/k/v/o are casa_hf's `CasaAttention`, replicated on every
tensor-parallel rank (its output is whole on each rank, added beside the all-reduced self-attention output). An image
is one placeholder token: `embed_multimodal` returns its features as one row, `embed_input_ids` keeps the rows of the
step for `forward` and gives the placeholder its own token embedding, as casa_hf does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention as HFLlamaAttention
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention as HFQwen2Attention
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaAttention, LlamaMLP
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..casa_attention import CasaAttention
from ..casa_positions import CasaPositions
from ..configuration_casa import CasaConfig
from ..modeling_casa import split_images
from .processing import CasaDummyInputsBuilder, CasaMultiModalProcessor, CasaProcessingInfo
from .request_windows import CasaStep, RequestWindows, StepImages

# The Transformers attention each backbone's CASA sub-layer takes its shapes from (built on the meta device)
_HF_ATTENTION = {"qwen2": HFQwen2Attention, "llama": HFLlamaAttention}
_HF_ROTARY = {"qwen2": Qwen2RotaryEmbedding, "llama": LlamaRotaryEmbedding}
# (vLLM parameter, checkpoint name, shard) of the projections vLLM stacks
_STACKED = (
    (".self_attn.qkv_proj", ".self_attn.q_proj", "q"),
    (".self_attn.qkv_proj", ".self_attn.k_proj", "k"),
    (".self_attn.qkv_proj", ".self_attn.v_proj", "v"),
    (".mlp.gate_up_proj", ".mlp.gate_proj", 0),
    (".mlp.gate_up_proj", ".mlp.up_proj", 1),
)
_GRID_VALUES = 3  # an image's row starts with its (t, h, w) patch grid, then its features


def check_servable(config: CasaConfig) -> None:
    """Refuse by name the CASA models this plugin cannot serve yet."""
    text = config.text_config
    if text.model_type not in _HF_ATTENTION:
        raise ValueError(
            f"casa_hf's vLLM plugin serves qwen2 and llama backbones, this checkpoint's is {text.model_type!r}"
        )
    if config.casa_shared or config.casa_placement == "replace":
        raise ValueError(
            "casa_hf's vLLM plugin serves CASA sub-layers with their own projections (casa_shared=False, "
            f"casa_placement 'parallel' or 'sequential'); this checkpoint has casa_shared={config.casa_shared}, "
            f"casa_placement={config.casa_placement!r}"
        )
    if getattr(text, "hidden_act", "silu") != "silu":
        raise ValueError(f"text_config.hidden_act={text.hidden_act!r}: vLLM's Llama MLP runs silu only")


class CasaVllmDecoderLayer(nn.Module):
    """casa_hf's `CasaDecoderLayer` (parallel or sequential) with the backbone parts on vLLM's layers."""

    def __init__(self, config: CasaConfig, layer_idx: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        text = config.text_config
        attention_bias = text.model_type == "qwen2" or getattr(text, "attention_bias", False)
        self.self_attn = LlamaAttention(
            config=text,
            hidden_size=text.hidden_size,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            max_position_embeddings=text.max_position_embeddings,
            quant_config=vllm_config.quant_config,
            bias=attention_bias,
            bias_o_proj=text.model_type == "llama" and attention_bias,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.self_attn",
        )
        self.mlp = LlamaMLP(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            hidden_act=text.hidden_act,
            quant_config=vllm_config.quant_config,
            bias=getattr(text, "mlp_bias", False),
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.layer_idx = layer_idx
        self.has_casa = layer_idx in config.casa_layer_indices
        self.parallel = config.casa_placement == "parallel"
        if self.has_casa:
            self.casa_input_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
            self.casa_image_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
            with torch.device("meta"):
                shapes = _HF_ATTENTION[text.model_type](text, layer_idx)
            self.casa_attn = CasaAttention(
                text,
                shapes,
                layer_idx,
                config.casa_attention,
                shared=False,
                skip_text_only_windows=config.casa_text_only_windows == "skip",
                rotary=config.casa_uses_rope,
            )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        step: CasaStep | None,
    ) -> torch.Tensor:
        residual = hidden_states
        attention = self.self_attn(positions, self.input_layernorm(hidden_states))
        if not self.has_casa:
            hidden_states = residual + attention
        elif self.parallel:
            hidden_states = residual + attention + self._casa(hidden_states, step)
        else:
            hidden_states = residual + attention
            hidden_states = hidden_states + self._casa(hidden_states, step)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def _casa(self, hidden_states: torch.Tensor, step: CasaStep | None) -> torch.Tensor:
        """The CASA sub-layer, request by request, each in its own windows (no step: vLLM's profiling run)."""
        if step is None:
            return torch.zeros_like(hidden_states)
        query, key, value = self.casa_attn.text_states(
            self.casa_input_layernorm(hidden_states)[None], step.text_rope, None
        )
        image_states = None
        if step.image_features is not None:
            image_states = self.casa_image_layernorm(step.image_features)
        output = query.new_zeros(hidden_states.shape[0], query.shape[1] * query.shape[3])
        for chunk in step.chunks:
            tokens = slice(chunk.start, chunk.end)
            has_images = image_states is not None and chunk.image_rows.stop > chunk.image_rows.start
            chunk_images = image_states[chunk.image_rows] if has_images else None
            chunk_output, _ = self.casa_attn(
                query[:, :, tokens],
                key[:, :, tokens],
                value[:, :, tokens],
                chunk_images,
                chunk.casa_inputs,
                None,
                chunk.windows[self.layer_idx],
            )
            output[tokens] = chunk_output[0]
        return self.casa_attn.o_proj(output)


class CasaVllmTextModel(nn.Module):
    """The text LLM: vLLM's embedding and norm, CASA decoder layers; names as in casa_hf checkpoints."""

    def __init__(self, config: CasaConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        text = config.text_config
        self.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(
            CasaVllmDecoderLayer(config, index, vllm_config, f"{prefix}.layers.{index}")
            for index in range(text.num_hidden_layers)
        )
        self.norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)


@MULTIMODAL_REGISTRY.register_processor(
    CasaMultiModalProcessor, info=CasaProcessingInfo, dummy_inputs=CasaDummyInputsBuilder
)
class CasaForConditionalGeneration(nn.Module, SupportsMultiModal):
    """casa_hf's `CasaForConditionalGeneration` on vLLM (registered under the same architecture name)."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<|image_pad|>"
        raise ValueError(f"CASA models take images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: CasaConfig = vllm_config.model_config.hf_config
        check_servable(config)
        self.config = config
        text = config.text_config
        self.model = nn.Module()  # casa_hf's `CasaModel`: `model.visual`, `model.language_model`
        self.model.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.model.language_model = CasaVllmTextModel(config, vllm_config, "model.language_model")
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        # the CASA sub-layers rotate with the backbone's Transformers rotary embedding, as in casa_hf
        self.rotary_emb = _HF_ROTARY[text.model_type](config=text)
        self.request_windows = RequestWindows(
            config.casa_layer_indices,
            consecutive_images=config.casa_window_images == "consecutive",
            uses_rope=config.casa_uses_rope,
            positions=CasaPositions(config, self.rotary_emb),
        )
        self._step_images: StepImages | None = None

    # images

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Each image as one row: its patch grid, then its merged features (`[tokens, hidden]` flattened), centred
        per image where the config asks (`casa_image_centering`)."""
        pixel_values, grids = kwargs.get("pixel_values"), kwargs.get("image_grid_thw")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, list):
            pixel_values = torch.cat(pixel_values)
        if isinstance(grids, list):
            grids = torch.stack(grids)
        grids = grids.reshape(-1, 3)
        visual = self.model.visual
        features = visual(pixel_values.to(visual.dtype), grid_thw=grids.to(pixel_values.device)).pooler_output
        images = split_images(features, grids, visual.spatial_merge_size, self.config.casa_image_centering)
        return [torch.cat([grid.to(image), image.flatten()])[None] for image, grid in zip(images, grids, strict=True)]

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings, the placeholders' included; the step's image rows are kept for `forward`."""
        hidden = self.config.text_config.hidden_size
        features, grids = [], []
        for row in multimodal_embeddings or ():
            row = row.reshape(-1)
            grid = row[:_GRID_VALUES].round().long()
            features.append(row[_GRID_VALUES:].view(-1, hidden))
            grids.append(grid)
        image_mask = input_ids == self.config.image_token_id
        if len(features) != int(image_mask.sum()):
            raise RuntimeError(
                f"This step holds {int(image_mask.sum())} image placeholders but {len(features)} encoded images"
            )
        marker_mask = None
        if self.config.vision_marker_ids:
            marker_mask = torch.isin(input_ids, torch.tensor(self.config.vision_marker_ids, device=input_ids.device))
        self._step_images = StepImages(features, grids, image_mask, marker_mask)
        return self.model.language_model.embed_tokens(input_ids)

    # the step

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        language_model = self.model.language_model
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        images, self._step_images = self._step_images, None
        step = self._casa_step(positions, inputs_embeds, images)
        hidden_states = inputs_embeds
        for layer in language_model.layers:
            hidden_states = layer(positions, hidden_states, step)
        return language_model.norm(hidden_states)

    def _casa_step(
        self, positions: torch.Tensor, inputs_embeds: torch.Tensor, images: StepImages | None
    ) -> CasaStep | None:
        """The step's request chunks, from the self-attention metadata (None in vLLM's profiling run, which has
        none: CASA then adds nothing)."""
        metadata = get_forward_context().attn_metadata
        if metadata is None:
            return None
        if isinstance(metadata, list):
            metadata = metadata[0]
        layer_metadata = metadata[self.model.language_model.layers[0].self_attn.attn.layer_name]
        num_tokens = inputs_embeds.shape[0]
        if images is None:  # a step whose embeddings vLLM made itself (a dummy run): no image
            no_images = torch.zeros(num_tokens, dtype=torch.bool, device=inputs_embeds.device)
            images = StepImages([], [], no_images, None)
        images = images.padded_to(num_tokens)  # the runner may pad a step past its scheduled tokens
        query_start_loc = layer_metadata.query_start_loc.tolist()
        num_requests = len(query_start_loc) - 1
        request_keys = layer_metadata.block_table[:num_requests, 0].tolist()
        return self.request_windows.split_step(positions, inputs_embeds, request_keys, query_start_loc, images)

    def release_request_windows(self, first_block: int) -> None:
        """A finished request's CASA windows go (called by vLLM's runner, see `casa_hf.vllm.register`)."""
        self.request_windows.release(first_block)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Never the image placeholder, as casa_hf's `generate()` (`suppress_tokens`): a placeholder without its
        pixels cannot be decoded further."""
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is not None:  # (None on the tensor-parallel ranks that do not gather them)
            logits[..., self.config.image_token_id] = float("-inf")
        return logits

    # weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """casa_hf checkpoint names; vLLM stacks self-attention's q/k/v and the MLP's gate/up projections."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for stacked, source, shard in _STACKED:
                if name.startswith("model.language_model.") and source in name:
                    target = name.replace(source, stacked)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"The checkpoint's weight {name!r} has no place in the CASA model vLLM builds")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded


__all__ = ["CasaForConditionalGeneration", "check_servable"]
