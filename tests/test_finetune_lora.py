"""examples/finetune_lora.py: LoRA adapters on CASA-SmolLM2 train (only they do), lower the loss on the new question
kind, and the saved adapter reloads onto the base model to the same logits."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

from casa_hf.builtin_models import resolve_model
from casa_hf.smollm2.natural_vqa import NaturalVQA
from casa_hf.training.collator import CasaDataCollator

pytestmark = pytest.mark.slow  # the real SmolLM2, LoRA training


def load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_lora.py"
    spec = importlib.util.spec_from_file_location("finetune_lora", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclass looks its module up
    spec.loader.exec_module(example)
    return example


def test_adapter_trains_saves_and_reloads(tmp_path):
    example = load_example()
    output = tmp_path / "adapter"
    argv = ["--output-dir", str(output), "--steps", "4", "--batch-size", "4", "--eval-examples", "2"]
    argv += ["--replay", "0"]  # every batch all corner questions, so the logged losses are comparable
    result = example.run(example.parse_args([*argv, "--kept-kinds", "colour"]))

    files = {path.name for path in output.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "finetune_lora.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    report = json.loads((output / "finetune_lora.json").read_text())
    assert report["before"] == result.before and report["after"] == result.after
    assert set(result.before) == set(result.after) == {"corner", "colour"}
    assert len(result.losses) == 4 and result.losses[-1] < result.losses[0]  # new: the second half of the answer

    trained = {name: p for name, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert any(".casa_attn." in name for name in trained) and any(".visual.merger." in name for name in trained)
    assert all(p.abs().max() > 0 for name, p in trained.items() if "lora_B" in name)  # B starts at zero

    model = result.model.eval()
    examples = [NaturalVQA(2, seed=5, kinds=("corner",))[i] for i in range(2)]
    batch = CasaDataCollator(result.processor)(examples)
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(resolve_model("casa-smollm2")), output).eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        assert (reloaded(**batch).logits - adapted).abs().max() <= 1e-5
        with reloaded.disable_adapter():
            assert (reloaded(**batch).logits - adapted).abs().max() > 1e-3  # the adapter changes the model


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--kept-kinds", "corner"], "--kept-kinds must list known kinds other than 'corner'"),
        (["--kept-kinds", "size"], "--kept-kinds must list known kinds"),
        (["--replay", "1"], "--replay must be in [0, 1)"),
    ],
)
def test_bad_options_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        load_example().parse_args(["--output-dir", str(tmp_path / "new"), *argv])
    assert message in capsys.readouterr().err


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_example().parse_args(["--output-dir", str(tmp_path)])
    assert "already exists; pass --overwrite" in capsys.readouterr().err
