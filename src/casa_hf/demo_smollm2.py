"""`casa-hf demo` with a real LLM (CASA-SmolLM2): images drawn in code, questions in plain English, sentence answers,
two-frame "what changed" questions, and a text-only follow-up answered by SmolLM2's own language ability."""

from __future__ import annotations

import numpy as np

from .demo import answer_chat, demo_images, stream_colours, user_turn
from .training.natural_vqa import HELD_OUT_PHRASINGS, PHRASINGS, grade
from .training.train_smollm2 import held_out_natural

FOLLOW_UP = "Thanks! A different question now: what is the capital of France?"
CHANGE_QUESTIONS = 3


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
    ask_what_changed(model, processor, seed, size)

    if follow_up:
        print(f"\nA text-only follow-up in the first image's chat:\n  Q: {FOLLOW_UP}")
        answer = answer_chat(model, processor, [*follow_up, {"role": "user", "content": FOLLOW_UP}], 32)
        print(f"  A: {answer}")

    if frames:
        stream_colours(model, processor, rng, frames, PHRASINGS["colour"][0], max_new_tokens=8)


def ask_what_changed(model, processor, seed: int, size: int) -> None:
    """Two frames in one message, then the question: CASA windows never cross an image, so the first frame reaches
    the question only through the text written after it."""
    print("\nTwo frames, then a question about both:")
    correct = 0
    for example in held_out_natural(CHANGE_QUESTIONS, size, "all", seed, kinds=("change",)):
        user, _ = example["messages"]
        answer = answer_chat(model, processor, [user], max_new_tokens=12)
        ok = grade("change", answer, example["answer"])
        correct += ok
        frames = iter(range(1, 3))
        parts = [part.get("text") or f"[frame {next(frames)}]" for part in user["content"]]
        print(f"  {' '.join(parts)}")
        print(f"  A: {answer}  [{'ok' if ok else 'expected: the ' + example['answer'] + ' changed'}]")
    print(f"{correct}/{CHANGE_QUESTIONS} two-frame answers right")
