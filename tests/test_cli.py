"""The command line as a user meets it: a mistake gets one line naming it and status 2 (as argparse answers a bad
option), never a traceback; every option says what it does and its default; Kyutai's released checkpoints are
recognised and refused with what to do instead."""

import argparse
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import casa_hf  # noqa: F401
from casa_hf.builtin_models import TINY_MODEL
from casa_hf.cli import build_parser, main
from casa_hf.kyutai_release import UnsupportedCheckpointError


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must exit with status 2. Returns what it printed to stderr."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2, argv
    return capsys.readouterr().err


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subcommands(sub)


@pytest.fixture
def kyutai_release(tmp_path):
    """A folder laid out as Kyutai's released checkpoints are, where casa_hf can tell: model type "casa" (the case
    where loading would otherwise go ahead) and the vision tower's weights under `image_prefix.enc.visual`."""
    folder = tmp_path / "CASA-Helium1-VL-2B"
    folder.mkdir()
    config = json.loads((TINY_MODEL / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling.CASAModel"}}))
    save_file({"image_prefix.enc.visual.patch_embed.proj.weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["demo", "--model", "casa-smollm3"], "'casa-smollm3' is neither a built-in model (tiny, casa-smollm2)"),
        (["demo", "--images", "0"], "argument --images: must be a positive integer, got 0"),
        (["demo", "--frames", "-1"], "argument --frames: must be 0 or a positive integer, got -1"),
        (["serve", "--port", "99999"], "argument --port: must be a TCP port (0-65535), got 99999"),
        (["serve", "--model", "nothing-here"], "'nothing-here' is neither a built-in model"),
        (["evaluate", "--examples", "0"], "argument --examples: must be a positive integer, got 0"),
        (["train", "--output-dir", "x", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["convert", "qwen2_5_vl", "no/such/folder", "out"], "argument source: 'no/such/folder' does not exist"),
        (["convert", "llm", "no/llm", "no/vision", "out"], "argument llm: 'no/llm' does not exist"),
    ],
)
def test_bad_options_are_refused_before_any_work(argv, problem, capsys):
    assert problem in _refused(argv, capsys)


def test_mistakes_found_while_running_print_one_line(tmp_path, capsys):
    """Found only once the command runs (the output exists, the source holds no checkpoint): one line, status 2."""
    taken = tmp_path / "taken"
    taken.mkdir()
    err = _refused(["export", "tiny", str(taken)], capsys)
    assert err == f"casa-hf export: error: {taken} already exists; pass overwrite=True (--overwrite) to replace it\n"
    err = _refused(["convert", "qwen2_5_vl", str(tmp_path), str(tmp_path / "out")], capsys)
    assert err.count("\n") == 1 and "has no config.json" in err and not (tmp_path / "out").exists(), err
    err = _refused(["train", "--output-dir", str(tmp_path / "run"), "--fsdp", "--save-steps", "5"], capsys)
    assert err.startswith("casa-hf train: error: save_steps and resume are not available with fsdp"), err
    assert not (tmp_path / "run").exists()


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The `casa-hf` entry point itself, as a user runs it."""
    (tmp_path / "taken").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "casa_hf", "export", "tiny", str(tmp_path / "taken")], capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_every_option_says_what_it_does_and_its_default():
    for name, sub in _subcommands(build_parser()):
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"casa-hf {name} {action.option_strings[0]} has no help"
        shown = " ".join(sub.format_help().split())
        for option, default in {"--seed": "0", "--steps": None, "--host": "127.0.0.1", "--port": "8000"}.items():
            if option in shown and name not in ("convert", "demo"):
                expected = default if default is not None else str(sub.get_default(option[2:].replace("-", "_")))
                assert f"(default: {expected})" in shown, (name, option, shown)
    demo = dict(_subcommands(build_parser()))["demo"]
    assert "from the clock, printed" in " ".join(demo.format_help().split())


def test_kyutai_releases_are_refused_with_what_to_do(kyutai_release, capsys):
    from transformers import AutoModel

    with pytest.raises(UnsupportedCheckpointError, match=r"Kyutai's released CASA checkpoints .*image_prefix.enc"):
        AutoModel.from_pretrained(kyutai_release)
    err = _refused(["demo", "--model", str(kyutai_release)], capsys)
    problem = err.splitlines()[-1]  # after argparse's usage line, as for any bad option
    assert problem.startswith("casa-hf demo: error: argument --model: ") and "Kyutai" in problem, err
    assert "transformers==4.51.3, trust_remote_code=True" in problem and "casa-hf convert qwen2_5_vl" in problem


def test_a_train_smollm2_run_folder_is_a_model(tmp_path, monkeypatch, capsys):
    """`--model` takes a `casa-hf train-smollm2` run's folder (its recipe and added weights, no config.json): it is
    assembled with SmolLM2 as its recipe says (`assemble_casa_smollm2`) and asked the English questions; a folder
    missing either file is still refused before any work."""
    import casa_hf.smollm2.assembly as assembly
    from casa_hf.builtin_models import questions_for, resolve_model

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text("{}")
    err = _refused(["evaluate", "--model", str(run)], capsys)
    assert "neither a built-in model" in err and "train-smollm2 run" in err, err
    (run / "added.safetensors").write_bytes(b"")
    monkeypatch.setattr(assembly, "assemble_casa_smollm2", lambda folder: tmp_path / "assembled" / folder.name)
    assert resolve_model(str(run)) == tmp_path / "assembled" / "run" and questions_for(run) == "natural"
