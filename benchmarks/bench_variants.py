"""The paper's efficiency table (Table 1) at small scale: CA, CA-shared, CASA, CA-replace and token insertion on
SmolLM2-135M, side by side in one run.

Every variant is SmolLM2-135M-Instruct (its real weights, from the built-in CASA-SmolLM2's folder; `--layers` keeps
its first blocks only) with CASA-SmolLM2's vision tower; the CASA sub-layers are new (random). Token insertion is
Transformers' Idefics3 on the same SmolLM2 weights, its vision tower (random) the size of CASA-SmolLM2's and giving
as many image tokens per image. Columns, as the paper's:

- training: text tokens per second and peak memory, forward + backward + AdamW step of every parameter (the paper's
  Helium setup trains the backbone with the new layers) on one packed row of `--samples` image-QA conversations
  (`NaturalVQA`), the loss on answer tokens; every variant trains on the same conversations, and the text tokens
  counted are theirs (insertion's image tokens are not text);
- streaming: frames per second with `--new-tokens` generated per frame (SmolLM2 chat turns, one frame each, through
  one persistent cache: `CasaStream`, insertion through the streaming benchmark's `InsertionStream`), the peak
  memory over `--frames` frames, and the K/V entries held after them: per layer, the self-attention cache plus the
  CASA window's used slots (insertion: its cache length).

Each variant runs in its own process, and that process's peak resident memory starts anew (`reset_peak_rss`) after
the model is built and again between its streaming and its training, so no figure holds another's. Throughputs are
per second of the worker's CPU time (`--threads 1`: of one core), which other jobs on a shared machine do not
inflate; the JSON also has wall-clock figures. Prints the table with each variant's ratios to insertion next to the
paper's, and writes JSON and a PNG (ratios to insertion, ours vs the paper's).

    OMP_NUM_THREADS=1 nice python benchmarks/bench_variants.py --out results/variants
    python benchmarks/bench_variants.py --quick --out /tmp/variants   # a smoke test: 2 blocks, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    InsertionStream,
    idefics3_like,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    smollm2_chat,
    synthetic_frame,
)

# the rows: CASA configuration of each variant (insertion is Idefics3); `replace_every`: CASA replaces self-attention
# in every n-th block (`casa_hf.every_nth_block`), the other variants have CASA beside it in every block
VARIANTS = {
    "ca": dict(casa_attention="cross_attention", casa_placement="parallel", casa_shared=False),
    "ca_shared": dict(casa_attention="cross_attention", casa_placement="parallel", casa_shared=True),
    "casa": dict(casa_attention="casa", casa_placement="parallel", casa_shared=False),
    "ca_replace": dict(casa_attention="cross_attention", casa_placement="replace", casa_shared=True, replace_every=2),
    "insertion": None,
}
LABELS = {
    "ca": "CA",
    "ca_shared": "CA-shared (D1)",
    "casa": "CASA (D2)",
    "ca_replace": "CA-replace (D3, n=2)",
    "insertion": "insertion",
}
# Table 1 of the paper (Helium1-2B, one H100): training text tokens/s and GB, streaming frames/s and GB, KV entries
PAPER = {
    "ca": dict(train_tokens_per_s=1817, train_mem=32.9, stream_fps=6.8, stream_mem=6.1, kv="kT + N"),
    "ca_shared": dict(train_tokens_per_s=1845, train_mem=32.0, stream_fps=7.7, stream_mem=5.7, kv="kT + N"),
    "casa": dict(train_tokens_per_s=1560, train_mem=33.1, stream_fps=5.6, stream_mem=6.1, kv="kT + (T + N)"),
    "ca_replace": dict(train_tokens_per_s=1995, train_mem=29.0, stream_fps=7.6, stream_mem=5.7, kv="kT or N"),
    "insertion": dict(train_tokens_per_s=1501, train_mem=62.8, stream_fps=1.2, stream_mem=29.5, kv="kT + kN"),
}
METRICS = {  # our measurement of each paper column: (key in a worker's result, table header)
    "train_tokens_per_s": ("train_text_tokens_per_s", "train tok/s"),
    "train_mem": ("train_peak_rss_mib", "train MiB"),
    "stream_fps": ("stream_frames_per_s", "stream fps"),
    "stream_mem": ("stream_peak_rss_mib", "stream MiB"),
    "kv": ("kv_entries_per_layer", "KV / layer"),
}
QUICK = dict(layers=2, image_size=56, samples=2, steps=1, frames=3, new_tokens=2)


def smollm2_variant(variant: dict, args):
    """A CASA variant of SmolLM2 (its first `--layers` blocks): SmolLM2's and CASA-SmolLM2's vision tower's weights
    from the built-in CASA-SmolLM2, new CASA sub-layers, CASA-SmolLM2's other settings (image centring, raster image
    positions, no CASA update before the first image) but the paper's windows (a run of images shares one); and its
    processor for `--image-size` images, putting a turn's images before its text."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import casa_hf
    from casa_hf.builtin_models import resolve_model
    from casa_hf.smollm2.model import build_processor

    folder = resolve_model("casa-smollm2")
    source = AutoModelForImageTextToText.from_pretrained(folder)
    processor = build_processor(AutoProcessor.from_pretrained(folder).tokenizer, args.image_size, group_images=True)
    fields = source.config.to_dict()
    text = {**fields["text_config"], "num_hidden_layers": args.layers}
    text.pop("layer_types", None)  # one per block: rebuilt for the blocks kept
    every = variant.get("replace_every")
    config = casa_hf.CasaConfig.from_dict(
        {
            **fields,
            **{name: value for name, value in variant.items() if name != "replace_every"},
            "text_config": text,
            "vision_config": {**fields["vision_config"], "window_size": args.image_size},
            "casa_layers": casa_hf.every_nth_block(args.layers, every) if every else None,  # None: every block
            "casa_cross_attention_rope": False,  # the paper's cross-attention (A.2); CASA always rotates
            "casa_window_images": "consecutive",
        }
    )
    torch.manual_seed(0)
    model = casa_hf.CasaForConditionalGeneration(config)
    weights = {name: tensor for name, tensor in source.state_dict().items() if ".casa_" not in name}
    missing, _ = model.load_state_dict(weights, strict=False)  # the blocks past --layers are unexpected
    if any(".casa_" not in name for name in missing):
        raise RuntimeError(f"SmolLM2's weights do not fit the {variant} model: missing {missing}")
    model.tie_weights()
    model.generation_config = source.generation_config  # suppresses the image token, as CASA-SmolLM2's
    return model.eval(), processor


