"""`casa-hf demo`: a CASA model shipped with the package answers questions about images it has never seen.

Everything runs offline: images are drawn in code, the model and processor load through the Auto classes. Here are
the pieces both demos share and the one-word demo of the tiny model; CASA-SmolLM2's English one is `smollm2.demo`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .builtin_models import DEFAULT_MODEL, resolve_model

DEMO_QUESTIONS = ("colour", "shape", "count", "horizontal", "vertical")


def load_demo_model(path: str | Path | None = None):
    """A built-in model name or a folder (default: the default built-in) and its processor, via the Auto classes."""
    from transformers import AutoModel, AutoProcessor

    import casa_hf  # noqa: F401  (registers CASA with the Auto classes)

    path = resolve_model(path)
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(path)


def user_turn(image, question: str) -> dict:
    """A user message holding one image and a question."""
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}


def answer_chats(model, processor, chats: list[list[dict]], max_new_tokens: int) -> list[str]:
    """The model's greedy answers to several chats, generated as one left-padded batch, decoded without special
    tokens."""
    inputs = processor.apply_chat_template(
        chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def start_demo(model_path: str | None, seed: int | None):
    """A demo's model and processor (`load_demo_model`) and the seed of its images: `seed`, or one from the clock,
    printed so that a run can be repeated."""
    print(f"Loading {model_path or DEFAULT_MODEL} ...", flush=True)
    model, processor = load_demo_model(model_path)
    if seed is None:
        seed = int(time.time()) % 100_000
    print(f"Images drawn in code with seed {seed} (`--seed {seed}` draws the same ones again)", flush=True)
    return model, processor, seed


def run_word_demo(model, processor, images: int, frames: int, seed: int, save_images: str | None) -> None:
    """The synthetic questions, answered in one word (the tiny model's): draw `images` scenes (then a digit) and ask
    about them, then stream `frames` frames."""
    from .training.synthetic_vqa import QUESTIONS, SYSTEM_TEXT

    size = processor.image_size or 112
    rng = np.random.default_rng([seed, 424242])
    print(
        f"CASA demo model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{size}px images, offline\n"
    )
    correct = asked = 0
    system = {"role": "system", "content": SYSTEM_TEXT}
    for image, truths in demo_images(rng, size, images, save_images):
        chats = [[system, user_turn(image, QUESTIONS[kind])] for kind in truths]
        for (kind, truth), answer in zip(truths.items(), answer_chats(model, processor, chats, 3), strict=True):
            ok = answer.split(" ")[0].rstrip(".") == truth
            correct, asked = correct + ok, asked + 1
            print(f"  Q: {QUESTIONS[kind]:<42} A: {answer:<10} {'ok' if ok else 'expected ' + truth}", flush=True)
    print(f"\n{correct}/{asked} answers right on freshly generated images")

    if frames:
        stream_colours(model, processor, rng, frames, QUESTIONS["colour"], system=SYSTEM_TEXT, max_new_tokens=3)


def demo_images(rng, size: int, images: int, save_images: str | None) -> Iterator[tuple[Image.Image, dict]]:
    """The demo's images, described as they come: `images` scenes of one to three shapes, then a digit; each with
    the answers to the questions it is asked (positions only of single shapes: "the shape" is ambiguous among
    several). With `save_images`, each is also written there."""
    from .training.synthetic_vqa import DIGITS, random_scene, render, render_digit

    for index in range(images + 1):
        if index < images:
            scene = random_scene(rng, count=int(rng.integers(1, 4)))
            image, truth, described = render(scene, size, rng), scene.answers(), scene.describe()
            kinds = [kind for kind in DEMO_QUESTIONS if scene.count == 1 or kind not in ("horizontal", "vertical")]
            truths = {kind: truth[kind] for kind in kinds}
        else:
            digit = str(rng.choice(DIGITS))
            image, described, truths = render_digit(digit, size, rng), f"the digit {digit}", {"digit": digit}
        print(f"image {index + 1}: {described}", flush=True)
        if save_images:
            Path(save_images).mkdir(parents=True, exist_ok=True)
            image.save(Path(save_images) / f"image_{index + 1}.png")
        yield image, truths


def stream_colours(
    model, processor, rng, frames: int, question: str, system: str | None = None, max_new_tokens: int = 3
) -> None:
    """Feed `frames` one-shape frames through one `CasaStream` (turns from the chat template, after the `system`
    message), asking `question` (the colour) after each."""
    from .streaming import CasaStream
    from .training.synthetic_vqa import random_scene, render

    print(f"\nStreaming {frames} frames through one cache, asking {question!r} after each:")
    stream = CasaStream(model, processor, system=system, prompt=question, max_new_tokens=max_new_tokens)
    size = processor.image_size or 112
    for step_index in range(frames):
        scene = random_scene(rng, count=1)
        step = stream.feed(render(scene, size, rng))
        print(
            f"  frame {step_index:>2}: {scene.colour:<7} -> {step.text.strip():<22} cache {step.cache_tokens:>4} "
            f"text tokens, {step.cache_bytes / 1024:>6.1f} KiB; one image in the CASA state",
            flush=True,
        )
