"""CASA vision-language models: a text LLM whose blocks gain a CASA sub-layer, fed by a Qwen2.5-VL vision tower.

The LLM's own decoder layers, rotary embedding and norms are reused as they are (parameter names stay those of the
source checkpoints); only the CASA sub-layer and the wiring around it live here and in `casa_attention.py`.
"""

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, pairwise
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    modeling_utils,
)
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    packed_sequence_mask_function,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPooling,
    CausalLMOutputWithCrossAttentions,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import is_flash_attention_requested, merge_with_config_defaults
from transformers.utils.import_utils import torch_compilable_check
from transformers.utils.output_capturing import OutputRecorder, _active_collector, capture_outputs

from .backbones import BACKBONES
from .casa_attention import CasaAttention, CasaInputs, build_casa_windows
from .casa_cache import CasaCache, CasaStaticCache, CasaWindowCache
from .casa_positions import CasaPositions
from .configuration_casa import CasaConfig
from .fused_projections import FusedParallelProjections
from .kyutai_release import refuse_kyutai_release
from .transformers_compat import check_transformers_runs_models

logger = logging.get_logger(__name__)

BACKBONE_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class CasaImageFeatures(BaseModelOutputWithPooling):
    r"""
    What `get_image_features` returns: the vision tower's output, `pooler_output` one `[tokens, hidden]` tensor per
    image (the merger's tokens in raster order over the merged grid), and the images' grids.

    image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*):
        Temporal, height and width patch grid of each image of `pooler_output` (before the merge), as given: what
        `casa_image_positions="mrope"` lays the image's tokens out by, also when `generate()` passes the features on.
    """

    image_grid_thw: torch.LongTensor | None = None


