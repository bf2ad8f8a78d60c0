"""Decode latency per token with K images in context: CASA vs Qwen2.5-VL token insertion vs the bare text LLM.

The context is K turns of (one frame + a few text tokens), fed through one persistent cache; then `--new-tokens`
tokens are decoded and timed. The text LLM gets the same text without the frames: the floor of any VLM on it.

    python benchmarks/bench_decode.py --size small --image-size 448 --out results/decode
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import InsertionStream, TextOnlyStream, median, synthetic_frame  # noqa: E402

from casa_hf.random_models import (  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=("tiny", "small", "medium", "base"))
    parser.add_argument("--images", default="1,2,4,8,16,32,64")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/decode", help="prefix of the .json and .png outputs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = word_tokenizer(1024)
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
    counts = [int(k) for k in args.images.split(",")]
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            dict(args=vars(args), seconds=time.time() - started, device=f"CPU ({args.threads} threads)", rows=rows),
            indent=1,
        )
        + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, label in (("casa", "CASA"), ("insertion", "token insertion"), ("text_llm", "text LLM (floor)")):
        axis.plot(counts, [r[f"{name}_ms"] for r in rows], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("images in context")
    axis.set_ylabel("decode latency (ms / token)")
    axis.set_title(f"Decode latency, {args.size} models, {args.image_size}px frames")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
