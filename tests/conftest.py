"""Fixtures several test modules share; the tiny random models and their inputs are plain functions in `tiny.py`.

Tests marked `slow` need Chromium, torchrun, the real SmolLM2 or a long compile: `python -m pytest tests -m "not slow"`
is the quick lane while working; the README's test command runs everything.
"""

import pytest

from casa_hf.smollm2.gguf_llm import load_gguf_llm, smollm2_gguf


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from its GGUF file, on its own (the LLM CASA-SmolLM2 is built on): model, tokenizer."""
    return load_gguf_llm(smollm2_gguf())
