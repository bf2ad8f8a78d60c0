"""The shipped CASA-SmolLM2: assembled with the installed SmolLM2, exported as a standard checkpoint folder that the
Auto classes and the pipeline load, accurate on held-out questions, still SmolLM2 on text."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoProcessor, pipeline

from casa_hf import CasaForConditionalGeneration
from casa_hf.cli import main
from casa_hf.smollm2.assembly import SHIPPED_WEIGHTS, assembled_folder
from casa_hf.smollm2.demo import CHANGE_QUESTIONS, run_natural_demo
from casa_hf.smollm2.model import load_added_weights, recipe_from_file
from casa_hf.smollm2.natural_vqa import answer_word, grade
from casa_hf.smollm2.train import FIXED_TEST_SET, evaluate_natural, held_out_natural
from casa_hf.streaming import CasaStream, TextBudget
from casa_hf.training.synthetic_vqa import random_scene, render

pytestmark = pytest.mark.slow  # the real SmolLM2, CASA-SmolLM2 assembled

# KL(SmolLM2 || model) of the next token at any position of a text-only chat, in nats (measured 0.067 at most)
LORA_TEXT_KL = 0.1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "casa-smollm2"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASA_HF_CACHE", str(tmp_path_factory.mktemp("cache")))
        main(["export", "casa-smollm2", str(folder)])
    return folder


@pytest.fixture(scope="module")
def loaded(exported):
    return AutoModel.from_pretrained(exported).eval(), AutoProcessor.from_pretrained(exported)


def test_export_is_a_standard_checkpoint(exported, loaded):
    files = {path.name for path in exported.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "chat_template.jinja", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    card = (exported / "README.md").read_text()
    accuracy = json.loads((SHIPPED_WEIGHTS / "accuracy.json").read_text())
    assert "held-out phrasings" in card and accuracy["command"] in card and "pipeline(" in card
    model, _ = loaded
    assert isinstance(model, CasaForConditionalGeneration) and model.config.text_config.model_type == "llama"
    # shipped in the paper's parallel block (its recipe.json says so), built so explicitly (the saved key)
    assert recipe_from_file(SHIPPED_WEIGHTS / "recipe.json").placement == "parallel"
    assert json.loads((exported / "config.json").read_text())["casa_placement"] == "parallel"
    # and with the paper's windows (consecutive images share one) and a user turn's images rendered first, together
    assert model.config.casa_window_images == "consecutive" and "consecutive images share one window" in card
    assert json.loads((exported / "processor_config.json").read_text())["group_images"] is True


def test_pipeline_answers_in_a_sentence(exported):
    """The answer is a sentence naming one colour (whether the right one is the accuracy test's business)."""
    image = Image.new("RGB", (112, 112), (20, 20, 30))
    ImageDraw.Draw(image).ellipse([15, 15, 55, 55], fill=(220, 40, 40))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour is the shape?"}],
        }
    ]
    pipe = pipeline("image-text-to-text", model=str(exported))
    answer = pipe(text=messages, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    assert answer_word("colour", answer) is not None and answer.strip().endswith("."), answer


def test_shipped_accuracy_on_a_fixed_held_out_set(loaded):
    """The shipped weights reproduce the accuracy their model card reports on the fixed set, single images and the
    two-frame "what changed" (one answer of slack each for greedy near-ties across machines)."""
    model, processor = loaded
    accuracy = evaluate_natural(
        model, processor, held_out_natural(FIXED_TEST_SET, processor.image_size, "held_out"), 14
    )
    recorded = json.loads((SHIPPED_WEIGHTS / "accuracy.json").read_text())["fixed test set"]
    assert abs(accuracy["single_image"] - recorded["single_image"]) <= 1 / 24 + 1e-9, (accuracy, recorded)
    assert abs(accuracy["change"] - recorded["change"]) <= 1 / 4 + 1e-9, (accuracy, recorded)


def test_demo_asks_about_images_two_frames_and_text(loaded, capsys):
    """`casa-hf demo`'s English demo runs on the shipped model: single images, the two-frame question, the text-only
    follow-up (SmolLM2's answer), a stream."""
    model, processor = loaded
    run_natural_demo(model, processor, images=1, frames=2, seed=0, save_images=None)
    out = capsys.readouterr().out
    assert f"/{CHANGE_QUESTIONS} two-frame answers right" in out and "frame  1:" in out, out
    # what each of the two frames showed, so the reader can check the answer
    assert re.search(r"\[frame 1: one \w+ \w+ at the \w+-\w+\] .+ \[frame 2: one \w+ \w+ at the \w+-\w+\]", out), out
    assert "A: The capital of France is Paris." in out, out


def test_readme_stream_answers_each_frame_and_a_text_turn(loaded):
    """The README's streaming snippet as written: its turns follow the chat template, so every frame gets its
    colour in a sentence and a text-only question after them is answered."""
    model, processor = loaded
    rng = np.random.default_rng(25)
    scenes, frames = [], []
    for _ in range(5):
        scenes.append(random_scene(rng, count=1))
        frames.append(render(scenes[-1], processor.image_size, rng))
    stream = CasaStream(
        model,
        processor,
        prompt="What colour is the shape?",
        max_new_tokens=16,
        text_budget=TextBudget(sink_tokens=4, window_tokens=2048),
    )
    answers = [step.text for step in stream.run(frames)]
    assert all(grade("colour", answer, scene.colour) for answer, scene in zip(answers, scenes, strict=True)), answers
    answer = stream.feed(text="What is the capital of France?").text
    assert "Paris" in answer, answer


def test_text_only_chats_are_smollm2s(loaded, smollm2):
    """No image, no CASA update (`casa_text_only_windows="skip"`): the model's text LLM exactly, and that is SmolLM2
    (the installed GGUF's, loaded on its own): the same logits over its vocabulary, or, where the recipe merges a LoRA
    into SmolLM2's self-attention (distilled from SmolLM2 on text), the same answer and next-token distributions
    within `LORA_TEXT_KL` of SmolLM2's at every position."""
    model, processor = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    smollm2, _ = smollm2
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        logits = model(**inputs).logits
        torch.testing.assert_close(logits, model.backbone_llm()(**inputs).logits, atol=1e-5, rtol=0)
        reference = smollm2(**inputs).logits
    logits = logits[..., : reference.shape[-1]]
    if recipe_from_file(SHIPPED_WEIGHTS / "recipe.json").sa_lora_rank:
        kl = torch.nn.functional.kl_div(
            logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none"
        )
        assert kl.sum(-1).max() <= LORA_TEXT_KL, kl.sum(-1)
    else:
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert out.tolist() == smollm2.generate(**inputs, max_new_tokens=10, do_sample=False).tolist()
    assert "Paris" in processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_added_weights_must_match_the_recipe(loaded, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(SHIPPED_WEIGHTS / "added.safetensors"))
    state.pop(next(name for name in state if ".casa_attn." in name))
    save_file(state, str(tmp_path / "added.safetensors"))
    with pytest.raises(ValueError, match="does not match the recipe"):
        load_added_weights(loaded[0], tmp_path / "added.safetensors")


def test_the_assembled_folder_follows_the_recipe_with_its_defaults(tmp_path):
    """A recipe field left out of recipe.json takes the code's default, so the cache key must include it: writing
    the default out keeps the folder, another value (or other weights) moves it."""
    recipe = json.loads((SHIPPED_WEIGHTS / "recipe.json").read_text())
    folders = []
    for name, windows in (("implicit", None), ("explicit", "skip"), ("other", "attend")):
        copy = tmp_path / name
        copy.mkdir()
        (copy / "added.safetensors").write_bytes((SHIPPED_WEIGHTS / "added.safetensors").read_bytes())
        fields = dict(recipe["recipe"])
        fields.pop("text_only_windows", None)
        fields.update({} if windows is None else {"text_only_windows": windows})
        (copy / "recipe.json").write_text(json.dumps({**recipe, "recipe": fields}))
        folders.append(assembled_folder(copy, tmp_path / "cache"))
    assert folders[0] == folders[1] != folders[2]


def test_a_run_reloads_in_its_block_and_windows(monkeypatch, tmp_path):
    """`train-smollm2 --init-from <weights> --placement sequential --window-images consecutive`: the shipped weights
    (parallel, a window per image) all load into the sequential block with consecutive-image windows (the same
    names), the run's recipe.json says so, and the run loaded as `casa-hf evaluate --model RUN` loads it
    (`resolve_model`: assembled with SmolLM2) is that model, its processor grouping a turn's frames: on a two-frame
    question, the logits of the model in memory after training, not those of the same weights in the parallel block
    or with a window per frame."""
    import casa_hf.smollm2.train as smollm2_training
    from casa_hf.builtin_models import resolve_model

    trained, train = [], smollm2_training.train_casa_smollm2
    monkeypatch.setattr(
        smollm2_training, "train_casa_smollm2", lambda config: trained.append(train(config)) or trained[0]
    )
    monkeypatch.setattr(smollm2_training, "natural_accuracy", lambda *args: {})
    monkeypatch.setenv("CASA_HF_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    # fmt: off
    main(["train-smollm2", "--output-dir", str(run), "--init-from", str(SHIPPED_WEIGHTS), "--placement", "sequential",
          "--window-images", "consecutive", "--freeze-vision", "--steps", "2", "--stop-after", "1", "--batch-size",
          "2", "--kinds", "colour,change"])
    # fmt: on
    model, processor = trained[0]
    recipe = recipe_from_file(run / "recipe.json")
    assert (recipe.placement, recipe.window_images) == ("sequential", "consecutive")
    folder = resolve_model(str(run))
    reloaded = AutoModel.from_pretrained(folder).eval()
    for config in (model.config, reloaded.config):  # the trained model in memory and the run as reloaded
        assert (config.casa_placement, config.casa_window_images) == ("sequential", "consecutive")
    rng = np.random.default_rng(7)
    first, second = (render(random_scene(rng, count=1), processor.image_size, rng) for _ in range(2))
    content = [{"type": "image", "image": first}, {"type": "text", "text": "First frame."}]
    content += [{"type": "image", "image": second}, {"type": "text", "text": "What changed?"}]
    inputs = AutoProcessor.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert "<|vision_end|><|vision_start|>" in text  # the frames rendered together, then the text
    with torch.no_grad():
        logits, reference = reloaded(**inputs).logits, model(**inputs).logits
        others = [  # the same weights laid out otherwise compute something else
            AutoModel.from_pretrained(folder, **layout).eval()(**inputs).logits
            for layout in ({"casa_placement": "parallel"}, {"casa_window_images": "each"})
        ]
    torch.testing.assert_close(logits, reference, atol=1e-3, rtol=0)
    assert all((other - reference).abs().max() > 0.1 for other in others)