class CasaDecoderLayer(GradientCheckpointingLayer):
    """A backbone decoder block with a CASA sub-layer beside (`casa_placement="parallel"`, the paper's block), after
    (`"sequential"`) or instead of (`"replace"`) its self-attention, then the MLP.

    Parallel: `h = h + SA(norm(h)) + CASA(casa_norm(h), casa_image_norm(image)); h = h + MLP(post_norm(h))`.
    Sequential: `h = h + SA(norm(h)); h = h + CASA(casa_norm(h), casa_image_norm(image)); h = h + MLP(post_norm(h))`.
    Replace: `h = h + CASA(norm(h), casa_image_norm(image)); h = h + MLP(post_norm(h))`, CASA with SA's projections.
    In a shared parallel block CASA reads `norm(h)` too: the text's q/k/v are computed once for both attentions, and
    `o_proj` maps their summed outputs. The block's own modules are adopted under their original names, so
    `layers.N.self_attn.q_proj` stays where checkpoints put it.
    """

    def __init__(self, config: CasaConfig, decoder_layer: nn.Module, layer_idx: int):
        super().__init__()
        parts = {name for name, _ in decoder_layer.named_children()}
        if parts != set(BACKBONE_LAYER_PARTS):
            raise ValueError(
                f"{type(decoder_layer).__name__} has parts {sorted(parts)}; CASA wiring expects exactly "
                f"{sorted(BACKBONE_LAYER_PARTS)}"
            )
        for name in BACKBONE_LAYER_PARTS:
            setattr(self, name, getattr(decoder_layer, name))
        # Which SA mask the block gets (full or sliding); backbones without `layer_types` are all full attention.
        layer_types = getattr(config.text_config, "layer_types", None)
        self.attention_type = layer_types[layer_idx] if layer_types else "full_attention"
        self.layer_idx = layer_idx
        self.has_casa = layer_idx in config.casa_layer_indices
        self.casa_placement = config.casa_placement
        # CASA reads the block's own normalized input (no norm of its own): shared parallel and replaced blocks
        self.casa_reads_block_norm = self.casa_placement == "replace" or (
            config.casa_shared and self.casa_placement == "parallel"
        )
        # set by `CasaPreTrainedModel.fuse_attention_projections` in parallel blocks with their own CASA projections
        self.fused_projections: FusedParallelProjections | None = None
        if self.has_casa:
            if not self.casa_reads_block_norm:
                self.casa_input_layernorm = copy.deepcopy(decoder_layer.input_layernorm)
            self.casa_image_layernorm = copy.deepcopy(decoder_layer.input_layernorm)
            self.casa_attn = CasaAttention(
                config.text_config,
                self.self_attn,
                layer_idx,
                config.casa_attention,
                config.casa_shared,
                skip_text_only_windows=config.casa_text_only_windows == "skip",
                rotary=config.casa_uses_rope,
            )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        image_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        casa_inputs: CasaInputs | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        r"""
        image_features (`torch.Tensor` of shape `(num_image_tokens, hidden_size)`, *optional*):
            The merger's output for the chunk's images. Passed positionally, like `hidden_states`, so that reentrant
            activation checkpointing routes its gradient back to the vision tower.
        """
        attention_kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        residual = hidden_states
        if not self.has_casa:
            hidden_states = residual + self.self_attn(self.input_layernorm(hidden_states), **attention_kwargs)[0]
        else:
            image_states = None if image_features is None else self.casa_image_layernorm(image_features)
            window = cache.get_casa_state(self.layer_idx) if cache is not None else None
            casa = partial(  # the CASA attention of this block's chunk, given its text's q/k/v
                self.casa_attn,
                image_states=image_states,
                casa_inputs=casa_inputs,
                self_attn=self.self_attn,
                cache_window=window,
            )
            if self.casa_reads_block_norm:
                hidden_states = residual + self._shared_attention(
                    self.input_layernorm(hidden_states), casa, **attention_kwargs
                )
            elif self.casa_placement == "parallel" and self._uses_fused_projections():
                hidden_states = residual + self._fused_parallel_attention(hidden_states, casa, **attention_kwargs)
            elif self.casa_placement == "parallel":
                casa_output = self._casa(self.casa_input_layernorm(hidden_states), casa, position_embeddings)
                sa_output = self.self_attn(self.input_layernorm(hidden_states), **attention_kwargs)[0]
                hidden_states = residual + sa_output + casa_output
            else:
                hidden_states = residual + self.self_attn(self.input_layernorm(hidden_states), **attention_kwargs)[0]
                hidden_states = hidden_states + self._casa(
                    self.casa_input_layernorm(hidden_states), casa, position_embeddings
                )

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states

    def _uses_fused_projections(self) -> bool:
        """Fused weights serve inference only: gradients must reach the modules' own weights, and SA's attention
        weights are recorded from its module's forward."""
        return self.fused_projections is not None and not torch.is_grad_enabled() and not _recording("attentions")

    def _fused_parallel_attention(
        self,
        hidden_states: torch.Tensor,
        casa: Callable,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs,
    ) -> torch.Tensor:
        """Both attentions of a parallel block on `FusedParallelProjections`: one norm, one q/k/v matmul, one RoPE
        call, one output matmul."""
        backbone = self.casa_attn.backbone

        def rotate(states, cos, sin):
            return backbone.apply_rotary_pos_emb(states, states[:, :0], cos, sin)[0]

        sa_states, casa_states = self.fused_projections.project(hidden_states, position_embeddings, rotate)
        casa_output, _ = casa(*casa_states)
        sa_output = self_attention_output(self.self_attn, *sa_states, **kwargs)
        return self.fused_projections.output(sa_output, casa_output)

    def _casa(self, normed: torch.Tensor, casa: Callable, position_embeddings) -> torch.Tensor:
        """The CASA sub-layer on its own projections of `normed` (or SA's, shared): q/k/v, window attention, o."""
        output, _ = casa(*self.casa_attn.text_states(normed, position_embeddings, self.self_attn))
        return self.casa_attn.projections(self.self_attn).o_proj(output)

    def _shared_attention(
        self,
        normed: torch.Tensor,
        casa: Callable,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """CASA on the block's self-attention projections of `normed`, computed once. Replacing SA, CASA alone;
        beside it (shared parallel), both attentions on the same q/k/v and one `o_proj` over their summed outputs
        (`o(a) + o(b) = o(a + b)` up to the bias, added once more)."""
        attention = self.self_attn
        query, key, value = self.casa_attn.text_states(normed, position_embeddings, attention)
        output, _ = casa(query, key, value)
        if self.casa_placement == "replace":
            return attention.o_proj(output)
        if _recording("attentions"):  # SA's weights are recorded from its module's forward: run it, as it is
            sa_output = attention(normed, position_embeddings=position_embeddings, cache=cache, **kwargs)[0]
            return attention.o_proj(output) + sa_output
        if not self.casa_attn.rotary:  # SA's queries and keys always carry positions
            query, key = self.casa_attn.backbone.apply_rotary_pos_emb(query, key, *position_embeddings)
        output = output + self_attention_output(attention, query, key, value, cache=cache, **kwargs)
        projected = attention.o_proj(output)
        if attention.o_proj.bias is not None:
            projected = projected + attention.o_proj.bias
        return projected


def _recording(output_name: str) -> bool:
    """Whether Transformers' output capture is collecting `output_name` in this forward."""
    return output_name in (_active_collector.get() or {})


def self_attention_output(
    attention: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
    **kwargs,
) -> torch.Tensor:
    """The backbone's self-attention forward from its rotated q/k/v on (cache update, backend, mask, sliding window),
    `[batch, seq_len, heads * head_dim]` before `o_proj`: for a block that computed the projections for CASA too."""
    if cache is not None:
        key, value = cache.update(key, value, attention.layer_idx, kwargs=kwargs)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, BACKBONES[attention.config.model_type].eager_attention_forward
    )
    output, _ = interface(
        attention,
        query,
        key,
        value,
        attention_mask,
        dropout=attention.attention_dropout if attention.training else 0.0,
        scaling=attention.scaling,
        sliding_window=getattr(attention, "sliding_window", None),
        **kwargs,
    )
    return output.reshape(query.shape[0], query.shape[2], -1)


