"""Built-in model names the CLI accepts wherever it takes `--model`, resolved to a local checkpoint folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .kyutai_release import refuse_kyutai_release

TINY_MODEL = Path(__file__).resolve().parent / "demo_model"


def _casa_smollm2() -> Path:
    """The shipped CASA-SmolLM2 weights joined with the installed SmolLM2 (assembled once into a cached folder)."""
    from .smollm2.assembly import assemble_casa_smollm2

    return assemble_casa_smollm2()


# name -> function returning a local folder that `from_pretrained` loads (a name may assemble its folder on demand)
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "tiny": lambda: TINY_MODEL,
    "casa-smollm2": _casa_smollm2,
}
DEFAULT_MODEL = "tiny"  # what `serve` and `evaluate` load without `--model`: needs nothing installed, starts at once
DEMO_MODEL = "casa-smollm2"  # what `casa-hf demo` shows without `--model`: a real LLM that sees
# what each built-in model is asked: the synthetic questions answered in one word, or English ones in sentences
BUILTIN_QUESTIONS = {"tiny": "synthetic", "casa-smollm2": "natural"}


def is_smollm2_run(folder: str | Path) -> bool:
    """Whether `folder` is a `casa-hf train-smollm2` run (added weights and their recipe, no checkpoint): it loads
    as CASA-SmolLM2 with those weights, assembled with the installed SmolLM2 as the shipped ones are."""
    folder = Path(folder)
    return (
        not (folder / "config.json").is_file()
        and (folder / "recipe.json").is_file()
        and (folder / "added.safetensors").is_file()
    )


def check_model(name_or_folder: str | Path) -> None:
    """Refuse, before any work, what is neither a built-in name, a loadable checkpoint folder nor a `casa-hf
    train-smollm2` run (e.g. a typo, or one of Kyutai's released checkpoints)."""
    if str(name_or_folder) in BUILTIN_MODELS:
        return
    folder = Path(name_or_folder)
    if is_smollm2_run(folder):
        return
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {str(name_or_folder)!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
            "a folder holding a config.json nor a train-smollm2 run (recipe.json, added.safetensors)"
        )
    refuse_kyutai_release(folder)


def questions_for(name_or_folder: str | Path) -> str:
    """What `casa-hf demo` and `casa-hf evaluate` ask a model: "synthetic" (one-word answers, the tiny model's
    `training.synthetic_vqa`) or "natural" (English questions, sentence answers, CASA-SmolLM2's
    `smollm2.natural_vqa`). A built-in model by its name; a folder by its tokenizer: a word-level one (`casa-hf
    train`'s) knows only the synthetic questions' words, any other is a real LLM's."""
    if str(name_or_folder) in BUILTIN_QUESTIONS:
        return BUILTIN_QUESTIONS[str(name_or_folder)]
    tokenizer = Path(name_or_folder) / "tokenizer.json"
    word_level = tokenizer.is_file() and json.loads(tokenizer.read_text())["model"]["type"] == "WordLevel"
    return "synthetic" if word_level else "natural"


def resolve_model(name_or_folder: str | Path | None) -> Path:
    """A built-in name (`tiny`, ...) or a checkpoint folder -> the folder to load; `None` is the default model."""
    name_or_folder = DEFAULT_MODEL if name_or_folder is None else name_or_folder
    check_model(name_or_folder)
    if str(name_or_folder) in BUILTIN_MODELS:
        return BUILTIN_MODELS[str(name_or_folder)]()
    if is_smollm2_run(name_or_folder):  # its recipe (placement included) builds the model
        from .smollm2.assembly import assemble_casa_smollm2

        return assemble_casa_smollm2(Path(name_or_folder))
    return Path(name_or_folder)


def export_model(name_or_folder: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write a built-in model (or any checkpoint folder) as a standard checkpoint folder at `output`."""
    import shutil

    from .checkpoint_io import staged_output

    source = resolve_model(name_or_folder)
    with staged_output(output, overwrite) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
    return Path(output)
