"""Configuration of CASA vision-language models."""

from __future__ import annotations

import difflib
from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.utils import logging

from .backbones import SUPPORTED_TEXT_MODEL_TYPES
from .transformers_compat import SubConfigSpec

logger = logging.get_logger(__name__)

# The values a CASA field takes, named once: the annotations below use them and `_check_consistency` reads them.
CasaAttentionKind = Literal["casa", "cross_attention"]
CasaPlacement = Literal["parallel", "sequential", "replace"]
ImagePositions = Literal["insertion", "raster", "mrope"]
TextOnlyWindows = Literal["attend", "skip"]
WindowImages = Literal["consecutive", "each"]


def _warn_on_misspelt_fields(kwargs: dict) -> None:
    """Name the CASA field an unknown key most likely meant: a typo is kept as an attribute and would do nothing."""
    casa_fields = [name for name in CasaConfig.__annotations__ if name not in ("model_type", "sub_configs_defaults")]
    for key in kwargs:
        close = difflib.get_close_matches(key, casa_fields, n=1, cutoff=0.85)
        if close:
            logger.warning(
                f"CasaConfig got unknown key {key!r}, kept as a plain attribute with no effect on the model; "
                f"did you mean the CASA field {close[0]!r}?"
            )


def _quiet_mrope_section(text_config):
    """A text config (dict) keeping Qwen2.5-VL's `mrope_section` in its `rope_parameters`: the text backbone's RoPE
    validation does not know the key and would warn at every load, so it is told to ignore it."""
    if isinstance(text_config, dict) and "mrope_section" in (text_config.get("rope_parameters") or {}):
        ignored = set(text_config.get("ignore_keys_at_rope_validation") or ()) | {"mrope_section"}
        return {**text_config, "ignore_keys_at_rope_validation": ignored}
    return text_config


def mrope_section(text_config) -> list[int] | None:
    """Qwen2.5-VL's multimodal RoPE sections of a text config (`rope_parameters["mrope_section"]`), None without."""
    return (getattr(text_config, "rope_parameters", None) or {}).get("mrope_section")


def _check_mrope_section(text) -> None:
    """`casa_image_positions="mrope"` needs sections that split the rotary frequencies into (time, height, width)."""
    section = mrope_section(text)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rotary_dim = int(head_dim * (text.rope_parameters or {}).get("partial_rotary_factor", 1.0))
    expected = f"3 positive integers summing to rotary_dim / 2 = {rotary_dim // 2} (Qwen2.5-VL-7B: [16, 24, 24])"
    if section is None:
        raise ValueError(
            "casa_image_positions='mrope' needs Qwen2.5-VL's multimodal RoPE sections in "
            f"text_config.rope_parameters['mrope_section'] ({expected}); this text config has none: add them, or use "
            "casa_image_positions='insertion' or 'raster'"
        )
    if (
        not isinstance(section, (list, tuple))
        or len(section) != 3
        or not all(isinstance(n, int) and n > 0 for n in section)
        or sum(section) != rotary_dim // 2
    ):
        raise ValueError(f"text_config.rope_parameters['mrope_section']={section!r} must be {expected}")


# Defaults describe Qwen2.5-VL-7B's language model, so that a bare `CasaConfig()` is consistent.
_DEFAULT_TEXT_CONFIG = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
}


