"""Tiny random CASA models and inputs, built offline in code."""

from __future__ import annotations

import torch

from casa_hf import CasaConfig, CasaForConditionalGeneration

IMAGE_TOKEN = 150
VOCAB = 200


def tiny_config(backbone: str = "qwen2", **overrides) -> CasaConfig:
    text = dict(
        model_type=backbone,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if backbone == "helium":
        text["head_dim"] = 16  # Helium defaults to 128, and its o_proj assumes heads * head_dim == hidden_size
    vision = dict(
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
    kwargs = dict(
        text_config=text,
        vision_config=vision,
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
    model.set_attn_implementation({"text_config": attn, "vision_config": "sdpa"})
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
