"""Random-weight models and word-level tokenizers built in code, for training, demos and benchmarks that run offline.

`random_casa` and `random_qwen2_5_vl` share the same text and vision configs, so CASA and token insertion are
compared at equal size; `random_text_llm` is the same LLM alone (the floor of any VLM).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config
from transformers.models.qwen2 import Qwen2ForCausalLM
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from .configuration_casa import CasaConfig
from .modeling_casa import CasaForConditionalGeneration
from .processing_casa import CasaProcessor


@dataclass(frozen=True)
class ModelSize:
    """A Qwen2-style LLM and a Qwen2.5-VL vision tower. The defaults are the model `casa-hf train` trains on a CPU."""

    hidden: int = 160
    layers: int = 3
    heads: int = 5
    kv_heads: int = 5
    intermediate: int = 384
    vision_depth: int = 3
    vision_hidden: int = 96
    vision_heads: int = 3
    vision_mlp_ratio: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 1e4


# Benchmark sizes, with Qwen2.5's long-context RoPE; "base" is Qwen2.5-0.5B's LLM.
_QWEN_LIKE = dict(vision_mlp_ratio=4, max_position_embeddings=131072, rope_theta=1e6)
SIZES = {
    "tiny": ModelSize(64, 2, 4, 2, 128, 2, 32, 2, **_QWEN_LIKE),
    "small": ModelSize(256, 4, 4, 2, 704, 4, 128, 4, **_QWEN_LIKE),
    "medium": ModelSize(512, 8, 8, 2, 1408, 6, 256, 4, **_QWEN_LIKE),
    "base": ModelSize(896, 24, 14, 2, 4864, 8, 640, 10, **_QWEN_LIKE),
    # SmolLM2-135M's LLM shape (30 blocks, hidden 576, 9 heads / 3 KV heads) on a Qwen2-style block
    "smollm2": ModelSize(576, 30, 9, 3, 1536, 4, 256, 4, vision_mlp_ratio=4, rope_theta=1e5),
    # Helium-1 2B's LLM shape (Transformers' `HeliumConfig` defaults: 24 blocks, hidden 2560, 20 heads, no GQA), the
    # LLM of the paper's CASA-Helium1-VL-2B, on a Qwen2-style block: for GPU decode figures next to the paper's
    "helium2b": ModelSize(2560, 24, 20, 20, 7040, 8, 640, 10, **_QWEN_LIKE),
}
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
)


def word_tokenizer(vocab_size: int = 1024, words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: `words` first, fillers `w<i>` up to `vocab_size`, special tokens last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = list(words or [])
    vocab = {"<unk>": 0, "<pad>": 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
    fillers = vocab_size - len(SPECIAL_TOKENS) - len(vocab)
    if fillers < 0:
        raise ValueError(f"vocab_size={vocab_size} is too small for {len(vocab) + len(SPECIAL_TOKENS)} tokens")
    vocab.update({f"w{i}": len(vocab) + i for i in range(fillers)})
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",  # what every chat turn starts with; never added by encoding
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_start|>", "<|im_end|>")],
    )


def _model_size(size: str | ModelSize) -> ModelSize:
    if isinstance(size, ModelSize):
        return size
    if size not in SIZES:
        raise ValueError(f"Unknown model size {size!r}; choose one of {list(SIZES)} or pass a ModelSize")
    return SIZES[size]


def _text_config(size: ModelSize, tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=size.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def _vision_config(size: ModelSize) -> dict:
    return dict(
        depth=size.vision_depth,
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * size.vision_mlp_ratio,
        num_heads=size.vision_heads,
        out_hidden_size=size.hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[size.vision_depth - 1],
    )


def _token_ids(tokenizer) -> dict:
    return {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }


def random_processor(tokenizer: PreTrainedTokenizerFast, image_size: int | None = 112) -> CasaProcessor:
    return CasaProcessor(Qwen2VLImageProcessorPil(), tokenizer, image_size=image_size)


def random_casa(
    size: str | ModelSize, tokenizer: PreTrainedTokenizerFast, **casa_options
) -> CasaForConditionalGeneration:
    size = _model_size(size)
    config = CasaConfig(
        text_config=_text_config(size, tokenizer),
        vision_config=_vision_config(size),
        **_token_ids(tokenizer),
        **casa_options,
    )
    return CasaForConditionalGeneration(config).eval()


def random_qwen2_5_vl(size: str | ModelSize, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLForConditionalGeneration:
    """Token insertion at the same size: Qwen2.5-VL with the same LLM and vision tower configs."""
    size = _model_size(size)
    text = _text_config(size, tokenizer)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    third = head_dim // 2 // 4
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    text.pop("model_type")
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=_vision_config(size),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        **_token_ids(tokenizer),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def random_text_llm(size: str | ModelSize, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """The bare text LLM of the same size: the floor of any VLM built on it."""
    text = _text_config(_model_size(size), tokenizer)
    text.pop("model_type")
    return Qwen2ForCausalLM(Qwen2Config(**text)).eval()


__all__ = [
    "SIZES",
    "ModelSize",
    "random_casa",
    "random_processor",
    "random_qwen2_5_vl",
    "random_text_llm",
    "word_tokenizer",
]
