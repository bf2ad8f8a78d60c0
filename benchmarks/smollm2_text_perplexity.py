"""Text ability kept: perplexity of CASA-SmolLM2 and of SmolLM2 alone on English prose neither was trained on by us.

The prose is the module docstrings of a fixed list of Python standard-library modules (offline, reproducible). Both
models see the same SmolLM2 tokens, no image; the ratio of perplexities says how much the trained CASA sub-layers
(which also attend over text before any image) changed SmolLM2's text predictions.

    python benchmarks/smollm2_text_perplexity.py --out results/smollm2_text_perplexity
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path

import torch
from transformers import AutoModel

from casa_hf.builtin_models import resolve_model
from casa_hf.gguf_llm import load_gguf_llm, smollm2_gguf

SMOLLM2_VOCAB = 49152
MODULES = ("argparse", "json", "logging", "unittest", "doctest", "pickle", "csv", "heapq", "bisect", "textwrap")


def prose() -> list[str]:
    return [importlib.import_module(name).__doc__.strip() for name in MODULES]


@torch.no_grad()
def perplexity(model, chunks: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids in chunks:
        logits = model(input_ids=ids[None]).logits[0, :-1, :SMOLLM2_VOCAB]  # CASA-SmolLM2 adds 3 rows after it
        total += torch.nn.functional.cross_entropy(logits.float(), ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="casa-smollm2")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per document")
    parser.add_argument("--out", default="results/smollm2_text_perplexity")
    args = parser.parse_args()
    llm, tokenizer = load_gguf_llm(smollm2_gguf())
    chunks = [tokenizer(text, return_tensors="pt")["input_ids"][0, : args.max_tokens] for text in prose()]
    casa = AutoModel.from_pretrained(resolve_model(args.model)).eval()
    rows = {"SmolLM2-135M-Instruct": perplexity(llm, chunks), args.model: perplexity(casa, chunks)}
    ratio = rows[args.model] / rows["SmolLM2-135M-Instruct"]
    tokens = sum(len(c) for c in chunks)
    print(f"| model | perplexity ({tokens} tokens, {len(chunks)} documents) |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.3f} |")
    print(f"\n{args.model} / SmolLM2: x{ratio:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"modules": MODULES, "tokens": tokens, "perplexity": rows, "ratio": ratio}
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
