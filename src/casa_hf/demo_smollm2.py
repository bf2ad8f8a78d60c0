"""`casa-hf demo` with a real LLM (CASA-SmolLM2): images drawn in code, questions in plain English, sentence answers,
and a text-only follow-up answered by SmolLM2's own (frozen) language ability."""

from __future__ import annotations

import numpy as np

from .demo import answer_chat, demo_images, stream_colours, user_turn
from .training.natural_vqa import HELD_OUT_PHRASINGS, PHRASINGS, grade

FOLLOW_UP = "Thanks! A different question now: what is the capital of France?"


def run_natural_demo(model, processor, images: int, frames: int, seed: int, save_images: str | None) -> None:
    size = processor.image_size or 112
    rng = np.random.default_rng([seed, 424242])
    print(f"CASA-SmolLM2: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {size}px images\n")
    correct = asked = 0
    follow_up: list[dict] | None = None

    def ask(image, kind: str, truth: str) -> None:
        nonlocal correct, asked, follow_up
        index = int(rng.integers(len(PHRASINGS[kind])))
        question = PHRASINGS[kind][index]
        held_out = index >= len(PHRASINGS[kind]) - HELD_OUT_PHRASINGS
        answer = answer_chat(model, processor, [user_turn(image, question)], max_new_tokens=12)
        ok = grade(kind, answer, truth)
        correct, asked = correct + ok, asked + 1
        note = " (phrasing never seen in training)" if held_out else ""
        print(f"  Q: {question}{note}\n  A: {answer}  [{'ok' if ok else 'expected ' + truth}]")
        if follow_up is None:
            follow_up = [user_turn(image, question), {"role": "assistant", "content": answer}]

    for image, truths in demo_images(rng, size, images, save_images):
        for kind, truth in truths.items():
            ask(image, kind, truth)
    print(f"\n{correct}/{asked} answers right on freshly generated images")

    if follow_up:
        print(f"\nA text-only follow-up in the first image's chat:\n  Q: {FOLLOW_UP}")
        answer = answer_chat(model, processor, [*follow_up, {"role": "user", "content": FOLLOW_UP}], 32)
        print(f"  A: {answer}")

    if frames:
        stream_colours(model, processor, rng, frames, PHRASINGS["colour"][0], max_new_tokens=8)
