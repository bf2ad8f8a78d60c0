"""The CASA model shipped with the package answers synthetic questions offline, through the Auto classes."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoProcessor, pipeline

import casa_hf  # noqa: F401
from casa_hf.builtin_models import TINY_MODEL
from casa_hf.demo import load_demo_model, run_word_demo
from casa_hf.training import SyntheticVQA
from casa_hf.training.synthetic_vqa import SINGLE_KINDS
from casa_hf.training.train import evaluate

# The README reports the held-out accuracy measured on 700 examples (single-image 0.995, every single-image kind
# >= 0.97); this fixed, smaller set (20 questions per kind) must reach the project's target and a per-kind floor.
SINGLE_IMAGE_BAR = 0.90
PER_KIND_BAR = 0.85


def test_shipped_model_answers_above_the_stated_accuracy():
    model = AutoModel.from_pretrained(TINY_MODEL).eval()
    processor = AutoProcessor.from_pretrained(TINY_MODEL)
    accuracy = evaluate(model, processor, SyntheticVQA(140, seed=20_000, image_size=processor.image_size))
    assert accuracy["single_image"] >= SINGLE_IMAGE_BAR, accuracy
    assert all(accuracy[kind] >= PER_KIND_BAR for kind in SINGLE_KINDS), accuracy


def test_shipped_model_predates_placement_and_loads_sequential():
    """The shipped config has no `casa_placement` (saved before it existed): it loads as the sequential block it was
    trained in, computing what a model built explicitly sequential from the same weights computes."""
    saved = json.loads((TINY_MODEL / "config.json").read_text())
    assert "casa_placement" not in saved and "casa_window_images" not in saved
    model, processor = load_demo_model("tiny")
    assert model.config.casa_placement == "sequential"
    # nor `casa_window_images`, nor the processor's `group_images`: every image opens its window, turns as written
    assert model.config.casa_window_images == "each" and processor.group_images is False
    example = SyntheticVQA(1, seed=20_002, image_size=processor.image_size)[0]
    inputs = processor.apply_chat_template(
        example["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    logits = {}
    for placement in ("sequential", "parallel"):
        rebuilt = AutoModel.from_config(casa_hf.CasaConfig(**{**saved, "casa_placement": placement})).eval()
        rebuilt.load_state_dict(model.state_dict())
        with torch.no_grad():
            logits[placement] = rebuilt(**inputs).logits
    with torch.no_grad():
        loaded = model(**inputs).logits
    assert torch.equal(loaded, logits["sequential"])
    assert (loaded - logits["parallel"]).abs().max() > 1e-3


def test_shipped_model_through_the_pipeline():
    pipe = pipeline("image-text-to-text", model=str(TINY_MODEL))
    example = SyntheticVQA(7, seed=20_001, image_size=pipe.processor.image_size)[0]  # a colour question
    messages = example["messages"][:-1]
    answer = pipe(text=messages, max_new_tokens=3, return_full_text=False)[0]["generated_text"]
    inputs = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = pipe.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = pipe.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == expected.strip()


def test_demo_command_runs(capsys):
    run_word_demo(*load_demo_model(None), images=1, frames=2, seed=0, save_images=None)
    printed = capsys.readouterr().out
    assert "answers right" in printed and "frame  1" in printed


def test_demo_prints_each_answer_as_it_comes_and_the_seed_that_repeats_it():
    """`casa-hf demo` as a user runs it, its output piped (as into `tee`): stopped as soon as its first answer
    arrives, it has not finished (output held back until the end would come all at once); the seed it printed
    draws the same images again."""
    command = [sys.executable, "-m", "casa_hf", "demo", "--model", "tiny", "--images", "3", "--frames", "0"]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # as a user's shell
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    printed = []
    for line in demo.stdout:
        printed.append(line)
        if line.lstrip().startswith("Q:"):
            demo.kill()
            break
    printed += demo.stdout.readlines()
    demo.wait()
    assert any(line.lstrip().startswith("Q:") for line in printed), printed
    assert not any("answers right" in line for line in printed), "the answers came only once the demo was done"
    seed = re.search(r"with seed (\d+) \(`--seed \1` draws the same ones again\)", "".join(printed)).group(1)
    again = subprocess.run([*command, "--seed", seed], capture_output=True, text=True, check=True).stdout
    first_image = next(line for line in printed if line.startswith("image 1:"))
    assert first_image in again.splitlines(True) and "answers right" in again, again


def test_demo_command_shows_casa_smollm2_unless_told_otherwise(monkeypatch, tmp_path):
    """The demo is chosen by the model: CASA-SmolLM2 is asked in English, the tiny model and a folder trained like it
    (a word-level tokenizer) the one-word questions, a folder with a real LLM's tokenizer in English."""
    import shutil

    import casa_hf.demo
    import casa_hf.smollm2.demo
    from casa_hf.cli import main

    shown = []

    def demo(kind: str):
        return lambda model, *args: shown.append((kind, model))

    monkeypatch.setattr(casa_hf.demo, "start_demo", lambda model, seed: (model, None, seed))
    monkeypatch.setattr(casa_hf.demo, "run_word_demo", demo("words"))
    monkeypatch.setattr(casa_hf.smollm2.demo, "run_natural_demo", demo("English"))
    tiny_copy, english = shutil.copytree(TINY_MODEL, tmp_path / "tiny"), tmp_path / "english"
    english.mkdir()
    (english / "config.json").write_text("{}")
    (english / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    main(["demo"])
    main(["demo", "--model", "tiny"])
    main(["demo", "--model", str(tiny_copy)])
    main(["demo", "--model", str(english)])
    expected = [("English", "casa-smollm2"), ("words", "tiny"), ("words", str(tiny_copy)), ("English", str(english))]
    assert shown == expected


def test_evaluate_command_scores_the_shipped_model(capsys):
    from casa_hf.cli import main

    main(["evaluate", "--examples", "14", "--seed", "10002"])  # data seed 20,002
    accuracy = json.loads(capsys.readouterr().out)
    assert set(accuracy) == {*SINGLE_KINDS, "change", "single_image", "all"}
    assert accuracy["single_image"] >= SINGLE_IMAGE_BAR, accuracy


def test_model_names_resolve_and_unknown_names_are_refused(tmp_path):
    from casa_hf.builtin_models import resolve_model

    assert resolve_model("tiny") == TINY_MODEL
    assert resolve_model(None) == TINY_MODEL
    assert resolve_model(str(TINY_MODEL)) == TINY_MODEL
    with pytest.raises(FileNotFoundError, match=r"--model .* neither a built-in model \(tiny"):
        resolve_model(tmp_path / "nothing")


def test_attention_map_example_points_at_the_shape(tmp_path, monkeypatch, capsys):
    """examples/attention_map.py: the answer to "what colour?" looks at the shape's patches most."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    from casa_hf.demo import load_demo_model
    from casa_hf.training.synthetic_vqa import QUESTIONS, random_scene, render

    path = Path(__file__).resolve().parents[1] / "examples" / "attention_map.py"
    spec = importlib.util.spec_from_file_location("attention_map", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    model, processor = load_demo_model("tiny")
    rng = np.random.default_rng(123)
    for _ in range(4):
        scene = random_scene(rng, count=1)
        image = render(scene, processor.image_size, rng)
        answer, grid, image_share = example.attention_map(model, processor, image, QUESTIONS["colour"])
        assert answer.startswith(scene.colour) and 0 < image_share < 1
        row, column = np.unravel_index(grid.argmax(), grid.shape)
        centre = ((column + 0.5) / grid.shape[1], (row + 0.5) / grid.shape[0])
        assert np.hypot(centre[0] - scene.x, centre[1] - scene.y) < 0.25  # the shape's radius is 0.17

    monkeypatch.setattr("sys.argv", ["attention_map.py", "--out", str(tmp_path / "map.png")])
    example.main()
    assert (tmp_path / "map.png").stat().st_size > 0 and "went to the image" in capsys.readouterr().out
