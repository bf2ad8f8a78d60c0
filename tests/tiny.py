"""Tiny random CASA models and inputs, built offline in code."""

from __future__ import annotations

import torch
from varlen import STAND_INS

from casa_hf import CasaCache, CasaConfig, CasaForConditionalGeneration

IMAGE_TOKEN = 150
VOCAB = 200


TINY_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
)


# The CASA block layouts tests run every path through: the paper's parallel block, the sequential block of older
# checkpoints, the shared parallel block (q/k/v computed once for both attentions) and CASA replacing the
# self-attention of block 0 (the harder of the two blocks to replace: the cache's text length lives in block 1)
PLACEMENTS = {
    "parallel": dict(casa_placement="parallel"),
    "sequential": dict(casa_placement="sequential"),
    "parallel_shared": dict(casa_placement="parallel", casa_shared=True),
    "replace": dict(casa_placement="replace", casa_shared=True, casa_layers=[0]),
}


# The tiny LLM's sizes and special tokens, for CASA and Qwen2.5-VL models alike
TINY_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(backbone: str = "qwen2", text_overrides: dict | None = None, **overrides) -> CasaConfig:
    text = dict(TINY_TEXT, model_type=backbone, max_position_embeddings=512, tie_word_embeddings=False)
    text.update(text_overrides or {})
    if backbone == "helium":
        text["head_dim"] = 16  # Helium defaults to 128, and its o_proj assumes heads * head_dim == hidden_size
    kwargs = dict(
        text_config=text,
        vision_config=dict(TINY_VISION),
        image_token_id=IMAGE_TOKEN,
        vision_start_token_id=151,
        vision_end_token_id=152,
    )
    kwargs.update(overrides)
    return CasaConfig(**kwargs)


def tiny_model(backbone: str = "qwen2", attn: str = "eager", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(backbone, **overrides)
    model = CasaForConditionalGeneration(config).eval()
    # The Qwen2.5-VL vision tower has no flex/varlen path of its own: it keeps sdpa there.
    stand_in = attn in STAND_INS
    model.set_attn_implementation({"text_config": "sdpa" if stand_in else attn, "vision_config": "sdpa"})
    if stand_in:  # set as is: Transformers (>= 5.25) would look for a Hub kernel under a "flash" name it does not know
        model.config.text_config._attn_implementation = attn
    return model


def random_images(grids: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of images whose grids are (height, width) in 14-px patches (even), as the Qwen2-VL processor gives."""
    g = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    patches = int(grid_thw.prod(-1).sum())
    return torch.randn(patches, 3 * 2 * 14 * 14, generator=g), grid_thw


def random_text(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 140, (length,), generator=g).tolist()


SPECIAL_TOKENS = {
    "<pad>": 0,
    "<bos>": 1,
    "<|im_end|>": 2,
    "<|im_start|>": 3,
    "<unk>": 4,
    "<|image_pad|>": IMAGE_TOKEN,
    "<|vision_start|>": 151,
    "<|vision_end|>": 152,
}
WORDS = (
    "user assistant system what colour color is the a an of in on this that image picture photo frame video "
    "red green blue yellow square circle triangle left right top bottom how many there are one two three "
    "describe it shows and between changed ? . , !"
).split()


def tiny_tokenizer():
    """A word-level tokenizer built in code, ids consistent with `tiny_config` (image token = 150)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL_TOKENS)
    for index, word in enumerate(WORDS):
        vocab[word] = 5 + index
    free = [i for i in range(VOCAB) if i not in vocab.values()]
    vocab.update({f"w{i}": i for i in free})  # every id the tiny model can emit decodes to a word
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"],
    )
    return tokenizer


def tiny_processor(**kwargs):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from casa_hf import CasaProcessor

    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return CasaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), **kwargs)


def tiny_qwen2_5_vl_config(layers: int = 2, mrope_section=(2, 3, 3), **overrides):
    """Qwen2.5-VL at the tiny model's sizes, with its image tokens."""
    from transformers import Qwen2_5_VLConfig

    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": list(mrope_section)}
    return Qwen2_5_VLConfig(
        text_config=dict(TINY_TEXT, num_hidden_layers=layers, rope_parameters=rope),
        vision_config=TINY_VISION,
        image_token_id=IMAGE_TOKEN,
        video_token_id=153,
        vision_start_token_id=151,
        vision_end_token_id=152,
        **overrides,
    )