class CasaPreTrainedModel(PreTrainedModel):
    config: CasaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["CasaDecoderLayer", "Qwen2_5_VLVisionBlock"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": CasaDecoderLayer,
        # each block's self-attention module (found by its name, whatever the backbone's class), its weights second
        "attentions": OutputRecorder(target_class=None, index=1, class_name="self_attn"),
        # CASA's weights on image tokens (its cross-attention part), with `output_attentions` as for built-in models
        "cross_attentions": OutputRecorder(target_class=CasaAttention, index=1),
    }

    def __init__(self, config: PreTrainedConfig, *inputs, **kwargs):
        check_transformers_runs_models()
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a local folder holding one of Kyutai's released checkpoints is
        refused first: their weights have other names, so loading would leave every weight random."""
        if pretrained_model_name_or_path is not None:
            refuse_kyutai_release(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def fuse_attention_projections(self) -> list[int]:
        """Fuse, for inference, the projections of each parallel block with its own CASA projections: both
        attentions' q/k/v in one matmul (the norms' weights folded in) and both `o_proj` in another, which decode
        steps at small widths feel (`fused_projections.py`). The fused weights are a second copy of those blocks'
        attention weights; they follow later changes to the weights and serve only forwards without autograd.
        Returns the fused blocks (none for sequential or shared models: the shared block already projects once)."""
        fused = []
        for module in self.modules():
            if isinstance(module, CasaDecoderLayer) and module.has_casa and module.casa_placement == "parallel":
                if not module.casa_reads_block_norm:  # shared parallel blocks already project once
                    module.fused_projections = FusedParallelProjections(module)
                    fused.append(module.layer_idx)
        if not fused:
            logger.warning("fuse_attention_projections: no parallel block with its own CASA projections to fuse")
        return fused

    def unfuse_attention_projections(self) -> None:
        """Drop the fused copies `fuse_attention_projections` made; every block computes from its modules again."""
        for module in self.modules():
            if isinstance(module, CasaDecoderLayer):
                module.fused_projections = None

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.get_text_config().initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class CasaTextModel(CasaPreTrainedModel):
    """The text LLM of a CASA model: the backbone's embeddings, rotary embedding and norm, with CASA blocks.

    Its `config` is the backbone's text config (so attention-backend selection treats it as the text sub-model);
    the CASA settings are read from the full `CasaConfig` at construction.
    """

    input_modalities = ("text",)

    def __init__(self, config: CasaConfig):
        super().__init__(config.text_config)
        backbone = AutoModel.from_config(config.text_config)
        self.embed_tokens = backbone.embed_tokens
        self.layers = nn.ModuleList(CasaDecoderLayer(config, layer, idx) for idx, layer in enumerate(backbone.layers))
        self.norm = backbone.norm
        self.rotary_emb = backbone.rotary_emb
        self.casa_positions = CasaPositions(config, self.rotary_emb)
        self.casa_uses_rope = config.casa_uses_rope
        self.casa_layer_indices = config.casa_layer_indices
        self.casa_replaced_blocks = config.casa_replaced_blocks
        self.consecutive_images = config.casa_window_images == "consecutive"
        self.gradient_checkpointing = False
        self.post_init()

    def shift_key_positions(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Move RoPE'd keys (`[..., slots, head_dim]`) by `delta` positions: RoPE rotations compose, so a key
        rotated at position p becomes the key at p + delta without its pre-RoPE value. Used to keep positions
        contiguous when a bounded text cache drops old tokens."""
        rope_type = self.config.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"Shifting cached keys needs plain RoPE; this backbone uses rope_type={rope_type!r}")
        position = torch.full((1, 1), delta, device=keys.device)
        cos, sin = self.rotary_emb(keys, position_ids=position)
        apply_rotary = BACKBONES[self.config.model_type].apply_rotary_pos_emb
        shape = (1,) * (keys.ndim - 2) + cos.shape[-1:]
        shifted, _ = apply_rotary(keys, keys, cos.reshape(shape), sin.reshape(shape), unsqueeze_dim=0)
        return shifted

    def _self_attention_masks(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.Tensor,
        segments: torch.Tensor | None,
    ) -> dict[str, Any]:
        """Causal text-only masks for the SA layers, one per attention type the backbone uses; packed
        conversations (`segments`) never attend to each other. Masks `generate()` prepared (for a static cache)
        are used as they are."""
        if isinstance(attention_mask, dict):
            return attention_mask
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        if segments is not None:
            mask_kwargs["and_mask_function"] = packed_sequence_mask_function(segments)
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if any(layer.attention_type == "sliding_attention" for layer in self.layers):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        image_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
        image_sizes: list[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        marker_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*):
            Patch grid of each image of `image_features` (before the merge); `casa_image_positions="mrope"` needs it.
        marker_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            The vision start / end tokens, which may stand between the images of one CASA window
            (`CasaConfig.casa_window_images="consecutive"`); None: no token is one.
        """
        batch_size, seq_len = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = CasaCache(config=self.config)
        if cache is not None and not isinstance(cache, CasaWindowCache):
            raise TypeError(
                f"CASA models keep their per-layer window state in a `CasaCache`, got {type(cache).__name__}; "
                "pass `casa_hf.CasaCache()`, `casa_hf.CasaStaticCache(...)` or no cache instead"
            )
        if cache is not None:
            cache.add_casa_windows(self.config, self.casa_layer_indices, self.casa_replaced_blocks)
            cache.check_batch_size(batch_size)
        continues = cache is not None and cache.has_windows()  # a Python bool, also for a static cache
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = _text_positions(attention_mask, past_seen, batch_size, seq_len, inputs_embeds.device)

        # padding, from a 2D mask. With a static cache generate() prepares 4D masks for its decode steps, which have
        # no padding (its prefill keeps the 2D mask). In a one-forward prefill given 4D masks, left padding sits at
        # position 0 before a sample's first position 0, which `_segment_starts` separates as packed conversations
        token_valid = None
        if attention_mask is not None and not isinstance(attention_mask, dict) and attention_mask.ndim == 2:
            token_valid = attention_mask[:, -seq_len:].bool()
        chunk_valid = token_valid
        if chunk_valid is None:
            chunk_valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=inputs_embeds.device)
        segment_starts = None if continues else _segment_starts(position_ids.expand(batch_size, -1), chunk_valid)
        # decode steps: every sample goes on in its cached window, no bookkeeping. A one-token step's token is padding
        # only while a sample has had no real token yet (left padding, prefilled in chunks): chunks are checked until
        # the stored windows show every sample started; after that a one-token step's mask is not read back, which
        # would synchronise every generated token.
        windows = None
        window_kwargs = dict(marker_mask=marker_mask, consecutive=self.consecutive_images)
        if not continues or image_features is not None or is_flash_attention_requested(self.config):
            # a chunk's image that would join the images the cached windows end with is refused: read which do
            if continues and image_features is not None and self.consecutive_images:
                window_kwargs["open_runs"] = cache.open_runs()
            windows = build_casa_windows(image_mask, chunk_valid, image_sizes or [], segment_starts, **window_kwargs)
        elif token_valid is not None and (
            not cache.padding_is_over() or (seq_len > 1 and not bool(token_valid.all()))
        ):
            windows = build_casa_windows(image_mask, token_valid, [], None, **window_kwargs)
        if windows is None and cache is not None:
            cache.note_markers(marker_mask)
        image_positions = None
        if image_features is not None and self.casa_uses_rope:
            insertion_points = position_ids.expand(batch_size, -1)[image_mask]
            image_positions = self.casa_positions.image_positions(insertion_points, image_sizes, image_grid_thw)
        position_embeddings, image_position_embeddings = self.casa_positions.embeddings(
            inputs_embeds, position_ids, image_positions
        )
        casa_inputs = CasaInputs(windows, image_position_embeddings)

        segments = segment_starts.cumsum(-1) if segment_starts is not None else None
        masks = self._self_attention_masks(inputs_embeds, attention_mask, cache, position_ids, segments)
        hidden_states = inputs_embeds
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                image_features,
                attention_mask=masks[decoder_layer.attention_type],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                casa_inputs=casa_inputs,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)


def _segment_starts(position_ids: torch.Tensor, token_valid: torch.Tensor) -> torch.Tensor | None:
    """Where a packed conversation starts: positions restart between two real tokens. None when nothing is packed."""
    restart = position_ids[:, 1:] != position_ids[:, :-1] + 1
    starts = restart & token_valid[:, 1:] & token_valid[:, :-1]
    if not bool(starts.any()):
        return None
    return torch.cat([torch.zeros_like(starts[:, :1]), starts], dim=1)


def _text_positions(
    attention_mask: torch.Tensor | None, past_seen: int, batch_size: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """Text-only RoPE positions; padding does not count when the mask covers the whole conversation."""
    if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[-1] == past_seen + seq_len:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -seq_len:]
    return (torch.arange(seq_len, device=device) + past_seen)[None].expand(batch_size, -1)


def split_images(
    features: torch.Tensor, image_grid_thw: torch.Tensor, spatial_merge_size: int, centering: bool
) -> tuple[torch.Tensor, ...]:
    """The merger's output for several images, one `[image_tokens, hidden]` tensor each; with `centering`
    (`CasaConfig.casa_image_centering`) each less its mean token."""
    sizes = (image_grid_thw.prod(-1) // spatial_merge_size**2).tolist()
    images = torch.split(features, sizes)
    if centering:
        images = [image - image.mean(0, keepdim=True) for image in images]
    return tuple(images)


class CasaModel(CasaPreTrainedModel):
    """Vision tower + text LLM with CASA sub-layers, without the LM head."""

    def __init__(self, config: CasaConfig):
        super().__init__(config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.language_model = CasaTextModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.LongTensor | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CasaImageFeatures:
        """Vision tower + merger. `pooler_output` holds one `[image_tokens, hidden]` tensor per image, as Qwen2.5-VL's
        does; an image fills one placeholder (`generate()` pairs them so: see `_expand_multimodal_outputs`)."""
        if not self._check_image_inputs(pixel_values, image_grid_thw):  # generate() encodes `pixel_values=None` too
            return CasaImageFeatures(pooler_output=())
        pixel_values = pixel_values.type(self.visual.dtype)
        vision_outputs = self.visual(pixel_values, grid_thw=image_grid_thw, **kwargs)
        vision_outputs.pooler_output = split_images(
            vision_outputs.pooler_output,
            image_grid_thw,
            self.visual.spatial_merge_size,
            self.config.casa_image_centering,
        )
        return CasaImageFeatures(**vision_outputs, image_grid_thw=image_grid_thw)

    def _check_image_inputs(self, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None) -> int:
        """The number of images (0 without pixels), after checking that the vision tower can take their grids and
        patches: refused here by name rather than by a reshape inside it."""
        if not _count_images(pixel_values, image_grid_thw):
            return 0
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        for index, (frames, height, width) in enumerate(image_grid_thw.tolist()):
            if frames < 1 or height < 1 or width < 1 or height % merge or width % merge:
                raise ValueError(
                    f"image_grid_thw[{index}] = {[frames, height, width]}: frames must be >= 1 and the height and "
                    f"width (in patches) positive multiples of spatial_merge_size={merge}"
                )
        patches = int(image_grid_thw.prod(-1).sum())
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        if pixel_values.ndim != 2 or tuple(pixel_values.shape) != (patches, patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected ({patches}, {patch_dim}): "
                f"image_grid_thw describes {patches} patches of channels x temporal_patch_size x patch_size^2 = "
                f"{vision.in_channels} x {vision.temporal_patch_size} x {vision.patch_size}^2 values"
            )
        return image_grid_thw.shape[0]

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def get_marker_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor | None:
        """The vision start / end tokens of the chunk (None when the config has neither)."""
        ids = self.config.vision_marker_ids
        if not ids:
            return None
        if input_ids is not None:  # no id tensor to copy to the device: decode steps compute this too
            return functools.reduce(torch.logical_or, [input_ids == token for token in ids])
        rows = self.get_input_embeddings()(torch.tensor(ids, device=inputs_embeds.device))
        return (inputs_embeds[:, :, None, :] == rows).all(-1).any(-1)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        pixel_values (`torch.Tensor` of shape `(num_patches, patch_dim)`):
            Patches of all images of the batch, sample by sample in reading order (Qwen2-VL image processor output).
        image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`):
            Temporal, height and width patch grid of each image.
        mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
            Images already encoded by `get_image_features`, under `"image"` (what `generate()` passes); instead of
            `pixel_values`.
        """
        _check_text_inputs(input_ids, inputs_embeds, attention_mask)
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None and image_outputs is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs['image'], not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        marker_mask = self.get_marker_mask(input_ids, inputs_embeds)
        if image_outputs is None and (pixel_values is not None or image_grid_thw is not None):
            image_outputs = self.get_image_features(pixel_values, image_grid_thw)
        num_images = len(image_outputs.pooler_output) if image_outputs is not None else 0
        # A one-token chunk without images (a decode step) is not counted, as built-in VLMs check placeholders only
        # against given images: reading the count back would synchronise with the device at every generated token.
        if num_images or image_mask.shape[1] > 1:
            torch_compilable_check(
                image_mask.sum() == num_images,
                lambda: (
                    f"Found {int(image_mask.sum())} image tokens (id {self.config.image_token_id}) in the input but "
                    f"{num_images} images; each image needs exactly one image token at its insertion point"
                ),
            )
        image_features = image_sizes = image_grids = None
        if num_images:
            image_grids = image_outputs.get("image_grid_thw")
            image_sizes = [image.shape[0] for image in image_outputs.pooler_output]
            image_features = torch.cat(image_outputs.pooler_output)
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            image_mask=image_mask,
            image_features=image_features,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            image_grid_thw=image_grids,
            marker_mask=marker_mask,
            **kwargs,
        )


