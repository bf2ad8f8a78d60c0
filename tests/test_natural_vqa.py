"""Natural-language synthetic VQA: phrasings held out of training, sentence answers graded by their answer word."""

import re
from pathlib import Path

import numpy as np
import pytest

from casa_hf.smollm2.natural_vqa import (
    HELD_OUT_PHRASINGS,
    PHRASINGS,
    PROSE,
    PROSE_MODULES,
    STREAM,
    STREAM_FRAMES,
    UNTRAINED_KINDS,
    NaturalVQA,
    answer_sentence,
    answer_word,
    grade,
    module_summary,
)
from casa_hf.training.synthetic_vqa import COLOURS, SyntheticVQA

ROOT = Path(__file__).resolve().parents[1]


def test_held_out_phrasings_never_appear_in_training():
    train = {NaturalVQA(140, seed=3)[i]["question"] for i in range(140)}
    held_out = {NaturalVQA(56, seed=3, phrasings="held_out")[i]["question"] for i in range(56)}
    asked = {kind: questions for kind, questions in PHRASINGS.items() if kind not in UNTRAINED_KINDS}
    assert held_out == {q for questions in asked.values() for q in questions[-HELD_OUT_PHRASINGS:]}
    assert not train & held_out
    assert train <= {q for questions in asked.values() for q in questions[:-HELD_OUT_PHRASINGS]}
    assert any("colour" in q for q in train) and any("color" in q for q in train)  # both spellings


def test_same_scenes_as_synthetic_vqa_with_sentence_answers():
    natural, plain = NaturalVQA(14, seed=1), SyntheticVQA(14, seed=1)
    for i in range(14):
        a, b = natural[i], plain[i]
        assert (a["kind"], a["answer"]) == (b["kind"], b["answer"])
        assert a["messages"][-1]["content"] == answer_sentence(a["kind"], a["answer"])
        assert grade(a["kind"], a["messages"][-1]["content"], a["answer"])
        images = [item for item in a["messages"][0]["content"] if item["type"] == "image"]
        assert len(images) == (2 if a["kind"] == "change" else 1)
    assert NaturalVQA(14, seed=1)[5]["question"] == natural[5]["question"]  # deterministic by seed


@pytest.mark.parametrize(
    "kind,text,answer,expected",
    [
        ("colour", "The shape is red.", "red", True),
        ("colour", "The shape is red or blue.", "red", False),  # two answers are no answer
        ("count", "There are two shapes.", "two", True),
        ("digit", "The digit is 7.", "1", False),
        ("change", "The color changed.", "colour", True),
        ("change", "It moved.", "position", True),
        ("change", "The shape changed.", "position", False),
        ("horizontal", "I cannot tell.", "left", False),
        ("corner", "It is at the bottom, on the right.", "bottom right", True),
        ("corner", "In the bottom right corner.", "bottom right", True),
        ("corner", "It is at the bottom.", "bottom right", False),  # half a corner is no corner
        ("corner", "It is in the top right corner.", "top left", False),
    ],
)
def test_grade(kind, text, answer, expected):
    assert grade(kind, text, answer) is expected


def test_bad_phrasings_option():
    with pytest.raises(ValueError, match="phrasings="):
        NaturalVQA(4, phrasings="test")


def test_untrained_corner_kind_is_asked_only_when_listed():
    """The corner of a single shape is its top/bottom and left/right answers together, on the same scene."""
    corner, horizontal, vertical = (
        NaturalVQA(6, seed=2, kinds=(kind,)) for kind in ("corner", "horizontal", "vertical")
    )
    for i in range(6):
        assert corner[i]["answer"] == f"{vertical[i]['answer']} {horizontal[i]['answer']}"
        assert corner[i]["question"] in PHRASINGS["corner"][:-HELD_OUT_PHRASINGS]
        assert grade("corner", corner[i]["messages"][-1]["content"], corner[i]["answer"])
    assert not {NaturalVQA(140, seed=3)[i]["kind"] for i in range(140)} & set(UNTRAINED_KINDS)
    with pytest.raises(ValueError, match="Unknown question kinds"):  # no one-word question for it
        SyntheticVQA(4, kinds=UNTRAINED_KINDS)


def test_prose_examples_answer_a_module_question_next_to_an_image_with_other_modules_than_the_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("perplexity", ROOT / "benchmarks" / "smollm2_text_perplexity.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert not set(PROSE_MODULES) & set(benchmark.MODULES)
    dataset = NaturalVQA(6, seed=2, kinds=("colour", PROSE))
    example = dataset[1]
    user, assistant = example["messages"]
    assert example["kind"] == PROSE and [item["type"] for item in user["content"]] == ["image", "text"]
    [module] = set(re.findall(r"[a-z_]+", user["content"][1]["text"])) & set(PROSE_MODULES)
    assert assistant["content"] == module_summary(module) and module_summary(module).endswith(".")
    with pytest.raises(ValueError, match="Unknown question kinds"):
        NaturalVQA(6, kinds=("colour", "poetry"))


def test_the_training_collator_marks_the_prose_rows_for_distillation():
    from tiny import tiny_processor

    from casa_hf.smollm2.train import DistillingCollator

    collator = DistillingCollator(tiny_processor(image_size=56))
    dataset = NaturalVQA(4, seed=2, image_size=56, kinds=("colour", PROSE))
    assert collator([dataset[i] for i in range(4)])["distill"].tolist() == [False, True, False, True]
    assert "distill" not in collator([dataset[0], dataset[2]])  # no prose: the plain answer loss


def test_stream_examples_ask_the_colour_after_every_frame_and_grade_the_last():
    dataset = NaturalVQA(8, seed=5, kinds=(STREAM,), phrasings="held_out")
    lengths = set()
    for index in range(len(dataset)):
        example = dataset[index]
        turns = example["messages"]
        lengths.add(len(turns) // 2)
        assert [turn["role"] for turn in turns] == ["user", "assistant"] * (len(turns) // 2)
        for user, assistant in zip(turns[::2], turns[1::2], strict=True):
            image, question = user["content"]
            assert question["text"] in PHRASINGS["colour"][-HELD_OUT_PHRASINGS:]
            colour = answer_word(STREAM, assistant["content"])
            assert np.all(np.asarray(image["image"]) == COLOURS[colour], axis=-1).sum() > 100  # the shape's colour
        assert example["kind"] == STREAM and grade(STREAM, turns[-1]["content"], example["answer"])
    assert lengths == set(range(STREAM_FRAMES[0], STREAM_FRAMES[1] + 1))