def image_qa(args) -> list[dict]:
    """The conversations of a training step: single- and two-image questions answered in sentences."""
    from casa_hf.smollm2.natural_vqa import NaturalVQA

    dataset = NaturalVQA(args.samples, image_size=args.image_size)
    return [dataset[i] for i in range(args.samples)]


def images_of(messages: list[dict]) -> list:
    return [
        part["image"]
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "image"
    ]


def insertion_batch(examples: list[dict], collator, processor) -> dict:
    """The packed row `collator` (CASA's, `pack=True`) makes of `examples`, for Idefics3: each image placeholder
    replaced by Idefics3's image tokens (out of the loss), its pixels from Idefics3's image processor."""
    image_token = collator.processor.image_token_id
    ids, labels, positions, pixels = [], [], [], []
    for example in examples:
        conversation, images = collator.encode(example["messages"]), images_of(example["messages"])
        # <fake_token_around_image><global-img><image> x N<fake_token_around_image>
        expansion = processor(images=images[:1], text="<image>", add_special_tokens=False)["input_ids"][0]
        start = len(ids)
        for token, label in zip(conversation.input_ids, conversation.labels, strict=True):
            piece = expansion if token == image_token else [token]
            ids += piece
            labels += [label] * len(piece) if token != image_token else [-100] * len(piece)
        positions += range(len(ids) - start)
        pixels += [processor.image_processor(images=[image], return_tensors="pt")["pixel_values"] for image in images]
    return dict(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        position_ids=torch.tensor([positions]),
        labels=torch.tensor([labels]),
        pixel_values=torch.cat(pixels, dim=1),  # [1 row, images, 3, height, width]
    )


