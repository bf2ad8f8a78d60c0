"""The built-in `casa-smollm2`: the shipped added weights joined with the installed SmolLM2 into a standard checkpoint
folder, built once into a cache named by what it is made of, with its Hub model card."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ..checkpoint_io import staged_output
from .model import CasaSmolLM2Recipe, build_casa_smollm2, load_added_weights, recipe_from_file

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"  # added.safetensors, recipe, accuracy


def assembled_folder(weights: Path, cache_dir: str | Path | None = None) -> Path:
    """Where `assemble_casa_smollm2` builds `weights`: named by what the model is made of, the recipe read with the
    defaults of fields its file lacks included (a new default makes a new model), the weights and the accuracy
    that the model card shows."""
    digest = hashlib.sha256(json.dumps(asdict(recipe_from_file(weights / "recipe.json"))).encode())
    for part in (weights / "added.safetensors", weights / "accuracy.json"):
        digest.update(part.read_bytes() if part.is_file() else b"")
    cache_dir = Path(cache_dir or os.environ.get("CASA_HF_CACHE", Path.home() / ".cache" / "casa_hf"))
    return cache_dir / f"casa-smollm2-{digest.hexdigest()[:16]}"


def assemble_casa_smollm2(weights: str | Path = SHIPPED_WEIGHTS, cache_dir: str | Path | None = None) -> Path:
    """A standard CASA checkpoint folder: the installed SmolLM2 + the trained added weights of `weights` (a folder
    with `added.safetensors` and `recipe.json`). Built once (about 20 s) into the cache, then reused."""
    weights = Path(weights)
    folder = assembled_folder(weights, cache_dir)
    if (folder / "config.json").is_file():
        return folder
    print(
        f"Assembling CASA-SmolLM2 once into {folder}: SmolLM2 from its GGUF file + the shipped CASA weights",
        file=sys.stderr,
        flush=True,
    )
    recipe = recipe_from_file(weights / "recipe.json")
    model, processor = build_casa_smollm2(recipe)
    load_added_weights(model, weights / "added.safetensors")
    with staged_output(folder, overwrite=True) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        accuracy = weights / "accuracy.json"
        scores = json.loads(accuracy.read_text()) if accuracy.is_file() else {}
        (staging / "README.md").write_text(model_card(recipe, scores))
    return folder


def model_card(recipe: CasaSmolLM2Recipe, accuracy: dict) -> str:
    """The Hub model card: what the model is, a runnable example, the measured held-out accuracy."""
    table = accuracy_table(accuracy) if accuracy else "(not measured)"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags: [casa, vision-language, cross-attention, smollm2]
---

# CASA-SmolLM2

SmolLM2-135M-Instruct made a vision-language model with CASA (Cross-Attention over Self-Attention, arXiv
2512.19535): a small vision tower trained from scratch, a projector and CASA sub-layers in blocks
{", ".join(map(str, recipe.casa_layers))} of SmolLM2 ({_placement_words(recipe)}; {recipe.image_size}-px
images). Images enter through the CASA sub-layers, never as tokens in SmolLM2's sequence.
{_sa_sentence(recipe)} It was trained only on synthetic images (coloured shapes, digits) asked about in English, in
the `casa_hf` package (`casa-hf train-smollm2`); it does not know natural photos.

## Usage

```python
import casa_hf  # registers the CASA classes with the Auto classes
from PIL import Image, ImageDraw
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="path/to/this/folder")
image = Image.new("RGB", (112, 112), (20, 20, 30))
ImageDraw.Draw(image).ellipse([15, 15, 50, 50], fill=(220, 40, 40))
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                         {{"type": "text", "text": "What colour is the shape?"}}]}}]
print(pipe(text=messages, max_new_tokens=12, return_full_text=False)[0]["generated_text"])
```

## Held-out accuracy

New images; questions in the training phrasings and in phrasings never seen in training (graded by the answer word
of the sentence).

{table}
"""


def _placement_words(recipe: CasaSmolLM2Recipe) -> str:
    parallel = recipe.placement == "parallel"
    block = "beside self-attention, the paper's parallel block" if parallel else "after self-attention"
    if recipe.window_images == "consecutive":
        return f"{block}; consecutive images share one window, as in the paper"
    return f"{block}; each image opens its own window"


def _sa_sentence(recipe: CasaSmolLM2Recipe) -> str:
    if not recipe.sa_lora_rank:
        return "SmolLM2's weights are unchanged: on text the model is SmolLM2."
    blocks = f"{min(recipe.casa_layers) + 1}-29"
    return (
        f"SmolLM2's self-attention in blocks {blocks} carries a merged rank-{recipe.sa_lora_rank} LoRA, trained with "
        "the CASA sub-layers and distilled from SmolLM2 to leave its text predictions as they were; its other "
        "weights are SmolLM2's."
    )


def accuracy_table(accuracy: dict) -> str:
    """Markdown table of `accuracy.json` (one row per phrasing split, "-" where a split asks no question of a kind)
    and the command that measured it."""
    splits = {name: scores for name, scores in accuracy.items() if isinstance(scores, dict)}
    kinds = [k for k in next(iter(splits.values())) if k != "single_image"] + ["single_image"]
    lines = ["| phrasings | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    cells = {name: [f"{scores[k]:.2f}" if k in scores else "-" for k in kinds] for name, scores in splits.items()}
    lines += [f"| {name} | " + " | ".join(row) + " |" for name, row in cells.items()]
    return "\n".join(lines) + f"\n\nMeasured with `{accuracy.get('command', '')}`."
