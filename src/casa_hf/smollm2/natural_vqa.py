"""The synthetic scenes of `synthetic_vqa`, asked about in plain English and answered in sentences.

Each question kind has several phrasings (British and American spellings, short and long); the last
`HELD_OUT_PHRASINGS` of each kind never appear in training (`phrasings="train"`) and are used only to evaluate
(`phrasings="held_out"`), so a score on them says whether the model understood the question or learnt a string.
Answers are sentences built from one answer word; `grade` finds the answer word in free text.

`UNTRAINED_KINDS` are asked only when listed in `kinds`: no training mix holds them, so the shipped CASA-SmolLM2
has never seen them (`examples/finetune_lora.py` teaches one with LoRA).
"""

from __future__ import annotations

import functools
import importlib
import re

import numpy as np

from ..training.synthetic_vqa import COLOURS, COUNTS, DIGITS, SHAPES, SyntheticVQA

PHRASINGS = {
    "colour": (
        "What colour is the shape?",
        "What color is the shape?",
        "Which colour is it?",
        "What is the color of the shape in this picture?",
        "Tell me the colour of the shape, please.",
        "Color?",
        "Can you tell me what color the shape in the image is?",
        "What colour has the shape been painted?",
    ),
    "shape": (
        "What shape is it?",
        "What shape do you see?",
        "Which shape is drawn in this image?",
        "Shape?",
        "Can you name the shape in the picture?",
        "Is it a square, a circle or a triangle?",
        "What kind of shape is shown here?",
        "Which geometric shape is in the picture?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes can you count?",
        "Count the shapes.",
        "How many shapes are drawn in this picture?",
        "Number of shapes?",
        "How many objects do you see in the image?",
        "Can you tell me how many shapes there are?",
        "How many shapes does the image contain?",
    ),
    "horizontal": (
        "Is the shape on the left or the right?",
        "Is it on the left side or the right side?",
        "Left or right?",
        "On which side of the picture is the shape, left or right?",
        "Is the shape to the left or to the right?",
        "Does the shape sit on the left or on the right of the image?",
        "Which side is the shape on, left or right?",
        "Is the shape in the left half or the right half?",
    ),
    "vertical": (
        "Is the shape at the top or the bottom?",
        "Is it near the top or near the bottom?",
        "Top or bottom?",
        "Is the shape in the upper part or the lower part of the picture, top or bottom?",
        "Is the shape at the top of the image or at the bottom?",
        "Does the shape sit at the top or at the bottom of the picture?",
        "Which is it, top or bottom?",
        "Is the shape in the top half or the bottom half?",
    ),
    "digit": (
        "What digit is written?",
        "Which number is shown in the image?",
        "What number do you see?",
        "Digit?",
        "Read the digit in this picture, please.",
        "Which digit is written on the image?",
        "What number is written here?",
        "Can you read the number in the picture?",
    ),
    "change": (
        "What changed between the frames?",
        "What is different in the second frame?",
        "What changed?",
        "Compared with the first frame, what changed in this one?",
        "Did the colour, the shape or the position change?",
        "What is the difference between the two frames?",
        "What has changed since the first frame?",
        "Did the color, the shape or the position change?",
    ),
    "corner": (
        "Which corner is the shape in?",
        "In which corner is the shape?",
        "Corner?",
        "Which corner of the picture is the shape closest to?",
        "Is the shape in the top left, top right, bottom left or bottom right corner?",
        "Tell me which corner of the image the shape sits in.",
        "Can you tell me which corner of the image the shape is in?",
        "In which corner of the picture do you see the shape?",
    ),
}
UNTRAINED_KINDS = ("corner",)
# "stream": a chat of `STREAM_FRAMES` frames, each followed by a colour question and its answer, as a video stream
# asks (`casa-hf demo`'s stream); graded on the last answer. Without it, a chat's earlier answers steered the frozen
# LLM: weights trained without it answered the demo's stream "blue" from its third frame on (README, CASA-SmolLM2).
STREAM = "stream"
STREAM_FRAMES = (3, 5)  # fewest, most
HELD_OUT_PHRASINGS = 2  # the last phrasings of each kind: evaluation only
# "prose": a question about a Python standard-library module next to an unrelated image, answered with the module's
# docstring, its text in the image's CASA window. Training distils that text from the LLM alone rather than fitting
# the docstring (`train.DistillingCollator`): so the CASA layers leave text after an image to the LLM (fitted,
# they learnt the docstrings and made it worse; README, CASA-SmolLM2). The perplexity benchmark scores other modules'
# docstrings (`benchmarks/smollm2_text_perplexity.py`).
PROSE = "prose"
TEXT = "text"  # the prose questions without an image: distilled too when SmolLM2's SA is adapted (its LoRA)
PROSE_MODULES = (
    "os", "re", "random", "collections", "string", "shutil", "tempfile", "fnmatch", "gzip", "sqlite3", "hashlib",
    "hmac", "secrets", "uuid", "struct", "copy", "pprint", "operator", "typing", "inspect", "ast", "tokenize", "pdb",
    "timeit", "trace", "weakref", "sched", "subprocess", "socket", "selectors", "calendar", "statistics", "numbers",
    "locale", "gettext", "codecs", "difflib", "shelve", "configparser", "plistlib", "mimetypes", "wave", "colorsys",
    "zipimport", "filecmp", "linecache", "optparse", "getopt", "ipaddress", "codeop", "pickletools", "tabnanny",
    "pyclbr", "runpy",
)  # fmt: skip
PROSE_QUESTIONS = (
    "What does Python's {} module do?",
    "Tell me about the {} module in Python.",
    "Can you describe the Python module {}?",
)
PROSE_CHARACTERS = 400  # about 90 SmolLM2 tokens of each docstring, cut at a sentence end
FIRST_FRAME_TEXTS = ("This is the first frame.", "Here is the first frame.", "First frame.")
CHANGE_ANSWERS = {"colour": "The colour changed.", "shape": "The shape changed.", "position": "It moved."}
# The answer word of each kind as found in an answer sentence ("The colour changed." -> "colour").
ANSWER_WORDS = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNTS,
    "horizontal": ("left", "right"),
    "vertical": ("top", "bottom"),
    "digit": DIGITS,
    "change": ("colour", "shape", "moved"),
    STREAM: tuple(COLOURS),
}


