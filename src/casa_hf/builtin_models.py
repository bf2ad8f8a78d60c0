"""Built-in model names the CLI accepts wherever it takes `--model`, resolved to a local checkpoint folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TINY_MODEL = Path(__file__).resolve().parent / "demo_model"

# name -> function returning a local folder that `from_pretrained` loads (a name may assemble its folder on demand)
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "tiny": lambda: TINY_MODEL,
}
DEFAULT_MODEL = "tiny"


def resolve_model(name_or_folder: str | Path | None) -> Path:
    """A built-in name (`tiny`, ...) or a checkpoint folder -> the folder to load; `None` is the default model."""
    name_or_folder = DEFAULT_MODEL if name_or_folder is None else name_or_folder
    if str(name_or_folder) in BUILTIN_MODELS:
        return BUILTIN_MODELS[str(name_or_folder)]()
    folder = Path(name_or_folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {name_or_folder!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "nor a folder holding a config.json"
        )
    return folder
