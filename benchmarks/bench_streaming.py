"""Streaming video: CASA vs token insertion, turn after turn through one persistent cache.

Each turn feeds one frame plus a few text tokens and generates `--new-tokens` tokens (the official benchmark's
protocol). Per turn: time to first token, decode tokens/s, cache size in tokens and bytes, and the process's resident
memory. Each model runs in its own process, so memory figures do not mix. Two sets of models (`--models`):

- `random`: CASA vs Transformers' Qwen2.5-VL (token insertion) at equal size (`--size`), random weights;
- `smollm2`: the built-in CASA-SmolLM2 vs Transformers' Idefics3 (SmolVLM's architecture) on the same SmolLM2
  weights (random vision tower giving as many image tokens per frame as CASA-SmolLM2's) vs bare SmolLM2 fed the
  same text without the frames (the floor). Turns are SmolLM2 chat turns.

    python benchmarks/bench_streaming.py --size small --turns 256 --image-size 448 --out results/streaming
    python benchmarks/bench_streaming.py --models smollm2 --turns 256 --image-size 112 --threads 1 \
        --out results/streaming_smollm2
"""

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    InsertionStream,
    TextOnlyStream,
    idefics3_like,
    median,
    peak_rss_mib,
    rss_mib,
    smollm2_chat,
    synthetic_frame,
)

# model names of each set, and the ratios (numerator, denominator) its summary reports at the last turns
MODEL_SETS = {
    "random": ("casa", "casa_budget", "insertion"),  # casa_budget: CASA with a TextBudget (constant cache)
    "smollm2": ("casa_smollm2", "idefics3", "smollm2"),
}
RATIOS = {
    "random": (("casa", "insertion"), ("casa_budget", "insertion")),
    "smollm2": (("casa_smollm2", "idefics3"), ("casa_smollm2", "smollm2")),
}


def random_stream(name: str, args):
    """A stream of the `random` set: CASA (optionally with a text budget) or Qwen2.5-VL at `--size`."""
    from casa_hf.random_models import random_casa, random_processor, random_qwen2_5_vl, word_tokenizer
    from casa_hf.streaming import CasaStream, TextBudget

    tokenizer = word_tokenizer(args.vocab)
    processor = random_processor(tokenizer, image_size=args.image_size)
    torch.manual_seed(0)
    insertion = name == "insertion"
    model = (random_qwen2_5_vl if insertion else random_casa)(args.size, tokenizer)
    budget = TextBudget(sink_tokens=4, window_tokens=args.budget) if name == "casa_budget" else None
    return (InsertionStream if insertion else CasaStream)(
        model,
        processor,
        frame_text="w1 w2 w3 w4",
        max_new_tokens=args.new_tokens,
        text_budget=budget,
        eos_token_id=-1,  # never stop early: every turn decodes the same number of tokens
    )


