"""`casa-hf` command line: `casa-hf demo` streams synthetic frames through a CASA model, offline."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from .casa_cache import CasaCache
from .configuration_casa import CasaConfig
from .modeling_casa import CasaForConditionalGeneration

DEMO_IMAGE_TOKEN = 150


def tiny_random_model(seed: int = 0) -> CasaForConditionalGeneration:
    """A small random-weight CASA model (Qwen2-style text, Qwen2.5-VL vision) built in code, no download."""
    torch.manual_seed(seed)
    config = CasaConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=256,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=DEMO_IMAGE_TOKEN,
        vision_start_token_id=None,
        vision_end_token_id=None,
    )
    return CasaForConditionalGeneration(config).eval()


def synthetic_frame(index: int, size: int = 112) -> Image.Image:
    """A moving square on a coloured background: frame `index` of an endless synthetic video."""
    image = Image.new("RGB", (size, size), color=(20 + 7 * index % 200, 40, 90))
    draw = ImageDraw.Draw(image)
    x = (index * 9) % (size - 30)
    draw.rectangle([x, size // 3, x + 28, size // 3 + 28], fill=(240, 200, 40))
    return image


def _cache_bytes(cache: CasaCache) -> int:
    text = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)
    side = sum(state.keys.numel() * state.keys.element_size() * 2 for state in cache.casa_states.values())
    return text + side


def run_demo(frames: int, new_tokens: int, seed: int) -> None:
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    model = tiny_random_model(seed)
    processor = Qwen2VLImageProcessorPil(min_pixels=112 * 112, max_pixels=112 * 112)
    rng = np.random.default_rng(seed)
    cache, history = CasaCache(), torch.empty(1, 0, dtype=torch.long)
    print("CASA demo: random-weight tiny model, synthetic video, one persistent text-only cache")
    print(f"{'frame':>5} {'ms/token':>8} {'cache text tok':>14} {'CASA window':>11} {'cache KiB':>9}  generated ids")
    image_tokens = 0
    for index in range(frames):
        pixels = processor(images=[synthetic_frame(index)], return_tensors="pt")
        image_tokens = int(pixels["image_grid_thw"].prod()) // 4
        prompt = torch.tensor([[DEMO_IMAGE_TOKEN, *rng.integers(3, 140, size=3).tolist()]])
        history = torch.cat([history, prompt], dim=1)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=history,
                pixel_values=pixels["pixel_values"],
                image_grid_thw=pixels["image_grid_thw"],
                cache=cache,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        elapsed = (time.perf_counter() - start) * 1000 / new_tokens
        generated = out[0, history.shape[1] :].tolist()
        history = out
        window = int(cache.casa_state_lengths(0)[0])
        print(
            f"{index:>5} {elapsed:>8.1f} {cache.get_seq_length():>14} {window:>11} "
            f"{_cache_bytes(cache) / 1024:>9.1f}  {generated}"
        )
    insertion = cache.get_seq_length() + frames * image_tokens
    print(
        f"After {frames} frames the cache holds {cache.get_seq_length()} text tokens and one image "
        f"({image_tokens} tokens) per CASA layer; token insertion would hold {insertion} tokens."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="casa-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="stream synthetic frames through a tiny CASA model (offline)")
    demo.add_argument("--frames", type=int, default=8)
    demo.add_argument("--new-tokens", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args.frames, args.new_tokens, args.seed)


if __name__ == "__main__":
    main()