def answer_sentence(kind: str, answer: str) -> str:
    """The sentence a kind's answer word is said in."""
    if kind in ("colour", STREAM):
        return f"The shape is {answer}."
    if kind == "shape":
        return f"It is a {answer}."
    if kind == "count":
        return "There is one shape." if answer == "one" else f"There are {answer} shapes."
    if kind == "horizontal":
        return f"It is on the {answer}."
    if kind == "vertical":
        return f"It is at the {answer}."
    if kind == "digit":
        return f"The digit is {answer}."
    if kind == "corner":  # the top/bottom sentence, then the left/right one
        vertical, horizontal = answer.split()
        return f"It is at the {vertical}, on the {horizontal}."
    return CHANGE_ANSWERS[answer]


def answer_word(kind: str, text: str) -> str | None:
    """The one answer word of `kind` that `text` says (`None` when it says none or several); a corner is two words,
    its vertical one and its horizontal one ("top left")."""
    if kind == "corner":
        words = answer_word("vertical", text), answer_word("horizontal", text)
        return None if None in words else " ".join(words)
    words = set(re.findall(r"[a-z]+|\d", text.lower().replace("color", "colour")))
    found = [word for word in ANSWER_WORDS[kind] if word in words]
    if kind == "change" and found == ["colour", "shape"]:
        return None
    return found[0] if len(found) == 1 else None


def grade(kind: str, text: str, answer: str) -> bool:
    """Whether the free-text answer `text` gives `answer` (the change kind's word is its `CHANGE_ANSWERS` key)."""
    expected = "moved" if kind == "change" and answer == "position" else answer
    return answer_word(kind, text) == expected


@functools.cache
def module_summary(name: str) -> str:
    """The start of module `name`'s docstring, whitespace collapsed, cut after the last full stop within
    `PROSE_CHARACTERS` characters."""
    text = " ".join(importlib.import_module(name).__doc__.split())
    head = text[:PROSE_CHARACTERS]
    return head[: head.rfind(". ") + 1] or head


