"""Streaming video: CASA vs Qwen2.5-VL token insertion at equal size, turn after turn through one persistent cache.

Each turn feeds one frame plus a few text tokens and generates `--new-tokens` tokens (the official benchmark's
protocol, random weights here). Per turn: time to first token, decode tokens/s, cache size in tokens and bytes, and
the process's resident memory. Each model runs in its own process, so memory figures do not mix.

    python benchmarks/bench_streaming.py --size small --turns 256 --image-size 448 --out results/streaming
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import InsertionStream, median, peak_rss_mib, rss_mib, synthetic_frame  # noqa: E402

MODELS = ("casa", "casa_budget", "insertion")  # casa_budget: CASA with a TextBudget (constant cache)


def worker(args) -> None:
    """Run one model's stream and print one JSON line per turn."""
    from casa_hf.random_models import random_casa, random_processor, random_qwen2_5_vl, word_tokenizer
    from casa_hf.streaming import CasaStream, TextBudget

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = word_tokenizer(args.vocab)
    processor = random_processor(tokenizer, image_size=args.image_size)
    torch.manual_seed(0)
    insertion = args.worker == "insertion"
    model = (random_qwen2_5_vl if insertion else random_casa)(args.size, tokenizer).to(device=device, dtype=dtype)
    if device == "cuda" and args.flash:
        model.set_attn_implementation("flash_attention_2")
    budget = TextBudget(sink_tokens=4, window_tokens=args.budget) if args.worker == "casa_budget" else None
    stream = (InsertionStream if insertion else CasaStream)(
        model,
        processor,
        frame_text="w1 w2 w3 w4",
        max_new_tokens=args.new_tokens,
        text_budget=budget,
        eos_token_id=-1,  # never stop early: every turn decodes the same number of tokens
    )
    for turn in range(args.turns):
        step = stream.feed(synthetic_frame(turn, args.image_size))
        print(
            json.dumps(
                dict(
                    turn=turn,
                    ttft_ms=step.time_to_first_token_s * 1000,
                    decode_tokens_per_s=step.decode_tokens_per_s,
                    cache_tokens=step.cache_tokens,
                    cache_mib=step.cache_bytes / 2**20,
                    rss_mib=rss_mib(),
                    peak_rss_mib=peak_rss_mib(),
                )
            ),
            flush=True,
        )


def run_model(name: str, args) -> list[dict]:
    command = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    rows = []
    from tqdm.auto import tqdm

    for line in tqdm(process.stdout, total=args.turns, desc=name, unit="turn"):
        rows.append(json.loads(line))
    if process.wait():
        raise RuntimeError(f"{name} worker failed")
    return rows


def summarize(results: dict[str, list[dict]], window: int) -> dict:
    """Medians over the first turns (after one warm-up) and the last turns, and their ratios."""
    metrics = ("ttft_ms", "decode_tokens_per_s", "cache_tokens", "cache_mib", "rss_mib")
    summary = {}
    for name, rows in results.items():
        first = {m: median([r[m] for r in rows[1 : 1 + window]]) for m in metrics}
        last = {m: median([r[m] for r in rows[-window:]]) for m in metrics}
        summary[name] = dict(first=first, last=last, last_over_first={m: last[m] / first[m] for m in metrics})
    for name in ("casa", "casa_budget"):
        summary[f"{name}_over_insertion_at_last"] = {
            m: summary[name]["last"][m] / summary["insertion"]["last"][m] for m in metrics
        }
    return summary


def print_table(summary: dict, turns: int) -> None:
    print(f"\nStreaming, {turns} turns (medians of the first / last turns)")
    header = f"{'model':<10} {'metric':<20} {'first':>10} {'last':>10} {'last/first':>10}"
    print(header + "\n" + "-" * len(header))
    for name in MODELS:
        for metric, last_over_first in summary[name]["last_over_first"].items():
            first, last = summary[name]["first"][metric], summary[name]["last"][metric]
            print(f"{name:<10} {metric:<20} {first:>10.2f} {last:>10.2f} {last_over_first:>10.2f}")
    for name in ("casa", "casa_budget"):
        print(f"\n{name} / insertion at the last turns:")
        for metric, ratio in summary[f"{name}_over_insertion_at_last"].items():
            print(f"  {metric:<20} {ratio:.3f}")


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("ttft_ms", "time to first token (ms)"),
        ("decode_tokens_per_s", "decode tokens / s"),
        ("cache_tokens", "cache (tokens)"),
        ("rss_mib", "process memory (MiB)"),
    )
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    for axis, (metric, label) in zip(axes.flat, panels, strict=True):
        for name, rows in results.items():
            axis.plot([r["turn"] for r in rows], [r[metric] for r in rows], label=name)
        axis.set_xlabel("turn (one frame each)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0, 0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=("tiny", "small", "medium", "base"))
    parser.add_argument("--turns", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=8, help="turns in each median")
    parser.add_argument("--budget", type=int, default=512, help="text window of the casa_budget run (tokens)")
    parser.add_argument("--flash", action="store_true", help="flash_attention_2 on CUDA")
    parser.add_argument("--out", default="results/streaming", help="prefix of the .json and .png outputs")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    started = time.time()
    results = {name: run_model(name, args) for name in MODELS}
    summary = summarize(results, args.window)
    print_table(summary, args.turns)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({args.threads} threads)"
    payload = dict(
        args={k: v for k, v in vars(args).items() if k != "worker"},
        device=device,
        seconds=time.time() - started,
        summary=summary,
        turns=results,
    )
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(
        results,
        out.with_suffix(".png"),
        f"CASA vs token insertion, {args.size} models, {args.image_size}px frames, {device}",
    )
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
