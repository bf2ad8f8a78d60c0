"""Decode latency per token with K images in context: CASA vs Qwen2.5-VL token insertion vs the bare text LLM.

The context is K turns of (one frame + a few text tokens), fed through one persistent cache; then `--new-tokens`
tokens are decoded and timed. The text LLM gets the same text without the frames: the floor of any VLM on it.

    python benchmarks/bench_decode.py --size small --image-size 448 --out results/decode

Then `generate()` itself decodes after one prompt of K frame turns, with each cache (`--caches`): the dynamic cache,
the static one, and the static one with compiled decode steps (what `generate()` does on an accelerator; forced on
CPU here). On a GPU, the same script is the GPU variant (bf16, CUDA graphs through the compiled static cache):

    python benchmarks/bench_decode.py --device cuda --dtype bfloat16 --size base --images "" --out results/decode_gpu
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import InsertionStream, TextOnlyStream, median, synthetic_frame  # noqa: E402

from casa_hf.random_models import (  # noqa: E402
    SIZES,
    random_casa,
    random_processor,
    random_qwen2_5_vl,
    random_text_llm,
    word_tokenizer,
)
from casa_hf.streaming import CasaStream  # noqa: E402


def decode_ms_per_token(stream, images: int, image_size: int, new_tokens: int, repeats: int) -> float:
    """Fill the context with `images` frame turns, then time decoding (median over `repeats` runs)."""
    stream.reset()
    for index in range(images):
        stream.feed(synthetic_frame(index, image_size), max_new_tokens=1)
    timings = []
    for _ in range(repeats):
        step = stream.feed(text="w9 w8 w7", max_new_tokens=new_tokens)
        timings.append(1000.0 / step.decode_tokens_per_s)
    return median(timings)


CACHES = {  # generate() options of each cache row; "compiled" is what generate() does on an accelerator
    "dynamic": {},
    "static": dict(cache_implementation="static"),
    "compiled": dict(cache_implementation="static", compile_config=CompileConfig(fullgraph=True)),
}
CACHES["compiled"]["compile_config"]._compile_all_devices = True  # also on CPU


def prompts(processor, images: int, image_size: int) -> dict[str, dict]:
    """One prompt of `images` frame turns for each model: CASA's placeholders, insertion's expanded image tokens,
    the text LLM's text alone."""
    frames = [synthetic_frame(index, image_size) for index in range(images)]
    turn = f"<|vision_start|>{processor.image_token}<|vision_end|>w1 w2 w3 w4 "
    casa = processor(text=turn * images + "w9 w8 w7", images=frames or None, return_tensors="pt")
    tokens_per_image = int(casa["image_grid_thw"][0].prod()) // 4 if images else 0
    image = processor.image_token_id
    expanded = [t for token in casa["input_ids"][0].tolist() for t in ([token] * tokens_per_image if token == image
                                                                         else [token])]  # fmt: skip
    text = processor.tokenizer("w1 w2 w3 w4 " * images + "w9 w8 w7", return_tensors="pt")
    images_only = {k: casa[k] for k in ("pixel_values", "image_grid_thw") if k in casa}
    return {
        "casa": dict(input_ids=casa["input_ids"], **images_only),
        "insertion": dict(input_ids=torch.tensor([expanded]), **images_only),
        "text_llm": dict(input_ids=text["input_ids"]),
    }


