"""A synthetic visual-question dataset drawn with PIL, deterministic by seed.

Single-image questions ask for the colour, shape, count, horizontal or vertical position of shapes, or the digit
written on the image. Two-frame questions ("what changed between the frames ?") exercise CASA's window semantics:
with one image per window (`CasaConfig.casa_window_images="each"`) and the turn rendered as written, the question
sees only the second frame, so what the first showed must flow through the text written after it; a processor with
`group_images` (the default of new ones) puts both frames before the text, and consecutive images share a window.
Every answer is one word followed by " .".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "purple": (150, 60, 190),
}
SHAPES = ("square", "circle", "triangle")
COUNTS = ("one", "two", "three")
DIGITS = tuple("0123456789")
CHANGES = ("colour", "shape", "position")
SINGLE_KINDS = ("colour", "shape", "count", "horizontal", "vertical", "digit")
MULTI_KINDS = ("change",)
# What `casa-hf train` draws: every kind, the slow learners (digits, shapes, counts) more often than the rest
TRAINING_MIX = SINGLE_KINDS + MULTI_KINDS + ("digit", "shape", "count", "digit")

QUESTIONS = {
    "colour": "what colour is the shape ?",
    "shape": "what shape is it ?",
    "count": "how many shapes are there ?",
    "horizontal": "is the shape on the left or the right ?",
    "vertical": "is the shape at the top or the bottom ?",
    "digit": "what digit is written ?",
    "change": "what changed between the frames ?",
}
FIRST_FRAME_TEXT = "first frame ."
SYSTEM_TEXT = "answer with one word ."


def vocabulary() -> list[str]:
    """Every word the dataset's texts use, in a fixed order (for a word-level tokenizer)."""
    words = []
    for text in [*QUESTIONS.values(), FIRST_FRAME_TEXT, SYSTEM_TEXT, "system user assistant"]:
        words += text.split()
    words += [*COLOURS, *SHAPES, *COUNTS, *DIGITS, *CHANGES, "left", "right", "top", "bottom"]
    return list(dict.fromkeys(words))


