"""`casa-hf train` launched as the README says: one process, two CPU processes with torchrun (DDP, and FSDP2 with
`--fsdp`), resumed from a checkpoint, and under bf16 mixed precision. Each run is a few steps of the default model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from casa_hf.training.train import RUN_SUMMARY, ModelSize, build_model, build_processor

pytestmark = pytest.mark.slow  # torchrun

# global batch 4, 56-px images, 3 steps at a constant learning rate: checkpoints after step 2
TRAIN = [
    "train",
    "--steps",
    "3",
    "--batch-size",
    "4",
    "--image-size",
    "56",
    "--warmup-steps",
    "0",
    "--eval-examples",
    "0",
]
TWO_CPU_PROCESSES = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # = `torchrun ...`
WEIGHT_TOLERANCE = 1e-4  # gradients all-reduced (or reduce-scattered) in another order: float32 rounding after Adam


def casa_hf_train(folder, *options: str, launcher: tuple[str, ...] = ()) -> dict:
    """Run `[launcher] -m casa_hf.cli train` in a fresh process; return the run's `training_run.json`."""
    command = [sys.executable, *launcher, "-m", "casa_hf.cli", *TRAIN, "--output-dir", str(folder), *options]
    result = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((folder / RUN_SUMMARY).read_text())


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_process")
    return folder, casa_hf_train(folder, "--save-steps", "2")


def test_one_process_run_saves_model_processor_and_checkpoints(one_process):
    folder, summary = one_process
    assert summary["world_size"] == 1 and summary["parallelism"] == "single process"
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    assert (folder / "model.safetensors").is_file() and (folder / "processor_config.json").is_file()
    assert (folder / "checkpoint-2" / "optimizer.pt").is_file()  # --save-steps 2


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(one_process, tmp_path):
    folder, reference = one_process
    summary = casa_hf_train(tmp_path, launcher=TWO_CPU_PROCESSES)
    assert summary["world_size"] == 2 and summary["parallelism"] == "ddp"
    assert summary["per_process_batch_size"] == 2 and summary["global_batch_size"] == 4
    assert summary["parameters_on_main_process"] == summary["parameters"]  # replicas
    assert summary["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    weights = load_file(tmp_path / "model.safetensors")
    assert max_difference(weights, load_file(folder / "model.safetensors")) <= WEIGHT_TOLERANCE


LEAVES_ITS_PROCESS_GROUP = """
import sys, torch.distributed as dist
from casa_hf.cli import main

destroy, destroyed = dist.destroy_process_group, []
dist.destroy_process_group = lambda *a, **k: destroyed.append(dist.get_world_size()) or destroy(*a, **k)
main(sys.argv[1:])
assert destroyed == [1] and not dist.is_initialized(), destroyed
"""


def test_a_launched_process_leaves_its_process_group_before_exit(tmp_path):
    """A gloo group alive at interpreter exit can abort a launched process (SIGABRT) after training succeeded: each
    process destroys its group when the run is done. Launched as torchrun does, with a world of one process."""
    launch = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    launch["MASTER_PORT"] = str(29_500 + os.getpid() % 1000)
    command = [sys.executable, "-c", LEAVES_ITS_PROCESS_GROUP, *TRAIN[:3], "--output-dir", str(tmp_path)]
    result = subprocess.run(command, env=os.environ | launch, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_fsdp_shards_and_saves_a_full_checkpoint_equal_to_one_process(one_process, tmp_path):
    folder, reference = one_process
    summary = casa_hf_train(tmp_path, "--fsdp", launcher=TWO_CPU_PROCESSES)
    assert summary["world_size"] == 2 and summary["parallelism"] == "fsdp"
    assert summary["parameters_on_main_process"] <= 0.55 * summary["parameters"]  # each process holds half
    assert summary["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    sharded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    single = AutoModelForImageTextToText.from_pretrained(folder)
    assert sharded.lm_head.weight is sharded.model.language_model.embed_tokens.weight  # still tied after reload
    assert max_difference(sharded.state_dict(), single.state_dict()) <= WEIGHT_TOLERANCE


def test_resumed_run_equals_the_uninterrupted_one(one_process, tmp_path):
    folder, reference = one_process
    shutil.copytree(folder / "checkpoint-2", tmp_path / "checkpoint-2")
    summary = casa_hf_train(tmp_path, "--resume")
    assert summary["steps"] == 3 and summary["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    weights = load_file(tmp_path / "model.safetensors")
    assert max_difference(weights, load_file(folder / "model.safetensors")) <= 1e-6


def test_bf16_run_with_the_qwen_recipe_trains_the_last_vision_block_only(one_process, tmp_path):
    _, reference = one_process
    summary = casa_hf_train(tmp_path, "--bf16", "--recipe", "qwen", "--gradient-checkpointing")
    assert summary["mixed_precision"] == "bf16"
    assert summary["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-2)  # before any update
    initial = build_model("casa", build_processor(56), ModelSize(), seed=0, image_positions="raster").state_dict()
    trained = load_file(tmp_path / "model.safetensors")
    moved = {name for name in trained if not torch.equal(trained[name], initial[name])}
    assert any(name.startswith("model.visual.blocks.2.") for name in moved)  # the default: 1 of 3 vision blocks
    assert any(".casa_attn." in name for name in moved)
    assert not any(name.startswith(("model.visual.blocks.0.", "model.visual.blocks.1.")) for name in moved)
    assert not any(".self_attn." in name or ".mlp." in name for name in moved if "visual" not in name)