def _largest_image(config: CasaConfig, model_kwargs: dict) -> int:
    """Image tokens a CASA window of this `generate()` call holds at most (after the merger), 0 without images, when
    its `input_ids` were not seen (`inputs_embeds`): the largest image, or with `casa_window_images="consecutive"`,
    where a window holds a run of consecutive images, all of the call's images together (a bound, not the size)."""
    encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
    if encoded is not None:
        sizes = [image.shape[0] for image in encoded.pooler_output]
    else:
        grid = model_kwargs.get("image_grid_thw")
        if grid is None or grid.numel() == 0:
            return 0
        sizes = (grid.prod(-1) // config.vision_config.spatial_merge_size**2).tolist()
    if config.casa_window_images == "consecutive":
        return sum(sizes)
    return max(sizes, default=0)


def _chunks(input_ids: torch.Tensor, chunk_size: int, inside: set[int]) -> list[tuple[int, int]]:
    """`[start, stop)` of each prefill chunk: `chunk_size` tokens, more where a chunk would start in `inside`."""
    bounds, start, length = [], 0, input_ids.shape[1]
    while start < length:
        stop = min(start + chunk_size, length)
        while stop < length and stop in inside:
            stop += 1
        bounds.append((start, stop))
        start = stop
    return bounds


def _check_tensor(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_text_inputs(
    input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> None:
    """Exactly one of `input_ids` / `inputs_embeds`, as tensors of a non-empty (batch, sequence) shape, and a 2D
    `attention_mask` that covers them."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds")
    if isinstance(attention_mask, dict):  # the per-layer-type masks generate() prepares for a static cache
        attention_mask = None
    for name, value in (
        ("input_ids", input_ids),
        ("inputs_embeds", inputs_embeds),
        ("attention_mask", attention_mask),
    ):
        _check_tensor(name, value)
    name, tensor, ndim = ("input_ids", input_ids, 2) if input_ids is not None else ("inputs_embeds", inputs_embeds, 3)
    if tensor.ndim != ndim or 0 in tensor.shape[:2]:
        raise ValueError(
            f"{name} must be a non-empty (batch, sequence{', hidden' * (ndim == 3)}) tensor, got shape "
            f"{tuple(tensor.shape)}"
        )
    if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[1] < tensor.shape[1]:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[1]} columns but {name} has {tensor.shape[1]} tokens: a 2D mask "
            "covers the cached tokens and the new ones"
        )


def _count_images(pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None) -> int:
    """Images described by `image_grid_thw` (0 without pixels); both must be tensors, the grid `(num_images, 3)`."""
    _check_tensor("pixel_values", pixel_values)
    _check_tensor("image_grid_thw", image_grid_thw)
    if pixel_values is None:
        return 0
    if image_grid_thw is None or image_grid_thw.ndim != 2 or image_grid_thw.shape[-1] != 3:
        shape = None if image_grid_thw is None else tuple(image_grid_thw.shape)
        raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {shape}")
    return image_grid_thw.shape[0]


class CasaForConditionalGeneration(CasaPreTrainedModel, GenerationMixin):
    """CASA model with a language-modeling head; what `AutoModel` loads for CASA checkpoints."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: CasaConfig):
        super().__init__(config)
        self.model = CasaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self._suppress_image_token()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> CasaImageFeatures:
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    def backbone_llm(self) -> PreTrainedModel:
        """The text LLM inside this model (no CASA sub-layers, no vision tower), sharing its weights.

        Same tokenizer, no images: a natural draft model for `generate(assistant_model=...)`, and the text-only
        baseline. The backbone's parameter names are this model's without the `model.language_model.` prefix.
        """
        llm = AutoModelForCausalLM.from_config(self.config.text_config, dtype=self.dtype)
        prefix = "model.language_model."
        weights = {
            name.replace(prefix, "model."): tensor
            for name, tensor in self.state_dict().items()
            if name == "lm_head.weight" or (name.startswith(prefix) and ".casa_" not in name)
        }
        llm.load_state_dict(weights, assign=True)
        llm.set_attn_implementation(self.config.text_config._attn_implementation)
        return llm.to(self.device).eval()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels, `-100` where no loss is wanted (prompt, padding, image tokens).
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = modeling_utils.slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """`generate()` gets a `CasaCache` (one layer per block: its text K/V and, in CASA blocks, the CASA window),
        or with `cache_implementation="static"` a `CasaStaticCache`."""
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic", "static"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported by CASA "
                    "models: use the default dynamic `CasaCache` or 'static' (`CasaStaticCache`)"
                )
            if generation_config.cache_implementation != "static":
                model_kwargs["cache"] = CasaCache(config=self.config)
                return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict[str, Any]:
        """As `GenerationMixin`'s, except that a prefill (each chunk of a chunked one) keeps its 2D mask with a static
        cache too: its CASA windows must know which tokens are padding, which the 4D masks prepared for compiled
        decode steps no longer tell once a chunk continues the cache (left padding would enter a sample's window).
        `inputs_embeds` is named so that `generate()` knows this model takes them."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration and isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            model_inputs["attention_mask"] = attention_mask
        return model_inputs

    def _expand_multimodal_outputs(
        self,
        input_ids: torch.LongTensor,
        mm_encoder_output: dict[str, BaseModelOutputWithPooling],
        expand_size: int = 1,
        inputs_embeds: torch.Tensor | None = None,
    ) -> dict[str, BaseModelOutputWithPooling]:
        """Each sample's images, in order, repeated as a group for its beams or returned sequences. `GenerationMixin`
        finds a sample's images by counting one placeholder per feature row, but a CASA image has one placeholder
        for all its rows."""
        images = mm_encoder_output.get("image")
        if images is None or not images.pooler_output:
            return mm_encoder_output
        ids = input_ids if input_ids is not None and input_ids.numel() else None
        per_sample = self.model.get_placeholder_mask(ids, inputs_embeds).sum(-1).tolist()
        order = [
            index
            for start, end in pairwise(accumulate(per_sample, initial=0))
            for _ in range(expand_size)
            for index in range(start, end)
        ]
        images.pooler_output = tuple(images.pooler_output[index] for index in order)
        if images.get("image_grid_thw") is not None:  # each image's grid goes with it (mRoPE positions)
            images.image_grid_thw = images.image_grid_thw[order]
        return mm_encoder_output

    def _prefill(
        self,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
        is_first_iteration: bool = True,
    ) -> CausalLMOutputWithCrossAttentions:
        """As `GenerationMixin`'s, except that a chunked prefill with images gives each chunk the whole images whose
        placeholders it holds, in order. Transformers slices pre-encoded features one row per placeholder token, but
        a CASA image of N tokens has one placeholder (its N rows enter only the CASA layers): each chunk would get a
        wrong "image". Nor does a chunk split the images of one CASA window (a run of consecutive images,
        `casa_window_images="consecutive"`), whose text before the last of them attends to it: such a chunk grows
        past `prefill_chunk_size` to the run's last placeholder."""
        images = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        chunk_size = generation_config.prefill_chunk_size
        cache = model_kwargs.get("cache")
        if (
            chunk_size is None
            or cache is None
            or not is_first_iteration
            or model_kwargs.get("inputs_embeds") is not None
            or images is None
            or not images.pooler_output
        ):
            return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration)

        attention_mask = model_kwargs.pop("attention_mask", None)
        position_ids = model_kwargs.pop("position_ids", None)
        mm_encoder_outputs = model_kwargs.pop("mm_encoder_outputs")
        model_forward = (
            self.get_compiled_call(generation_config.compile_config)
            if self._valid_auto_compile_criteria(model_kwargs, generation_config)
            else self.__call__
        )
        # a mask as long as `input_ids` covers a passed-back cache too: only the tokens after it are prefilled
        mask_length = (
            attention_mask.shape[1] if attention_mask is not None else getattr(generation_config, "_mask_length", -1)
        )
        past_length = cache.get_seq_length()
        prefill_ids = input_ids[:, past_length:] if mask_length == input_ids.shape[1] else input_ids
        # image i fills the i-th placeholder over (batch, sequence), as `CasaModel.forward` pairs them
        columns = (prefill_ids == self.config.image_token_id).nonzero()[:, 1].tolist()
        if len(columns) != len(images.pooler_output):
            raise ValueError(
                f"Found {len(columns)} image tokens (id {self.config.image_token_id}) in the input but "
                f"{len(images.pooler_output)} images; each image needs exactly one image token at its insertion point"
            )
        for start, stop in _chunks(prefill_ids, chunk_size, self._run_splits(prefill_ids)):
            chunk = prefill_ids[:, start:stop]
            end = past_length + stop
            if attention_mask is not None:
                model_kwargs["attention_mask"] = attention_mask[:, :end]
            if position_ids is not None:
                model_kwargs["position_ids"] = position_ids[..., past_length + start : end]
            model_inputs = self.prepare_inputs_for_generation(chunk, is_first_iteration=True, **model_kwargs)
            inside = [index for index, column in enumerate(columns) if start <= column < stop]
            if inside:
                grids = images.get("image_grid_thw")
                chunk_images = CasaImageFeatures(
                    pooler_output=tuple(images.pooler_output[index] for index in inside),
                    image_grid_thw=grids[inside] if grids is not None else None,
                )
                model_inputs["mm_encoder_outputs"] = {"image": chunk_images}
            outputs = model_forward(**model_inputs, return_dict=True)
        model_kwargs.update(
            attention_mask=attention_mask, position_ids=position_ids, mm_encoder_outputs=mm_encoder_outputs
        )
        return outputs

    def _run_splits(self, input_ids: torch.Tensor) -> set[int]:
        """Columns a chunk must not start at: inside a run of consecutive images (after its first placeholder, up
        to its last), which must share one forward (`casa_window_images="consecutive"`)."""
        if self.config.casa_window_images != "consecutive":
            return set()
        markers = self.model.get_marker_mask(input_ids, None)
        inside = set()
        for row, marker_row in zip(
            (input_ids == self.config.image_token_id).tolist(),
            markers.tolist() if markers is not None else [[False] * input_ids.shape[1]] * input_ids.shape[0],
            strict=True,
        ):
            previous = None
            for column, (image, marker) in enumerate(zip(row, marker_row, strict=True)):
                if image:
                    if previous is not None:
                        inside.update(range(previous + 1, column + 1))
                    previous = column
                elif not marker:
                    previous = None
        return inside

    def _maybe_prepare_encoder_kwargs_for_generation(
        self, inputs_tensor: torch.Tensor, model_kwargs: dict, model_input_name: str | None, generation_config
    ) -> dict:
        """As `GenerationMixin`'s (the images are encoded here), and, from `input_ids`, the image tokens of the call's
        largest window (a run of consecutive images counts whole), which a static cache is then sized for (the cache
        is prepared from `model_kwargs`, which does not hold the ids)."""
        model_kwargs = super()._maybe_prepare_encoder_kwargs_for_generation(
            inputs_tensor, model_kwargs, model_input_name, generation_config
        )
        images = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        self._window_image_tokens = None
        if model_input_name == "input_ids" and images is not None and images.pooler_output:
            image_mask = inputs_tensor == self.config.image_token_id
            if int(image_mask.sum()) == len(images.pooler_output):  # otherwise the forward says what is off
                mask = model_kwargs.get("attention_mask")
                valid = mask.bool() if isinstance(mask, torch.Tensor) and mask.shape == image_mask.shape else None
                windows = build_casa_windows(
                    image_mask,
                    valid if valid is not None else torch.ones_like(image_mask),
                    [image.shape[0] for image in images.pooler_output],
                    marker_mask=self.model.get_marker_mask(inputs_tensor, None),
                    consecutive=self.config.casa_window_images == "consecutive",
                )
                self._window_image_tokens = max(windows.run_sizes)
        return model_kwargs

    def _prepare_static_cache(
        self, cache_implementation: str, batch_size: int, max_cache_len: int, prefill_chunk_size, model_kwargs
    ) -> CasaStaticCache:
        """A `CasaStaticCache` whose windows hold the call's largest window of images (`_largest_image`) and as much
        text as the whole cache. Sizes never shrink from one call to the next, so that compiled decode steps are not
        recompiled."""
        max_cache_len = max(max_cache_len, getattr(self, "_previous_max_cache_length", -1))
        largest = getattr(self, "_window_image_tokens", None)  # this call's, counted from its input_ids
        if largest is None:
            largest = _largest_image(self.config, model_kwargs)
        self._window_image_tokens = None
        max_image_tokens = max(largest, getattr(self, "_previous_max_image", 1))
        self._previous_max_cache_length, self._previous_max_image = max_cache_len, max_image_tokens
        return CasaStaticCache(self.config, max_cache_len=max_cache_len, max_image_tokens=max_image_tokens)

    def adjust_generation_fn(self, *args, **kwargs) -> None:
        """After loading a checkpoint's generation config: it too must suppress the image token."""
        super().adjust_generation_fn(*args, **kwargs)
        self._suppress_image_token()

    def _suppress_image_token(self) -> None:
        """Never generate the image placeholder: an image token without its pixels cannot be decoded further."""
        suppressed = list(self.generation_config.suppress_tokens or [])
        if self.config.image_token_id not in suppressed:
            self.generation_config.suppress_tokens = [*suppressed, self.config.image_token_id]


__all__ = ["CasaForConditionalGeneration", "CasaModel", "CasaPreTrainedModel", "CasaTextModel"]
