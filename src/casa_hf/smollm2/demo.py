"""`casa-hf demo` with a real LLM (CASA-SmolLM2): images drawn in code, questions in plain English, sentence answers,
two-frame "what changed" questions, and a text-only follow-up answered by SmolLM2's own language ability."""

from __future__ import annotations

import numpy as np

from ..demo import answer_chats, demo_images, stream_colours, user_turn
from ..training.synthetic_vqa import changed_scenes, render
from .natural_vqa import FIRST_FRAME_TEXTS, HELD_OUT_PHRASINGS, PHRASINGS, grade

FOLLOW_UP = "Thanks! A different question now: what is the capital of France?"
CHANGE_QUESTIONS = 3


def run_natural_demo(model, processor, images: int, frames: int, seed: int, save_images: str | None) -> None:
    """The English questions of CASA-SmolLM2's training (`natural_vqa`), answered in sentences: draw `images` scenes
    (then a digit) and ask about them, ask what changed between two frames, a text-only follow-up, then stream
    `frames` frames."""
    size = processor.image_size or 112
    rng = np.random.default_rng([seed, 424242])
    print(f"CASA-SmolLM2: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {size}px images\n")
    correct = asked = 0
    follow_up: list[dict] | None = None
    for image, truths in demo_images(rng, size, images, save_images):
        # one phrasing per question kind, all of an image's questions answered as one batch
        picks = {kind: int(rng.integers(len(PHRASINGS[kind]))) for kind in truths}
        chats = [[user_turn(image, PHRASINGS[kind][index])] for kind, index in picks.items()]
        answers = answer_chats(model, processor, chats, 12)
        for (kind, index), chat, answer in zip(picks.items(), chats, answers, strict=True):
            ok = grade(kind, answer, truths[kind])
            correct, asked = correct + ok, asked + 1
            held_out = index >= len(PHRASINGS[kind]) - HELD_OUT_PHRASINGS
            note = " (phrasing never seen in training)" if held_out else ""
            verdict = "ok" if ok else f"expected {truths[kind]}"
            print(f"  Q: {PHRASINGS[kind][index]}{note}\n  A: {answer}  [{verdict}]")
            follow_up = follow_up or [*chat, {"role": "assistant", "content": answer}]
    print(f"\n{correct}/{asked} answers right on freshly generated images", flush=True)
    ask_what_changed(model, processor, rng, size)

    if follow_up:
        print(f"\nA text-only follow-up in the first image's chat:\n  Q: {FOLLOW_UP}")
        [answer] = answer_chats(model, processor, [[*follow_up, {"role": "user", "content": FOLLOW_UP}]], 32)
        print(f"  A: {answer}", flush=True)

    if frames:
        stream_colours(model, processor, rng, frames, PHRASINGS["colour"][0], max_new_tokens=8)


def ask_what_changed(model, processor, rng: np.random.Generator, size: int) -> None:
    """Two frames in one message, then the question: CASA windows never cross an image, so the first frame reaches
    the question only through the text written after it. What each frame shows is printed, to check the answers."""
    print("\nTwo frames, then a question about both:")
    pairs, chats = [], []
    for _ in range(CHANGE_QUESTIONS):
        first, second, change = changed_scenes(rng)
        text, question = str(rng.choice(FIRST_FRAME_TEXTS)), str(rng.choice(PHRASINGS["change"]))
        content = [
            {"type": "image", "image": render(first, size, rng)},
            {"type": "text", "text": text},
            {"type": "image", "image": render(second, size, rng)},
            {"type": "text", "text": question},
        ]
        pairs.append((first, second, change, text, question))
        chats.append([{"role": "user", "content": content}])
    correct = 0
    for (first, second, change, text, question), answer in zip(
        pairs, answer_chats(model, processor, chats, 12), strict=True
    ):
        ok = grade("change", answer, change)
        correct += ok
        print(f"  [frame 1: {first.describe()}] {text} [frame 2: {second.describe()}] {question}")
        print(f"  A: {answer}  [{'ok' if ok else f'expected: the {change} changed'}]")
    print(f"{correct}/{CHANGE_QUESTIONS} two-frame answers right", flush=True)
