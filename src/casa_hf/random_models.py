"""Random-weight models and word-level tokenizers built in code, for demos and benchmarks that run offline.

`random_casa` and `random_qwen2_5_vl` share the same text and vision configs, so CASA and token insertion are
compared at equal size; `random_text_llm` is the same LLM alone (the floor of any VLM).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config
from transformers.models.qwen2 import Qwen2ForCausalLM
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from .configuration_casa import CasaConfig
from .modeling_casa import CasaForConditionalGeneration
from .processing_casa import CasaProcessor

# text: hidden, layers, heads, kv heads, intermediate; vision: depth, hidden, heads. "base" is Qwen2.5-0.5B's LLM.
SIZES = {
    "tiny": dict(text=(64, 2, 4, 2, 128), vision=(2, 32, 2)),
    "small": dict(text=(256, 4, 4, 2, 704), vision=(4, 128, 4)),
    "medium": dict(text=(512, 8, 8, 2, 1408), vision=(6, 256, 4)),
    "base": dict(text=(896, 24, 14, 2, 4864), vision=(8, 640, 10)),
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
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t != "<|im_end|>"],
    )


def _text_config(size: str, tokenizer: PreTrainedTokenizerFast) -> dict:
    hidden, layers, heads, kv_heads, intermediate = SIZES[size]["text"]
    return dict(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=tokenizer.bos_token_id,  # None for our tokenizers: Qwen2's default id is outside their vocab
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def _vision_config(size: str) -> dict:
    depth, hidden, heads = SIZES[size]["vision"]
    return dict(
        depth=depth,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_heads=heads,
        out_hidden_size=SIZES[size]["text"][0],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[depth - 1],
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


def random_casa(size: str, tokenizer: PreTrainedTokenizerFast, **casa_options) -> CasaForConditionalGeneration:
    config = CasaConfig(
        text_config=_text_config(size, tokenizer),
        vision_config=_vision_config(size),
        **_token_ids(tokenizer),
        **casa_options,
    )
    return CasaForConditionalGeneration(config).eval()


def random_qwen2_5_vl(size: str, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLForConditionalGeneration:
    """Token insertion at the same size: Qwen2.5-VL with the same LLM and vision tower configs."""
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


def random_text_llm(size: str, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """The bare text LLM of the same size: the floor of any VLM built on it."""
    text = _text_config(size, tokenizer)
    text.pop("model_type")
    return Qwen2ForCausalLM(Qwen2Config(**text)).eval()


__all__ = ["SIZES", "random_casa", "random_processor", "random_qwen2_5_vl", "random_text_llm", "word_tokenizer"]