@strict
class CasaConfig(PreTrainedConfig):
    r"""
    Configuration of a CASA (Cross-Attention over Self-Attention) vision-language model: a decoder-only text LLM whose
    blocks get an extra CASA attention sub-layer, fed by a Qwen2.5-VL vision tower. Images never enter the LLM's
    sequence: each image is one `image_token_id` placeholder at its insertion point.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the text backbone (`model_type` one of `qwen2`, `llama`, `helium`).
        vision_config (`dict` or `Qwen2_5_VLVisionConfig`, *optional*):
            Config of the Qwen2.5-VL vision tower; its `out_hidden_size` must equal the text `hidden_size`.
        casa_layers (`list[int]`, *optional*):
            Indices of the decoder blocks that get a CASA sub-layer. `None` means every block.
        casa_attention (`str`, *optional*, defaults to `"casa"`):
            `"casa"`: text queries attend to the latest image and to the text since it. `"cross_attention"`: the
            plain cross-attention baseline, queries attend to the latest image only.
        casa_cross_attention_rope (`bool`, *optional*, defaults to `False`):
            Whether plain cross-attention rotates its queries and image keys with the backbone's RoPE. The paper's
            cross-attention uses no positional embeddings (`False`); saved configs without this key predate it and
            all rotated, so `from_dict` loads them with `True`. CASA always rotates: its text keys need positions.
        casa_placement (`str`, *optional*, defaults to `"parallel"`):
            Where a block's CASA sub-layer reads its input. `"parallel"` (the paper's block): CASA and self-attention
            both read the block input, each through its own norm, and both outputs are added to the residual.
            `"sequential"`: CASA reads the stream that self-attention has updated. Saved configs without this key
            predate it and were all sequential, so `from_dict` (hence `from_pretrained`) loads them as such.
            `"replace"` (the paper's CA-replace, D3): in the blocks of `casa_layers` CASA attention *replaces*
            self-attention, with the block's own projections and norm (so it needs `casa_shared=True`); its text
            keys are only the window's text, and the block's cache holds only its window. `every_nth_block`
            lists the paper's "every n-th block". Not every block can be replaced: no attention would reach past
            the latest image (with plain cross-attention, none from text to text at all).
        casa_shared (`bool`, *optional*, defaults to `False`):
            The "-Shared" variant: CASA sub-layers reuse the q/k/v/o projections of their block's self-attention.
            In a parallel block they also read its normalized input, so the text's q/k/v are computed once for both
            attentions and their outputs go through `o_proj` together.
        casa_image_positions (`str`, *optional*, defaults to `"insertion"`):
            RoPE positions of image keys: `"insertion"` puts every image token at its placeholder's position;
            `"raster"` puts token j at placeholder + j, so CASA attention can tell image tokens apart by place;
            `"mrope"` is Qwen2.5-VL's multimodal RoPE: an image token at row r, column c of the merged grid gets
            (temporal, height, width) positions (p, p + r, p + c), p its placeholder's position, and each rotary
            section (`text_config.rope_parameters["mrope_section"]`, e.g. `[16, 24, 24]`) turns with its own component,
            as Qwen2.5-VL lays out an image; text keeps its 1-D positions (equal components: plain RoPE). Needs the
            text config's `mrope_section` (kept by `casa-hf convert qwen2_5_vl`, whose default this is).
        casa_image_centering (`bool`, *optional*, defaults to `False`):
            Subtract each image's mean token from its tokens before the CASA layers. A vision tower trained from
            scratch next to a frozen LLM grows a component shared by all images that, after the CASA image norm,
            drowns what tells images apart; centring removes it (CASA-SmolLM2).
        casa_text_only_windows (`str`, *optional*, defaults to `"attend"`):
            What a CASA sub-layer does in a window without an image (the text before a conversation's first image):
            `"attend"` (the paper's pattern) lets its text attend to itself; `"skip"` gives it no update, so a
            text-only prompt, and the text before the first image, is computed exactly as the text LLM computes it.
        casa_window_images (`str`, *optional*, defaults to `"consecutive"`):
            Which images share a CASA window. `"consecutive"` (the paper's): images separated only by the vision
            start / end tokens (or adjacent placeholders) form one window that starts at the first of them; its
            text, from that first image on, attends to all of their tokens. `"each"`: every image opens a window of
            its own, so text sees only the latest image. Saved configs without this key predate it and used
            `"each"`, so `from_dict` loads them as such.
        image_token_id (`int`, *optional*):
            The placeholder token marking where an image is inserted in the text.
        vision_start_token_id / vision_end_token_id (`int`, *optional*):
            Tokens that chat templates may put around the image placeholder (plain text tokens for the model); no
            default, since a default id would have to fit every vocabulary.
        tie_word_embeddings (`bool`, *optional*):
            Tie the LM head to the input embeddings; follows the text backbone when left unset.

    Example:

    ```python
    >>> import casa_hf
    >>> from transformers import AutoModel
    >>> config = casa_hf.CasaConfig(text_config={"model_type": "llama", "num_hidden_layers": 2})
    >>> model = AutoModel.from_config(config)
    ```
    """

    model_type = "casa"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "text_config": SubConfigSpec(
                config_class=AutoConfig, model_type="qwen2", init_kwargs=_DEFAULT_TEXT_CONFIG
            ),
            "vision_config": Qwen2_5_VLVisionConfig,
        }
    else:  # Transformers < 5.20 (vLLM's pin): `_build_sub_configs`
        sub_configs = {"text_config": AutoConfig, "vision_config": Qwen2_5_VLVisionConfig}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    casa_layers: list[int] | None = None
    casa_attention: CasaAttentionKind = "casa"
    casa_cross_attention_rope: bool = False
    casa_placement: CasaPlacement = "parallel"
    casa_shared: bool = False
    casa_image_positions: ImagePositions = "insertion"
    casa_image_centering: bool = False
    casa_text_only_windows: TextOnlyWindows = "attend"
    casa_window_images: WindowImages = "consecutive"
    image_token_id: int = 151655
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        _warn_on_misspelt_fields(kwargs)
        if SubConfigSpec is None:
            self._build_sub_configs()
        self.text_config = _quiet_mrope_section(self.text_config)
        # Like built-in configs, keys CasaConfig does not list (`quantization_config`, attributes other libraries
        # set) are kept as attributes, so that everything `save_pretrained` wrote reloads.
        super().__post_init__(**kwargs)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self._check_consistency()

    def _build_sub_configs(self) -> None:
        """The sub-configs from their dicts or defaults, as Transformers >= 5.20 builds them from
        `sub_configs_defaults`."""
        if self.text_config is None:
            self.text_config = {"model_type": "qwen2", **_DEFAULT_TEXT_CONFIG}
        if isinstance(self.text_config, dict):
            text = dict(self.text_config)
            self.text_config = AutoConfig.for_model(text.pop("model_type", "qwen2"), **text)
        if self.vision_config is None or isinstance(self.vision_config, dict):
            self.vision_config = Qwen2_5_VLVisionConfig(**(self.vision_config or {}))

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> CasaConfig:
        """As `PreTrainedConfig.from_dict`, but keys every checkpoint saved before they existed lacks load as what
        those checkpoints computed: `casa_placement` as `"sequential"` (the only block there was),
        `casa_cross_attention_rope` as `True` (cross-attention always rotated) and `casa_window_images` as `"each"`
        (every image opened its window), so each computes what it learnt."""
        legacy = {"casa_placement": "sequential", "casa_cross_attention_rope": True, "casa_window_images": "each"}
        return super().from_dict({**legacy, **config_dict}, **kwargs)

    def _check_consistency(self) -> None:
        """Refuse combinations that would build a model silently different from the one asked for."""
        text, vision = self.text_config, self.vision_config
        if text.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise ValueError(
                f"text_config.model_type={text.model_type!r} is not supported; use one of {SUPPORTED_TEXT_MODEL_TYPES}"
            )
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(
                f"vision_config.out_hidden_size ({vision.out_hidden_size}) must equal text_config.hidden_size "
                f"({text.hidden_size}): the merger projects image features into the text width"
            )
        choices = {
            "casa_attention": CasaAttentionKind,
            "casa_placement": CasaPlacement,
            "casa_image_positions": ImagePositions,
            "casa_text_only_windows": TextOnlyWindows,
            "casa_window_images": WindowImages,
        }
        for name, kind in choices.items():
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {get_args(kind)}")
        if self.casa_image_positions == "mrope":
            _check_mrope_section(text)
        for name in ("casa_image_centering", "casa_cross_attention_rope", "casa_shared"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        num_layers = text.num_hidden_layers
        if self.casa_layers is not None:
            if not self.casa_layers:
                raise ValueError(
                    "casa_layers=[] gives a model on which images have no effect; list at least one block index "
                    "(or None for every block)"
                )
            bad = [i for i in self.casa_layers if not isinstance(i, int) or not 0 <= i < num_layers]
            if bad or len(set(self.casa_layers)) != len(self.casa_layers):
                raise ValueError(
                    f"casa_layers={self.casa_layers} must be distinct block indices in [0, {num_layers}) "
                    f"(text_config.num_hidden_layers={num_layers})"
                )
            self.casa_layers = sorted(self.casa_layers)
        if self.casa_placement == "replace":
            if not self.casa_shared:
                raise ValueError(
                    "casa_placement='replace' turns a block's self-attention into CASA attention with the same "
                    "projections; set casa_shared=True (there are no separate CASA projections to train)"
                )
            if len(self.casa_layer_indices) == num_layers:
                raise ValueError(
                    f"casa_placement='replace' in every block (casa_layers={self.casa_layers}) leaves no attention "
                    "across windows: text would never see anything before the latest image (and plain "
                    "cross-attention no other text at all); replace some blocks, e.g. "
                    "casa_layers=every_nth_block(num_hidden_layers, 2)"
                )
        if not 0 <= self.image_token_id < text.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the text vocabulary (vocab_size={text.vocab_size})"
            )
        for name in ("vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < text.vocab_size:
                raise ValueError(f"{name}={value} is outside the text vocabulary (vocab_size={text.vocab_size})")

    @property
    def casa_layer_indices(self) -> list[int]:
        """The decoder blocks that carry a CASA sub-layer."""
        if self.casa_layers is None:
            return list(range(self.text_config.num_hidden_layers))
        return list(self.casa_layers)

    @property
    def vision_marker_ids(self) -> list[int]:
        """The vision start / end tokens the config names, which may stand between the images of one CASA window."""
        return [i for i in (self.vision_start_token_id, self.vision_end_token_id) if i is not None]

    @property
    def casa_replaced_blocks(self) -> list[int]:
        """The decoder blocks whose self-attention CASA attention replaces (`casa_placement="replace"`)."""
        return self.casa_layer_indices if self.casa_placement == "replace" else []

    @property
    def casa_uses_rope(self) -> bool:
        """Whether CASA queries and image keys carry RoPE: always in CASA, whose text keys need positions; in plain
        cross-attention only where `casa_cross_attention_rope` keeps an older checkpoint's behaviour."""
        return self.casa_attention == "casa" or self.casa_cross_attention_rope


def every_nth_block(num_hidden_layers: int, n: int = 2) -> list[int]:
    """Blocks n-1, 2n-1, ...: the paper's CA-replace layout (n = 2 by default, 4 in its ablation), as `casa_layers`.
    The first block keeps its self-attention, so the text reaches the first replaced block contextualized."""
    if not isinstance(n, int) or not 2 <= n <= num_hidden_layers:
        raise ValueError(
            f"n={n!r} must be an integer in [2, num_hidden_layers={num_hidden_layers}]: replacing every block would "
            "leave no attention across windows"
        )
    return list(range(n - 1, num_hidden_layers, n))


__all__ = ["CasaConfig", "every_nth_block"]
