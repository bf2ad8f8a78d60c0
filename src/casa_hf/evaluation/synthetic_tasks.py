"""`casa-hf evaluate`'s held-out questions as lmms-eval tasks: `casa_synthetic_<kind>`, `casa_synthetic_choice_<kind>`.

The tasks' documents are drawn by the package when lmms-eval loads a task (no file to download, nothing read from
the working directory): document k of `casa_synthetic_colour` is the k-th colour question among the first `examples`
held-out questions `casa-hf evaluate --examples N` asks (N = `examples`, default 700, seed 0), so `--limit L` takes the
questions of `casa-hf evaluate --examples E` whenever E holds L of that kind.

Which questions (`synthetic_vqa`'s one-word ones, or `natural_vqa`'s English held-out phrasings) is what `casa-hf
evaluate` asks the model being evaluated: the `casa` lmms-eval model sets it when it loads (its `questions` argument,
by default `builtin_models.questions_for(pretrained)`), and any other lmms-eval model is asked the English ones. The
two sets draw different images (their kinds cycle differently), as in `casa-hf evaluate`.

Generated answers are graded as `casa-hf evaluate` grades them: a one-word answer by its first word (the first
generated token of `training.train.evaluate`), a sentence by `natural_vqa.grade`.
"""

from __future__ import annotations

import functools
from typing import Any

from ..smollm2.natural_vqa import ANSWER_WORDS, answer_sentence, grade
from ..smollm2.train import EVALUATED_KINDS, held_out_natural
from ..training.synthetic_vqa import MULTI_KINDS, SINGLE_KINDS
from ..training.train import held_out_questions

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a task's text (the `casa` model reads it; see lmms_model)
KINDS = (*SINGLE_KINDS, *MULTI_KINDS)  # the tasks' kinds (the natural questions' 3-5 frame stream is not a task)
EXAMPLES = 700  # `casa-hf evaluate --examples`' default
QUESTION_SETS = ("synthetic", "natural")
DEFAULT_QUESTIONS = "natural"  # what a model other than `casa` is asked: English

# set by the `casa` lmms-eval model when it loads, read when a task draws its documents
_settings: dict[str, Any] = {"questions": None, "image_size": 112}


def configure(questions: str, image_size: int | None) -> None:
    """Which questions the tasks ask, and at which image size they draw their images (the processor's)."""
    if questions not in QUESTION_SETS:
        raise ValueError(f"questions={questions!r}: choose one of {QUESTION_SETS}")
    _settings.update(questions=questions, image_size=image_size or 112)


def current_questions() -> str:
    return _settings["questions"] or DEFAULT_QUESTIONS


@functools.lru_cache(maxsize=8)
def _dataset(questions: str, image_size: int, seed: int, examples: int):
    if questions == "synthetic":
        return held_out_questions(examples, image_size, seed)
    return held_out_natural(examples, image_size, "held_out", seed, EVALUATED_KINDS)


def documents(kind: str, examples: int = EXAMPLES, seed: int = 0) -> list[dict]:
    """The documents of `kind`'s task: which held-out question each is (the question, its images and answer are
    drawn from that when asked: `example`)."""
    if kind not in KINDS:
        raise ValueError(f"Unknown question kind {kind!r}; known: {KINDS}")
    questions, image_size = current_questions(), _settings["image_size"]
    kinds = _dataset(questions, image_size, seed, examples).kinds
    return [
        dict(index=i, kind=kind, questions=questions, image_size=image_size, seed=seed, examples=examples)
        for i in range(examples)
        if kinds[i % len(kinds)] == kind
    ]


@functools.lru_cache(maxsize=256)
def _example(questions: str, image_size: int, seed: int, examples: int, index: int) -> dict:
    return _dataset(questions, image_size, seed, examples)[index]


def example(doc: dict) -> dict:
    """The held-out example (chat messages with PIL images, kind, answer) a document stands for."""
    return _example(doc["questions"], doc["image_size"], doc["seed"], doc["examples"], doc["index"])


def _user_content(doc: dict) -> list[dict]:
    return next(m["content"] for m in example(doc)["messages"] if m["role"] == "user")


def doc_to_visual(doc: dict) -> list:
    return [part["image"].convert("RGB") for part in _user_content(doc) if part["type"] == "image"]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The user turn, each image as `IMAGE_PLACEHOLDER` at its place ("<image>first frame .<image>what changed")."""
    return "".join(IMAGE_PLACEHOLDER if part["type"] == "image" else part["text"] for part in _user_content(doc))


def doc_to_target(doc: dict) -> str:
    """The expected answer word (logged next to each answer)."""
    return example(doc)["answer"]


def grade_answer(doc: dict, text: str) -> bool:
    """`casa-hf evaluate`'s grading: a one-word answer's first word, a sentence's answer word."""
    item = example(doc)
    if doc["questions"] == "synthetic":
        words = text.split()
        return bool(words) and words[0] == item["answer"]
    return grade(item["kind"], text, item["answer"])


def process_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": float(grade_answer(doc, results[0]))}


def choices(doc: dict) -> list[str]:
    """The continuations scored in a multiple-choice task: each answer word (one-word questions) or each answer
    sentence (English ones)."""
    words = ANSWER_WORDS[doc["kind"]]
    if doc["questions"] == "synthetic":
        return ["position" if word == "moved" else word for word in words]
    return [answer_sentence(doc["kind"], "position" if word == "moved" else word) for word in words]


def target_index(doc: dict) -> int:
    answer = example(doc)["answer"]
    words = ["position" if word == "moved" else word for word in ANSWER_WORDS[doc["kind"]]]
    return words.index(answer)


def make_task_class():
    """A `ConfigurableTask` whose documents are `documents(kind)` (the YAML's `dataset_kwargs`: kind, examples,
    seed), built in memory: lmms-eval's `class:` task hook."""
    import datasets
    from lmms_eval.api.task import ConfigurableTask

    class CasaSyntheticTask(ConfigurableTask):
        def __init__(self, config: dict | None = None, **kwargs):
            config = {key: value for key, value in (config or {}).items() if key != "class"}
            super().__init__(config=config, **kwargs)

        def download(self, dataset_kwargs: dict | None = None) -> None:
            options = dict(dataset_kwargs or {})
            docs = documents(options["kind"], int(options.get("examples", EXAMPLES)), int(options.get("seed", 0)))
            self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
            self.dataset_no_image = self.dataset

    return CasaSyntheticTask


def __getattr__(name: str):
    """`CasaSyntheticTask`, the tasks' class, made when lmms-eval asks for it (lmms-eval is imported only then)."""
    if name == "CasaSyntheticTask":
        return make_task_class()
    raise AttributeError(name)


__all__ = [
    "EXAMPLES",
    "IMAGE_PLACEHOLDER",
    "KINDS",
    "choices",
    "configure",
    "doc_to_target",
    "doc_to_text",
    "doc_to_visual",
    "documents",
    "example",
    "grade_answer",
    "make_task_class",
    "process_results",
    "target_index",
]
