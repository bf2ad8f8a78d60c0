"""Kyutai's released CASA checkpoints (`kyutai/CASA-Helium1-VL-2B`, `kyutai/CASA-Qwen2_5-VL-3B` and their -Shared /
-LiveCC variants) are Hub remote code pinned to transformers 4.51.3, with a weight layout of their own that is not
public outside the Hub, so casa_hf cannot load or convert them. They are recognised by where their vision tower sits,
so that loading one says so instead of building a CASA model whose weights all stay random."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

RELEASE_VISION_PREFIXES = ("image_prefix.visual.", "image_prefix.enc.visual.")


class UnsupportedCheckpointError(ValueError):
    """A checkpoint casa_hf recognises but cannot load."""


def _weight_names(folder: Path) -> list[str]:
    """Tensor names of a folder's safetensors files, from the index or the file headers (no tensor is read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            names += list(handle.keys())
    return names


def refuse_kyutai_release(folder: str | Path) -> None:
    """Raise `UnsupportedCheckpointError` when the local `folder` holds one of Kyutai's released CASA checkpoints."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    prefix = next(
        (p for name in _weight_names(folder) for p in RELEASE_VISION_PREFIXES if name.startswith(p)),
        None,
    )
    if prefix is None:
        return
    raise UnsupportedCheckpointError(
        f"{folder} holds one of Kyutai's released CASA checkpoints (its vision tower sits at {prefix}*): they are "
        "Hub remote code pinned to transformers 4.51.3 with a weight layout of their own, which casa_hf cannot load "
        "or convert. Run it with its own code (transformers==4.51.3, trust_remote_code=True, as its model card "
        "shows), or build a casa_hf model from Qwen2.5-VL or a text LLM with `casa-hf convert qwen2_5_vl` / "
        "`casa-hf convert llm`."
    )


__all__ = ["RELEASE_VISION_PREFIXES", "UnsupportedCheckpointError", "refuse_kyutai_release"]
