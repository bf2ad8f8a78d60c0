"""Text ability kept: perplexity of CASA-SmolLM2 and of SmolLM2 alone on English prose neither was trained on by us.

The prose is the module docstrings of a fixed list of Python standard-library modules (offline, reproducible). Two
settings, each a ratio of perplexities on the same SmolLM2 tokens:
- prose alone, no image: how much the trained CASA sub-layers change SmolLM2's text (none when the model skips
  windows without an image, `casa_text_only_windows="skip"`);
- prose after an image (a drawn scene before each document; SmolLM2 reads the prose alone): the prose is then in the
  image's CASA window, where the CASA sub-layers attend over the image and the prose.

    python benchmarks/smollm2_text_perplexity.py --out results/smollm2_text_perplexity
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoProcessor

from casa_hf.builtin_models import resolve_model
from casa_hf.smollm2.gguf_llm import load_gguf_llm, smollm2_gguf

SMOLLM2_VOCAB = 49152
MODULES = ("argparse", "json", "logging", "unittest", "doctest", "pickle", "csv", "heapq", "bisect", "textwrap")


def prose() -> list[str]:
    return [importlib.import_module(name).__doc__.strip() for name in MODULES]


@torch.no_grad()
def perplexity(model, chunks: list[torch.Tensor], image_prefix: dict | None = None) -> float:
    """Perplexity on the tokens of `chunks`; with `image_prefix` (`input_ids` `[1, P]` and the image inputs), each
    chunk follows the prefix and only its own tokens (after the first) are scored."""
    total, count = 0.0, 0
    for ids in chunks:
        inputs = {"input_ids": ids[None]}
        if image_prefix is not None:
            inputs = {**image_prefix, "input_ids": torch.cat([image_prefix["input_ids"], ids[None]], dim=1)}
        logits = model(**inputs).logits[0, -len(ids) : -1, :SMOLLM2_VOCAB]  # CASA-SmolLM2 adds 3 rows after it
        total += torch.nn.functional.cross_entropy(logits.float(), ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(total / count)


def image_prefix(processor) -> dict:
    """An image (a red circle, as the model card's example draws) followed by a line break, as model inputs."""
    image = Image.new("RGB", (processor.image_size,) * 2, (20, 20, 30))
    ImageDraw.Draw(image).ellipse([15, 15, 55, 55], fill=(220, 40, 40))
    inputs = processor(text=f"{processor.image_token}\n", images=[image], return_tensors="pt")
    return {name: inputs[name] for name in ("input_ids", "pixel_values", "image_grid_thw")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="casa-smollm2")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per document")
    parser.add_argument("--out", default="results/smollm2_text_perplexity")
    args = parser.parse_args()
    llm, tokenizer = load_gguf_llm(smollm2_gguf())
    chunks = [tokenizer(text, return_tensors="pt")["input_ids"][0, : args.max_tokens] for text in prose()]
    folder = resolve_model(args.model)
    casa = AutoModel.from_pretrained(folder).eval()
    prefix = image_prefix(AutoProcessor.from_pretrained(folder))
    smollm2 = perplexity(llm, chunks)
    rows = {"prose alone": perplexity(casa, chunks), "prose after an image": perplexity(casa, chunks, prefix)}
    ratios = {setting: value / smollm2 for setting, value in rows.items()}
    tokens = sum(len(c) for c in chunks)
    print(f"{tokens} tokens, {len(chunks)} documents; SmolLM2-135M-Instruct perplexity {smollm2:.3f}\n")
    print(f"| setting | {args.model} perplexity | / SmolLM2 |\n|---|---|---|")
    for setting, value in rows.items():
        print(f"| {setting} | {value:.3f} | x{ratios[setting]:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"modules": MODULES, "tokens": tokens, "smollm2": smollm2, "perplexity": rows, "ratio": ratios}
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