def generate_ms(model, inputs: dict, cache: str, new_tokens: int, repeats: int) -> tuple[float, float]:
    """Decode time per token, the best of `repeats` of (time for `new_tokens` - time for 1) / (new_tokens - 1) (the
    prefill cancels out), and the best time to the first token (image encoding and prefill). A first untimed call
    compiles (for the compiled row) and warms up."""
    options = dict(do_sample=False, eos_token_id=None, **CACHES[cache])
    options.update({name: tensor.to(model.device) for name, tensor in inputs.items()})
    if "pixel_values" in options:
        options["pixel_values"] = options["pixel_values"].to(model.dtype)

    def seconds(max_new_tokens: int) -> float:
        start = time.perf_counter()
        model.generate(**options, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        seconds(new_tokens)
        timings = [(seconds(new_tokens), seconds(1)) for _ in range(repeats)]
    decode = min((many - one) / (new_tokens - 1) for many, one in timings)
    return decode * 1e3, min(one for _, one in timings) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=tuple(SIZES))
    parser.add_argument("--images", default="1,2,4,8,16,32,64")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--vocab", type=int, default=1024, help="vocabulary size (SmolLM2's: 49152; its LM head counts)"
    )
    parser.add_argument("--device", default="cpu", help="e.g. cuda: the GPU variant (with --dtype bfloat16)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--caches", default="dynamic,static,compiled", help=f"generate() rows, of {list(CACHES)}")
    parser.add_argument("--generate-images", default="1,8,32", help="images in the generate() prompts ('' for none)")
    parser.add_argument("--out", default="results/decode", help="prefix of the .json and .png outputs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = word_tokenizer(args.vocab)
    processor = random_processor(tokenizer, image_size=args.image_size)
    torch.manual_seed(0)
    streams = {
        "casa": CasaStream(random_casa(args.size, tokenizer), processor, frame_text="w1 w2 w3 w4", eos_token_id=-1),
        "insertion": InsertionStream(
            random_qwen2_5_vl(args.size, tokenizer), processor, frame_text="w1 w2 w3 w4", eos_token_id=-1
        ),
        "text_llm": TextOnlyStream(
            random_text_llm(args.size, tokenizer), processor, frame_text="w1 w2 w3 w4", eos_token_id=-1
        ),
    }
    for stream in streams.values():
        stream.model.to(device=args.device, dtype=getattr(torch, args.dtype))
    counts = [int(k) for k in args.images.split(",") if k]
    started = time.time()
    rows = []
    from tqdm.auto import tqdm

    for images in tqdm(counts, desc="images in context"):
        row = {"images": images}
        for name, stream in streams.items():
            row[f"{name}_ms"] = decode_ms_per_token(stream, images, args.image_size, args.new_tokens, args.repeats)
        row["casa_over_llm"] = row["casa_ms"] / row["text_llm_ms"]
        row["insertion_over_llm"] = row["insertion_ms"] / row["text_llm_ms"]
        row["casa_over_insertion"] = row["casa_ms"] / row["insertion_ms"]
        rows.append(row)

    caches = [c for c in args.caches.split(",") if c]
    unknown = set(caches) - set(CACHES)
    if unknown:
        raise ValueError(f"--caches: unknown {sorted(unknown)}; choose among {list(CACHES)}")
    models = {name: stream.model for name, stream in streams.items()}
    generate_rows = []
    generate_counts = [int(k) for k in args.generate_images.split(",") if k]
    for images in tqdm(generate_counts, desc="generate() prompts"):
        inputs = prompts(processor, images, args.image_size)
        row = {"images": images}
        for cache in caches:
            for name, model in models.items():
                row[f"{name}_{cache}_ms"], row[f"{name}_{cache}_first_token_ms"] = generate_ms(
                    model, inputs[name], cache, args.new_tokens, args.repeats
                )
            row[f"casa_over_llm_{cache}"] = row[f"casa_{cache}_ms"] / row[f"text_llm_{cache}_ms"]
            row[f"casa_over_insertion_{cache}"] = row[f"casa_{cache}_ms"] / row[f"insertion_{cache}_ms"]
            first_tokens = row[f"casa_{cache}_first_token_ms"] / row[f"insertion_{cache}_first_token_ms"]
            row[f"casa_over_insertion_first_token_{cache}"] = first_tokens
        generate_rows.append(row)

    header = (
        f"{'K images':>8} {'CASA ms':>9} {'insert ms':>9} {'LLM ms':>8} {'CASA/LLM':>9} {'ins/LLM':>8} {'CASA/ins':>9}"
    )
    print(
        f"\nDecode latency per token, {args.size} models, {args.image_size}px frames\n{header}\n" + "-" * len(header)
    )
    for r in rows:
        print(
            f"{r['images']:>8} {r['casa_ms']:>9.2f} {r['insertion_ms']:>9.2f} {r['text_llm_ms']:>8.2f} "
            f"{r['casa_over_llm']:>9.2f} {r['insertion_over_llm']:>8.2f} {r['casa_over_insertion']:>9.2f}"
        )
    if generate_rows:
        header = f"{'K images':>8} {'cache':>9} {'CASA ms':>9} {'insert ms':>9} {'LLM ms':>8} {'CASA/LLM':>9}"
        header += f" {'CASA/ins':>9} {'1st tok CASA/ins':>17}"
        print(f"\ngenerate() decode per token, one prompt of K frame turns\n{header}\n" + "-" * len(header))
        for r in generate_rows:
            for cache in caches:
                print(
                    f"{r['images']:>8} {cache:>9} {r[f'casa_{cache}_ms']:>9.2f} {r[f'insertion_{cache}_ms']:>9.2f} "
                    f"{r[f'text_llm_{cache}_ms']:>8.2f} {r[f'casa_over_llm_{cache}']:>9.2f} "
                    f"{r[f'casa_over_insertion_{cache}']:>9.2f} {r[f'casa_over_insertion_first_token_{cache}']:>17.2f}"
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = dict(
        args=vars(args),
        seconds=time.time() - started,
        device=torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({args.threads} threads)",
        rows=rows,
        generate_rows=generate_rows,
    )
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (axis, ratios) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, label in (("casa", "CASA"), ("insertion", "token insertion"), ("text_llm", "text LLM (floor)")):
        axis.plot(counts, [r[f"{name}_ms"] for r in rows], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("images in context")
    axis.set_ylabel("decode latency (ms / token)")
    axis.set_title(f"Streamed decode, {args.size} models, {args.image_size}px frames")
    axis.grid(alpha=0.3)
    axis.legend()
    for cache in caches if generate_rows else []:
        ratios.plot(generate_counts, [r[f"casa_over_llm_{cache}"] for r in generate_rows], marker="o", label=cache)
    ratios.axhline(1.0, color="grey", linestyle=":")
    ratios.set_xlabel("images in the prompt")
    ratios.set_ylabel("CASA / text LLM decode time")
    ratios.set_title("generate() decode, by cache")
    ratios.grid(alpha=0.3)
    ratios.legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
