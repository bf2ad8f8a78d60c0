"""Assisted and prompt-lookup decoding of a CASA model against plain greedy decoding, side by side in one run.

A chat about an image is answered greedily three ways: plain `generate()`, prompt lookup (drafts copied from the
prompt) and assisted decoding with CASA's own text LLM as the draft model (`model.backbone_llm()`: same tokenizer,
no images). All three give the same tokens (checked here and in `tests/test_assisted.py`); what changes is the time.

    python benchmarks/bench_assisted.py --model tiny --out results/assisted_tiny
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, synthetic_frame  # noqa: E402

from casa_hf.demo import load_demo_model  # noqa: E402


def timed_generate(model, inputs: dict, repeats: int, **options) -> tuple[torch.Tensor, float]:
    """Generated tokens and the median wall time over `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, **options)
        times.append(time.perf_counter() - start)
    return out, median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a built-in model name or a CASA checkpoint folder")
    parser.add_argument("--question", default="Describe the picture.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lookup-tokens", type=int, default=4, help="prompt_lookup_num_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/assisted", help="prefix of the .json and .png outputs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = load_demo_model(args.model)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": synthetic_frame(3, processor.image_size or 224)},
                {"type": "text", "text": args.question},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    budget = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None)
    variants = {
        "greedy": {},
        "prompt lookup": {"prompt_lookup_num_tokens": args.lookup_tokens},
        "assisted (backbone LLM draft)": {"assistant_model": model.backbone_llm()},
    }
    rows, reference = [], None
    for name, options in variants.items():
        out, seconds = timed_generate(model, inputs, args.repeats, **budget, **options)
        reference = out if reference is None else reference
        rows.append(
            {
                "variant": name,
                "seconds": seconds,
                "tokens_per_s": args.new_tokens / seconds,
                "same_tokens_as_greedy": bool(torch.equal(out, reference)),
            }
        )
    greedy = rows[0]["seconds"]
    print(f"{args.model or 'default model'}: {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'variant':<32} {'s':>8} {'tok/s':>8} {'speed-up':>9} {'same tokens':>12}")
    for row in rows:
        row["speed_up"] = greedy / row["seconds"]
        print(
            f"{row['variant']:<32} {row['seconds']:>8.3f} {row['tokens_per_s']:>8.1f} {row['speed_up']:>8.2f}x "
            f"{str(row['same_tokens_as_greedy']):>12}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3))
    axis.barh([row["variant"] for row in rows], [row["tokens_per_s"] for row in rows], color="tab:blue")
    axis.set_xlabel("tokens / s (CPU)")
    axis.set_title(f"{args.model or 'default model'}: decoding {args.new_tokens} tokens", fontsize=9)
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    main()
