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


def _layer_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _add_conversion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="folder to write (appears only when complete)")
    parser.add_argument("--casa-layers", type=_layer_list, default=None, help="e.g. 0,4,8 (default: every block)")
    parser.add_argument(
        "--casa-init",
        choices=("copy", "random"),
        default="copy",
        help="CASA q/k/v: copied from the block's self-attention, or random (output proj. is zero)",
    )
    parser.add_argument("--shared", action="store_true", help="the -Shared variant: CASA reuses SA projections")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: keep the source dtype)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--verify", action="store_true", help="compare with the source and run an image prompt")
    parser.add_argument("--seed", type=int, default=0)


def run_convert(args: argparse.Namespace) -> None:
    from .convert import convert_llm_to_casa, convert_qwen2_5_vl_to_casa

    options = dict(
        casa_layers=args.casa_layers,
        casa_init=args.casa_init,
        shared=args.shared,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        verify=args.verify,
        seed=args.seed,
    )
    if args.source_kind == "qwen2_5_vl":
        report = convert_qwen2_5_vl_to_casa(args.source, args.output, **options)
    else:
        report = convert_llm_to_casa(args.llm, args.vision, args.output, **options)
    print(report.summary())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casa-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="stream synthetic frames through a tiny CASA model (offline)")
    demo.add_argument("--frames", type=int, default=8)
    demo.add_argument("--new-tokens", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)

    convert = commands.add_parser("convert", help="convert a checkpoint folder into a CASA checkpoint folder")
    sources = convert.add_subparsers(dest="source_kind", required=True)
    qwen = sources.add_parser("qwen2_5_vl", help="a Qwen2.5-VL (token insertion) checkpoint -> CASA")
    qwen.add_argument("source", help="local Qwen2.5-VL checkpoint folder")
    _add_conversion_options(qwen)
    llm = sources.add_parser("llm", help="a text LLM (Qwen2, Llama, Helium) + a Qwen2.5-VL vision tower -> CASA")
    llm.add_argument("llm", help="local text LLM checkpoint folder")
    llm.add_argument("vision", help="local Qwen2.5-VL checkpoint folder whose vision tower is used")
    _add_conversion_options(llm)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        run_demo(args.frames, args.new_tokens, args.seed)
    elif args.command == "convert":
        run_convert(args)


if __name__ == "__main__":
    main()