class NaturalVQA(SyntheticVQA):
    """`SyntheticVQA`'s scenes and answers, asked with varied English phrasings and answered in sentences.

    `phrasings`: `"train"` (all but the held-out phrasings), `"held_out"` (only those) or `"all"`. Example i is
    always the same for a given seed; `system_prompt` is the system message text (`None`: no system message).
    Each example is `{"messages": [...], "kind": str, "answer": str, "question": str}`.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        image_size: int = 112,
        kinds: tuple[str, ...] | None = None,
        phrasings: str = "train",
        system_prompt: str | None = None,
    ):
        super().__init__(size, seed, image_size, None, system_prompt=False)
        unknown = set(kinds or ()) - set(PHRASINGS) - {PROSE, TEXT, STREAM}
        if unknown:
            known = sorted([*PHRASINGS, PROSE, TEXT, STREAM])
            raise ValueError(f"Unknown question kinds {sorted(unknown)}; known: {known}")
        self.kinds = kinds or self.kinds
        if phrasings not in ("train", "held_out", "all"):
            raise ValueError(f"phrasings={phrasings!r} must be 'train', 'held_out' or 'all'")
        self.phrasings = phrasings
        self.system_text = system_prompt

    def _questions(self, kind: str) -> tuple[str, ...]:
        questions = PHRASINGS[kind]
        if self.phrasings == "train":
            return questions[:-HELD_OUT_PHRASINGS]
        return questions[-HELD_OUT_PHRASINGS:] if self.phrasings == "held_out" else questions

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        kind = self.kinds[index % len(self.kinds)]
        if kind in (PROSE, TEXT):
            return self._prose(rng, kind)
        if kind == STREAM:
            return self._stream(rng)
        images, answer = self._make(kind, rng)
        question = str(rng.choice(self._questions(kind)))
        content = [{"type": "image", "image": images[0]}]
        if len(images) == 2:
            first = str(rng.choice(FIRST_FRAME_TEXTS))
            content += [{"type": "text", "text": first}, {"type": "image", "image": images[1]}]
        content.append({"type": "text", "text": question})
        return self._example(content, answer_sentence(kind, answer), kind, answer, question)

    def _prose(self, rng: np.random.Generator, kind: str) -> dict:
        images, _ = self._make("colour", rng)
        module = str(rng.choice(PROSE_MODULES))
        question = str(rng.choice(PROSE_QUESTIONS)).format(module)
        answer = module_summary(module)
        content = [{"type": "image", "image": images[0]}] if kind == PROSE else []
        content.append({"type": "text", "text": question})
        return self._example(content, answer, kind, answer, question)

    def _stream(self, rng: np.random.Generator) -> dict:
        turns = []
        for _ in range(int(rng.integers(STREAM_FRAMES[0], STREAM_FRAMES[1] + 1))):
            images, answer = self._make("colour", rng)
            question = str(rng.choice(self._questions("colour")))
            turns.append(([{"type": "image", "image": images[0]}, {"type": "text", "text": question}], answer))
        *earlier, (content, answer) = turns
        history = [(earlier_content, answer_sentence(STREAM, colour)) for earlier_content, colour in earlier]
        return self._example(content, answer_sentence(STREAM, answer), STREAM, answer, content[-1]["text"], history)

    def _example(
        self,
        content: list[dict],
        reply: str,
        kind: str,
        answer: str,
        question: str,
        history: list[tuple[list[dict], str]] = (),
    ) -> dict:
        """The user turn `content` answered by `reply`, after the system message when there is one and the earlier
        `(user content, reply)` turns of `history`."""
        messages = [{"role": "system", "content": self.system_text}] if self.system_text else []
        for earlier, earlier_reply in history:
            messages += [{"role": "user", "content": earlier}, {"role": "assistant", "content": earlier_reply}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]
        return {"messages": messages, "kind": kind, "answer": answer, "question": question}


__all__ = [
    "HELD_OUT_PHRASINGS",
    "PHRASINGS",
    "PROSE",
    "STREAM",
    "TEXT",
    "UNTRAINED_KINDS",
    "NaturalVQA",
    "answer_sentence",
    "answer_word",
    "grade",
]