def smollm2_stream(name: str, args):
    """A stream of the `smollm2` set, every model on SmolLM2's weights (those of the built-in CASA-SmolLM2)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from casa_hf.builtin_models import resolve_model
    from casa_hf.streaming import CasaStream

    folder = resolve_model("casa-smollm2")
    casa = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    chat = smollm2_chat(args.new_tokens)
    if name == "casa_smollm2":
        return CasaStream(casa, processor, **chat)
    if name == "smollm2":
        # SmolLM2 (+ the 3 unused rows of CASA's image tokens), sharing CASA's weights; CASA's own layers go with
        # `casa` on return
        return TextOnlyStream(casa.backbone_llm(), processor, **chat)
    model, idefics3_processor = idefics3_like(casa, processor.tokenizer, processor.image_size)
    del casa
    gc.collect()  # only the Idefics3 model stays in this process's memory
    return InsertionStream(model, idefics3_processor, **chat)


def worker(args) -> None:
    """Run one model's stream and print one JSON line per turn."""
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    stream = (smollm2_stream if args.models == "smollm2" else random_stream)(args.worker, args)
    stream.model.to(device=device, dtype=dtype)
    if device == "cuda" and args.flash:
        stream.model.set_attn_implementation("flash_attention_2")
    for turn in range(args.turns):
        frame = synthetic_frame(turn, args.image_size)
        cpu_start = time.process_time()
        step = stream.feed(frame)
        print(
            json.dumps(
                dict(
                    turn=turn,
                    ttft_ms=step.time_to_first_token_s * 1000,
                    decode_tokens_per_s=step.decode_tokens_per_s,
                    # CPU time of the whole turn: unlike wall-clock times, not inflated while other jobs hold the core
                    turn_cpu_ms=(time.process_time() - cpu_start) * 1000,
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


METRICS = ("ttft_ms", "decode_tokens_per_s", "turn_cpu_ms", "cache_tokens", "cache_mib", "rss_mib")


def selected_turns(turns: int, window: int) -> list[int]:
    """Turns (1-based) the table shows: the first window after the warm-up turn, the quarters, the last turn."""
    ends = {window + 1, turns // 4, turns // 2, 3 * turns // 4, turns}
    return sorted(end for end in ends if window < end <= turns)


def summarize(results: dict[str, list[dict]], window: int, ratios) -> dict:
    """Medians over the first turns (after one warm-up), the last turns and the `window` turns up to each selected
    turn, and the `ratios` (numerator, denominator) of models at the selected and the last turns."""
    summary = {}
    for name, rows in results.items():
        first = {m: median([r[m] for r in rows[1 : 1 + window]]) for m in METRICS}
        last = {m: median([r[m] for r in rows[-window:]]) for m in METRICS}
        at_turns = {
            str(end): {m: median([r[m] for r in rows[end - window : end]]) for m in METRICS}
            for end in selected_turns(len(rows), window)
        }
        summary[name] = dict(
            first=first, last=last, last_over_first={m: last[m] / first[m] for m in METRICS}, at_turns=at_turns
        )
    for numerator, denominator in ratios:
        top, bottom = summary[numerator], summary[denominator]
        summary[f"{numerator}_over_{denominator}_at_last"] = {m: top["last"][m] / bottom["last"][m] for m in METRICS}
        summary[f"{numerator}_over_{denominator}_at_turns"] = {
            end: {m: top["at_turns"][end][m] / bottom["at_turns"][end][m] for m in METRICS} for end in top["at_turns"]
        }
    return summary


def print_table(summary: dict, models: tuple[str, ...], ratios, turns: int, window: int) -> None:
    print(f"\nStreaming, {turns} turns (medians of the {window} turns up to each turn shown)")
    header = f"{'turn':>5} {'model':<24}" + "".join(f" {metric:>{len(metric)}}" for metric in METRICS)
    print(header + "\n" + "-" * len(header))
    for end in summary[models[0]]["at_turns"]:
        for name in models:
            values = summary[name]["at_turns"][end]
            print(f"{end:>5} {name:<24}" + "".join(f" {values[m]:>{len(m)}.2f}" for m in METRICS))
        for numerator, denominator in ratios:
            values = summary[f"{numerator}_over_{denominator}_at_turns"][end]
            label = f"{numerator} / {denominator}"
            print(f"{'':>5} {label:<24}" + "".join(f" {values[m]:>{len(m)}.3f}" for m in METRICS))


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("ttft_ms", "time to first token (ms)"),
        ("decode_tokens_per_s", "decode tokens / s"),
        ("turn_cpu_ms", "CPU time of the turn (ms)"),
        ("cache_tokens", "cache (tokens)"),
        ("cache_mib", "cache (MiB)"),
        ("rss_mib", "process memory (MiB)"),
    )
    figure, axes = plt.subplots(2, 3, figsize=(15, 7))
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
    parser.add_argument("--models", default="random", choices=tuple(MODEL_SETS), help="the set of models compared")
    parser.add_argument("--size", default="small", choices=("tiny", "small", "medium", "base"), help="random set")
    parser.add_argument("--turns", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=448, help="frame size (CASA-SmolLM2 resizes to 112)")
    parser.add_argument("--vocab", type=int, default=1024, help="random set's vocabulary")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    parser.add_argument("--window", type=int, default=8, help="turns in each median")
    parser.add_argument("--budget", type=int, default=512, help="text window of the casa_budget run (tokens)")
    parser.add_argument("--flash", action="store_true", help="flash_attention_2 on CUDA")
    parser.add_argument("--out", default="results/streaming", help="prefix of the .json and .png outputs")
    parser.add_argument(
        "--worker", choices=[name for names in MODEL_SETS.values() for name in names], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.turns <= args.window:
        parser.error(f"--turns ({args.turns}) must exceed --window ({args.window}): the first turn is a warm-up")
    if args.worker:
        worker(args)
        return
    started = time.time()
    models, ratios = MODEL_SETS[args.models], RATIOS[args.models]
    results = {name: run_model(name, args) for name in models}
    summary = summarize(results, args.window, ratios)
    print_table(summary, models, ratios, args.turns, args.window)
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
    title = {
        "random": f"CASA vs token insertion, {args.size} models",
        "smollm2": "CASA-SmolLM2 vs Idefics3 (token insertion) vs SmolLM2 (text only), SmolLM2-135M weights",
    }[args.models]
    plot(results, out.with_suffix(".png"), f"{title}, {args.image_size}px frames, {device}")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