def save_tiny_qwen2_5_vl(folder, max_shard_size="300KB", seed=0, tie=False):
    """A tiny random Qwen2.5-VL checkpoint as on the Hub: sharded weights, tokenizer, image processor, template."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    config = tiny_qwen2_5_vl_config(tie_word_embeddings=tie)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
        "{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)
    return model


def save_tiny_llm(folder, backbone="llama", seed=0, tie=False, vocab_size=120):
    """A tiny random text LLM checkpoint with a tokenizer lacking the image and chat tokens
    (`vocab_size=None`: embeddings exactly as large as the tokenizer, so added tokens must grow them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {w: 4 + i for i, w in enumerate(WORDS)}
    text = dict(
        TINY_TEXT,
        model_type=backbone,
        vocab_size=vocab_size or len(vocab),
        hidden_size=48,
        intermediate_size=96,
        tie_word_embeddings=tie,
    )
    if backbone == "helium":
        text["head_dim"] = 12
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text)).eval()
    model.save_pretrained(folder)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    return model


# Inputs several test modules share


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def samples():
    """Three prompts with different images per sample: two images, none, one."""
    rows = [
        random_text(3, 1) + [IMAGE_TOKEN] + random_text(4, 2) + [IMAGE_TOKEN] + random_text(2, 3),
        random_text(5, 4),
        random_text(2, 5) + [IMAGE_TOKEN] + random_text(6, 6),
    ]
    grids = [[(4, 4), (2, 4)], [], [(4, 6)]]
    images = [random_images(g, seed=i) if g else (None, None) for i, g in enumerate(grids)]
    return rows, images


def two_left_padded_samples():
    """Two left-padded samples: one with two images of different sizes, one with text, then one image."""
    first = random_text(3, 1) + [IMAGE_TOKEN] + random_text(4, 2) + [IMAGE_TOKEN] + random_text(3, 3)
    second = random_text(6, 4) + [IMAGE_TOKEN] + random_text(2, 5)
    width = max(len(first), len(second))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, tokens in enumerate((first, second)):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    pixel_values, grid = random_images([(4, 4), (4, 6), (2, 4)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid)


def conversation(num_images: int, seed: int = 0):
    """Text with `num_images` images mid-conversation (some windows long, one image right after another)."""
    tokens, grids = random_text(9, seed), []
    for i in range(num_images):
        tokens += [IMAGE_TOKEN] + random_text(1 + (3 * i + seed) % 5, seed + i + 1)
        grids.append([(4, 4), (2, 4), (4, 6)][i % 3])
    pixel_values, grid_thw = random_images(grids, seed)
    return torch.tensor([tokens]), pixel_values, grid_thw


def image_slices(input_ids, pixel_values, grid_thw, start, end):
    """Pixels and grids of the images whose placeholder falls in `input_ids[:, start:end]`."""
    before = int((input_ids[0, :start] == IMAGE_TOKEN).sum())
    inside = int((input_ids[0, start:end] == IMAGE_TOKEN).sum())
    if inside == 0:
        return None, None
    patches = grid_thw.prod(-1)
    first = int(patches[:before].sum())
    last = first + int(patches[before : before + inside].sum())
    return pixel_values[first:last], grid_thw[before : before + inside]


def incremental_logits(model, input_ids, pixel_values, grid_thw, chunks):
    """Feed the conversation in chunks of the given sizes through one persistent cache."""
    cache, logits, start = CasaCache(), [], 0
    for size in chunks:
        end = start + size
        pv, grid = image_slices(input_ids, pixel_values, grid_thw, start, end)
        out = model(
            input_ids=input_ids[:, start:end], pixel_values=pv, image_grid_thw=grid, cache=cache, use_cache=True
        )
        logits.append(out.logits)
        cache, start = out.cache, end
    return torch.cat(logits, dim=1), cache