def kv_entries(cache) -> int:
    """K/V positions a cache holds over all layers: each layer's self-attention K/V and, in a CASA block, the used
    slots of its window (image tokens, and for CASA the text since the image)."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            total += layer.keys.shape[-2]
        window = getattr(layer, "window", None)
        if window is not None and window.is_initialized:
            total += int(window.lengths().max())
    return total


def measure_streaming(model, processor, stream_class, args) -> dict:
    """`--frames` frames, `--new-tokens` generated after each; the first frame is a warm-up, left out of the rates."""
    reset_peak_rss()
    start = rss_mib()
    stream = stream_class(model, processor, **smollm2_chat(args.new_tokens))
    wall, cpu = [], []
    for index in range(args.frames):
        frame = synthetic_frame(index, args.image_size)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        stream.feed(frame)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    layers = model.config.get_text_config().num_hidden_layers
    result = dict(
        stream_frames_per_s=(args.frames - 1) / sum(cpu[1:]),
        stream_frames_per_wall_s=(args.frames - 1) / sum(wall[1:]),
        stream_peak_rss_mib=peak_rss_mib(),
        stream_peak_above_start_mib=peak_rss_mib() - start,  # what streaming added to the loaded model
        stream_rss_mib=rss_mib(),
        kv_entries=kv_entries(stream.cache),
        kv_entries_per_layer=kv_entries(stream.cache) / layers,
        cache_tokens=stream.cache.get_seq_length(),
    )
    del stream
    return result


def measure_training(model, batch: dict, text_tokens: int, args) -> dict:
    """`--steps` steps (after one warm-up, which also allocates AdamW's state) of every parameter."""
    from casa_hf.smollm2.train import AnswerOnlyLossTrainer

    reset_peak_rss()
    start = rss_mib()
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    trainer = SimpleNamespace(prefix=None)  # the loss on answer tokens only, through the LM head of those alone
    wall, cpu = [], []
    for _ in range(args.steps + 1):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        loss = AnswerOnlyLossTrainer.compute_loss(trainer, model, dict(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return dict(
        train_text_tokens_per_s=text_tokens / statistics.median(cpu[1:]),
        train_text_tokens_per_wall_s=text_tokens / statistics.median(wall[1:]),
        train_peak_rss_mib=peak_rss_mib(),
        train_peak_above_start_mib=peak_rss_mib() - start,  # gradients, AdamW's state, activations
        train_tokens_per_step=int(batch["attention_mask"].sum()),
        loss=float(loss.detach()),
    )


def worker(name: str, args) -> dict:
    """One variant's streaming, then its training (each from a fresh peak memory)."""
    from casa_hf.streaming import CasaStream
    from casa_hf.training.collator import CasaDataCollator

    torch.set_num_threads(args.threads)
    model, processor = smollm2_variant(VARIANTS[name] or VARIANTS["ca"], args)
    examples = image_qa(args)
    collator = CasaDataCollator(processor, pack=True, max_length=10**6)  # one packed row
    batch = dict(collator(examples))
    image_token = processor.image_token_id
    text_tokens = int(batch["attention_mask"].sum() - (batch["input_ids"] == image_token).sum())
    answer_tokens = int((batch["labels"] != -100).sum())
    stream_class = CasaStream
    if name == "insertion":
        model, processor = idefics3_like(model, processor.tokenizer, args.image_size)
        batch, stream_class = insertion_batch(examples, collator, processor), InsertionStream
    parameters = sum(p.numel() for p in model.parameters())
    loaded = rss_mib()
    streaming = measure_streaming(model, processor, stream_class, args)
    training = measure_training(model, batch, text_tokens, args)
    return dict(
        parameters=parameters,
        loaded_rss_mib=loaded,
        text_tokens_per_step=text_tokens,
        answer_tokens_per_step=answer_tokens,
        **streaming,
        **training,
    )


def run_worker(name: str) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"the {name} worker failed (exit status {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each variant's measurements over insertion's, by paper column."""
    base = results["insertion"]
    return {
        name: {column: row[key] / base[key] for column, (key, _) in METRICS.items()} for name, row in results.items()
    }


def paper_ratios() -> dict[str, dict[str, float]]:
    base = PAPER["insertion"]
    return {
        name: {column: value / base[column] for column, value in row.items() if column != "kv"}
        for name, row in PAPER.items()
    }


def table(results: dict[str, dict]) -> str:
    """Markdown: our measurements, then each one's ratio to insertion (ours / the paper's)."""
    ours, paper = ratios(results), paper_ratios()
    headers = [header for _, header in METRICS.values()]
    lines = [
        "| variant | " + " | ".join(headers) + " | " + " | ".join(f"{h} / ins. (paper)" for h in headers) + " |",
        "|---" * (1 + 2 * len(headers)) + "|",
    ]
    for name, row in results.items():
        values = [f"{row[key]:.1f}" for key, _ in METRICS.values()]
        compared = [
            f"{ours[name][column]:.2f} ({paper[name][column]:.2f})"
            if column in paper[name]
            else f"{ours[name][column]:.3f} ({PAPER[name][column]})"
            for column in METRICS
        ]
        lines.append(f"| {LABELS[name]} | " + " | ".join(values + compared) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ours, paper = ratios(results), paper_ratios()
    names = [name for name in results if name != "insertion"]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4.2))
    x = np.arange(len(names))
    for axis, (column, (_, header)) in zip(axes, METRICS.items(), strict=True):
        axis.bar(x - 0.2, [ours[name][column] for name in names], 0.4, label="ours (SmolLM2-135M, CPU)")
        if column != "kv":
            axis.bar(x + 0.2, [paper[name][column] for name in names], 0.4, label="paper (Helium1-2B, H100)")
        axis.axhline(1, color="grey", linewidth=0.8)
        axis.set_xticks(x, [LABELS[name].replace(" (", "\n(") for name in names], fontsize=8)
        axis.set_title(f"{header} / insertion" + (" (paper: formulas only)" if column == "kv" else ""))
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(VARIANTS), help="comma-separated variants (insertion always runs)")
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2 blocks kept (30: all)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (224: 64 image tokens)")
    parser.add_argument("--samples", type=int, default=8, help="image-QA conversations packed in a training step")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--frames", type=int, default=64, help="streamed frames (the first is a warm-up)")
    parser.add_argument("--new-tokens", type=int, default=5, help="tokens generated per frame")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each worker")
    parser.add_argument("--quick", action="store_true", help=f"a smoke test at tiny sizes, in one process: {QUICK}")
    parser.add_argument("--out", default="results/variants", help="prefix of the .json and .png outputs")
    parser.add_argument("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return
    if args.frames < 2 or args.steps < 1:
        parser.error("--frames must be at least 2 and --steps at least 1 (the first frame and step are warm-ups)")
    names = [name for name in VARIANTS if name in args.rows.split(",") or name == "insertion"]
    from tqdm.auto import tqdm

    started = time.time()
    results = {}
    for name in tqdm(names, desc="variants", unit="variant"):
        # the smoke test runs every row in this process: its memory figures are not comparable, its seconds fewer
        results[name] = worker(name, args) if args.quick else run_worker(name)
    markdown = table(results)
    print(f"\n{markdown}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = f"CPU ({args.threads} thread{'s' if args.threads > 1 else ''} per worker)"
    payload = dict(
        args={k: v for k, v in vars(args).items() if k != "worker"},
        device=device,
        seconds=time.time() - started,
        rows=results,
        ratios_to_insertion=ratios(results),
        paper=PAPER,
        paper_ratios_to_insertion=paper_ratios(),
        table=markdown,
    )
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    title = f"Ratios to token insertion: SmolLM2-135M ({args.layers} blocks), {args.image_size}px images, {device}"
    plot(results, out.with_suffix(".png"), title)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