@dataclass
class Scene:
    colour: str
    shape: str
    count: int
    x: float  # centre of the first shape, 0..1
    y: float

    def answers(self) -> dict[str, str]:
        """The answer to each single-image question about this scene."""
        return {
            "colour": self.colour,
            "shape": self.shape,
            "count": COUNTS[self.count - 1],
            "horizontal": "left" if self.x < 0.5 else "right",
            "vertical": "top" if self.y < 0.5 else "bottom",
            "corner": f"{'top' if self.y < 0.5 else 'bottom'} {'left' if self.x < 0.5 else 'right'}",
        }

    def describe(self) -> str:
        """The scene in words, for a reader checking answers (where only for a single shape: "the shape" is
        ambiguous among several)."""
        answers = self.answers()
        if self.count == 1:
            return f"one {self.colour} {self.shape} at the {answers['vertical']}-{answers['horizontal']}"
        return f"{answers['count']} {self.colour} {self.shape}s"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, fill) -> None:
    cx, cy = centre
    if shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene.count` copies of a shape on a dark, slightly noisy background; the first at (x, y)."""
    background = rng.integers(0, 50, size=3)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    radius = size * (0.17 if scene.count == 1 else 0.13)  # large enough to stand out at 14-px patches
    centres = [(scene.x * size, scene.y * size)]
    for _ in range(10_000):  # further copies where they do not overlap
        if len(centres) == scene.count:
            break
        candidate = tuple(rng.uniform(radius + 2, size - radius - 2, size=2))
        if all(np.hypot(candidate[0] - c[0], candidate[1] - c[1]) > 2.3 * radius for c in centres):
            centres.append(candidate)
    else:
        raise RuntimeError(f"Could not place {scene.count} shapes on a {size}px image")
    for centre in centres:
        _draw_shape(draw, scene.shape, centre, radius, COLOURS[scene.colour])
    return image


def render_digit(digit: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(0, 50, size=3)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in background))
    font = ImageFont.load_default(size=int(size * 0.7))
    colour = COLOURS[str(rng.choice(list(COLOURS)))]
    x, y = rng.uniform(0.2, 0.4) * size, rng.uniform(-0.05, 0.1) * size
    # bold strokes: the default font's thin lines are a few pixels wide, lost inside 14-px patches
    stroke = max(1, size // 50)
    ImageDraw.Draw(image).text((x, y), digit, font=font, fill=colour, stroke_width=stroke, stroke_fill=colour)
    return image


def random_scene(rng: np.random.Generator, count: int | None = None) -> Scene:
    count = count or int(rng.integers(1, 4))
    margin = 0.2
    # keep the first shape clearly off the centre lines, so left/right and top/bottom are unambiguous
    x = rng.choice([rng.uniform(margin, 0.38), rng.uniform(0.62, 1 - margin)])
    y = rng.choice([rng.uniform(margin, 0.38), rng.uniform(0.62, 1 - margin)])
    return Scene(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), count, float(x), float(y))


def changed_scenes(rng: np.random.Generator) -> tuple[Scene, Scene, str]:
    """A one-shape scene, the same scene with one of `CHANGES` made (a new colour or shape, or the shape moved to
    the opposite corner), and the change."""
    first = random_scene(rng, count=1)
    change = str(rng.choice(CHANGES))
    second = Scene(**vars(first))
    if change == "colour":
        second.colour = str(rng.choice([c for c in COLOURS if c != first.colour]))
    elif change == "shape":
        second.shape = str(rng.choice([s for s in SHAPES if s != first.shape]))
    else:
        second.x, second.y = 1 - first.x, 1 - first.y
    return first, second, change


class SyntheticVQA:
    """`len(dataset)` examples; example i is always the same for a given seed.

    Example i asks a question of kind `kinds[i % len(kinds)]`: a kind listed twice is drawn twice as often.

    Each example is `{"messages": [...], "kind": str, "answer": str}` with chat messages ready for
    `CasaProcessor.apply_chat_template` (images as PIL objects inside the messages).
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        image_size: int = 112,
        kinds: tuple[str, ...] | None = None,
        system_prompt: bool = True,
    ):
        self.size = size
        self.seed = seed
        self.image_size = image_size
        self.kinds = kinds or SINGLE_KINDS + MULTI_KINDS
        unknown = set(self.kinds) - set(QUESTIONS)
        if unknown:
            raise ValueError(f"Unknown question kinds {sorted(unknown)}; known: {sorted(QUESTIONS)}")
        self.system_prompt = system_prompt

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        kind = self.kinds[index % len(self.kinds)]
        images, answer = self._make(kind, rng)
        content = [{"type": "image", "image": images[0]}]
        if len(images) == 2:
            content += [{"type": "text", "text": FIRST_FRAME_TEXT}, {"type": "image", "image": images[1]}]
        content.append({"type": "text", "text": QUESTIONS[kind]})
        messages = [{"role": "system", "content": SYSTEM_TEXT}] if self.system_prompt else []
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": f"{answer} ."}]
        return {"messages": messages, "kind": kind, "answer": answer}

    def _make(self, kind: str, rng: np.random.Generator) -> tuple[list[Image.Image], str]:
        size = self.image_size
        if kind == "digit":
            digit = str(rng.choice(DIGITS))
            return [render_digit(digit, size, rng)], digit
        if kind == "change":
            first, second, change = changed_scenes(rng)
            return [render(first, size, rng), render(second, size, rng)], change
        scene = random_scene(rng, count=None if kind == "count" else 1)
        return [render(scene, size, rng)], scene.answers()[kind]


__all__ = ["QUESTIONS", "SINGLE_KINDS", "MULTI_KINDS", "TRAINING_MIX", "SyntheticVQA", "vocabulary"]
