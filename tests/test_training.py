"""Training support: assistant-only labels, packing, freezing recipes, LoRA, the train command's options and errors
(launched runs: test_launch.py)."""

from pathlib import Path

import pytest
import torch

from casa_hf.training import IGNORE_INDEX, CasaDataCollator, SyntheticVQA, apply_freezing_recipe
from casa_hf.training.train import ModelSize, build_model, build_processor

TINY = ModelSize(
    hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_depth=2, vision_hidden=32, vision_heads=2
)


@pytest.fixture(scope="module")
def processor():
    return build_processor(image_size=56)


@pytest.fixture(scope="module")
def examples():
    return [SyntheticVQA(7, seed=3, image_size=56)[i] for i in range(7)]  # every kind once, "change" included


def test_labels_cover_only_the_assistant_answer(processor, examples):
    batch = CasaDataCollator(processor)(examples[:3])
    tokenizer = processor.tokenizer
    for row in range(3):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        answer = f"{examples[row]['answer']} . <|im_end|>"
        assert labelled == tokenizer(answer, add_special_tokens=False)["input_ids"]
        kept = batch["labels"][row] != IGNORE_INDEX
        assert torch.equal(batch["input_ids"][row][kept], batch["labels"][row][kept])


def per_token_losses(model, batch) -> list[torch.Tensor]:
    """Loss of every labelled token, in reading order (row by row)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    return losses[labels[:, 1:] != IGNORE_INDEX]


@pytest.mark.parametrize("kind,attn", [("casa", "sdpa"), ("casa", "eager"), ("cross_attention", "sdpa")])
def test_packed_batch_loss_equals_separate_conversations(processor, examples, kind, attn):
    model = build_model(kind, processor, TINY).eval()
    model.set_attn_implementation({"text_config": attn, "vision_config": "sdpa"})
    packed = CasaDataCollator(processor, pack=True, max_length=160)(examples)
    assert packed["input_ids"].shape[0] < len(examples)  # several conversations share a row
    assert (packed["position_ids"][:, 1:] == 0).any()  # positions restart inside rows
    separate = torch.cat([per_token_losses(model, CasaDataCollator(processor)([e])) for e in examples])
    packed_losses = per_token_losses(model, packed)
    # packing keeps conversation order inside rows and rows in order, so the labelled tokens line up
    assert packed_losses.shape == separate.shape
    assert (packed_losses - separate).abs().max() <= 1e-5


def test_packing_without_segment_handling_would_leak(processor, examples, monkeypatch):
    """The packed test above can fail: without the per-conversation windows, the losses change."""
    import casa_hf.modeling_casa as modeling

    model = build_model("casa", processor, TINY).eval()
    packed = CasaDataCollator(processor, pack=True, max_length=160)(examples)
    reference = per_token_losses(model, packed)
    monkeypatch.setattr(modeling, "_segment_starts", lambda position_ids, token_valid: None)
    assert (per_token_losses(model, packed) - reference).abs().max() > 1e-4


@pytest.mark.parametrize("recipe", ["qwen", "full", "casa_only"])
def test_freezing_recipes_train_only_what_they_name(processor, examples, recipe):
    model = build_model("casa", processor, TINY).train()
    counts = apply_freezing_recipe(model, recipe, trainable_vision_blocks=1)
    assert counts["trainable"] > 0 and counts["frozen"] > 0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**CasaDataCollator(processor)(examples[:4])).loss.backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        assert changed == parameter.requires_grad, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".casa_attn." in n for n in trainable)
    assert any(n.startswith("model.visual.blocks.1.") for n in trainable) == (recipe != "casa_only")
    assert not any(n.startswith("model.visual.blocks.0.") for n in trainable)
    assert any("self_attn" in n for n in trainable) == (recipe == "full")


def test_lora_trains_saves_reloads_and_merges(processor, examples, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = build_model("casa", processor, TINY)
    target = r".*language_model\.layers\.\d+\.(self_attn|casa_attn)\.(q_proj|k_proj|v_proj|o_proj)"
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=target))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("casa_attn" in n for n in trainable) and any("self_attn" in n for n in trainable)
    batch = CasaDataCollator(processor)(examples[:4])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]  # frozen random base: the adapters alone pull the loss down

    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = build_model("casa", processor, TINY)  # same seed: the same base weights
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (reloaded(**batch).logits - adapted).abs().max() <= 1e-5
        merged = reloaded.merge_and_unload()
        # W + s * B @ A folded into one matrix: fp32 re-association only
        assert (merged(**batch).logits - adapted).abs().max() <= 1e-3


def test_repeated_kinds_are_drawn_more_often():
    from casa_hf.training.synthetic_vqa import TRAINING_MIX

    dataset = SyntheticVQA(2 * len(TRAINING_MIX), image_size=56, kinds=TRAINING_MIX)
    drawn = [dataset[i]["kind"] for i in range(len(dataset))]
    assert drawn.count("digit") == 2 * TRAINING_MIX.count("digit") == 6
    assert drawn.count("colour") == 2
    with pytest.raises(ValueError, match="Unknown question kinds"):
        SyntheticVQA(4, kinds=("colour", "colours"))


def test_train_command_passes_every_option_to_the_training_config(monkeypatch, tmp_path):
    import casa_hf.training.train as training
    from casa_hf.cli import main

    seen = []
    monkeypatch.setattr(training, "train", lambda config: seen.append(config) or (None, None, None))
    main(["train", "--output-dir", str(tmp_path / "defaults"), "--eval-examples", "0"])
    assert seen[-1] == training.TrainConfig(str(tmp_path / "defaults"))
    # fmt: off
    main(["train", "--output-dir", str(tmp_path / "set"), "--eval-examples", "0", "--kind", "cross_attention",
          "--steps", "7", "--batch-size", "3", "--learning-rate", "5e-4", "--warmup-steps", "2", "--image-size", "56",
          "--seed", "4", "--workers", "2", "--image-positions", "insertion", "--kinds", "colour,digit,digit", "--pack",
          "--recipe", "full", "--trainable-vision-blocks", "2", "--gradient-checkpointing", "--bf16", "--fsdp",
          "--overwrite"])
    # fmt: on
    assert seen[-1] == training.TrainConfig(
        str(tmp_path / "set"),
        kind="cross_attention",
        steps=7,
        batch_size=3,
        learning_rate=5e-4,
        warmup_steps=2,
        image_size=56,
        seed=4,
        workers=2,
        image_positions="insertion",
        kinds=("colour", "digit", "digit"),
        pack=True,
        recipe="full",
        trainable_vision_blocks=2,
        gradient_checkpointing=True,
        bf16=True,
        fsdp=True,
        overwrite=True,
    )
    main(["train", "--output-dir", str(tmp_path / "resumed"), "--eval-examples", "0", "--save-steps", "5", "--resume"])
    assert seen[-1] == training.TrainConfig(str(tmp_path / "resumed"), save_steps=5, resume=True)


def test_train_smollm2_command_passes_every_option_to_the_training_config(monkeypatch, tmp_path):
    import casa_hf.smollm2.train as smollm2_training
    from casa_hf.cli import main
    from casa_hf.smollm2.model import CasaSmolLM2Recipe

    seen = []

    def train(config):  # what the trainer leaves behind that the command then writes to
        seen.append(config)
        Path(config.output_dir).mkdir()
        return None, None

    monkeypatch.setattr(smollm2_training, "train_casa_smollm2", train)
    monkeypatch.setattr(smollm2_training, "natural_accuracy", lambda *args: {})
    main(["train-smollm2", "--output-dir", str(tmp_path / "defaults")])
    assert seen[-1] == smollm2_training.SmolLM2TrainConfig(str(tmp_path / "defaults"))
    # fmt: off
    main(["train-smollm2", "--output-dir", str(tmp_path / "set"), "--steps", "7", "--batch-size", "3",
          "--learning-rate", "5e-4", "--casa-layers", "28,29", "--vision-depth", "2", "--vision-steps", "5",
          "--seed", "4", "--stop-after", "6", "--kinds", "colour,prose", "--text-only-windows", "attend",
          "--freeze-vision", "--placement", "parallel", "--window-images", "consecutive"])
    # fmt: on
    recipe = CasaSmolLM2Recipe(
        casa_layers=(28, 29),
        vision_depth=2,
        text_only_windows="attend",
        placement="parallel",
        window_images="consecutive",
    )
    assert seen[-1] == smollm2_training.SmolLM2TrainConfig(
        str(tmp_path / "set"),
        7,
        3,
        5e-4,
        seed=4,
        vision_steps=5,
        kinds=("colour", "prose"),
        freeze_vision=True,
        stop_after=6,
        recipe=recipe,
    )


def test_train_smollm2_goes_on_from_a_run_with_its_recipe(monkeypatch, tmp_path):
    import json
    from dataclasses import asdict, replace

    import casa_hf.smollm2.train as smollm2_training
    from casa_hf.cli import main
    from casa_hf.smollm2.model import CasaSmolLM2Recipe

    run = tmp_path / "run"
    run.mkdir()
    recipe = CasaSmolLM2Recipe(casa_layers=(27, 28, 29), vision_depth=2)
    # written before the placement and the window rule
    legacy = {name: value for name, value in asdict(recipe).items() if name not in ("placement", "window_images")}
    (run / "recipe.json").write_text(json.dumps({"recipe": legacy}))
    seen, train = [], smollm2_training.train_casa_smollm2
    monkeypatch.setattr(smollm2_training, "train_casa_smollm2", lambda config: seen.append(config) or (None, None))
    monkeypatch.setattr(smollm2_training, "natural_accuracy", lambda *args: {})
    (tmp_path / "more").mkdir()
    main(["train-smollm2", "--output-dir", str(tmp_path / "more"), "--init-from", str(run), "--steps", "3"])
    assert seen[-1].recipe == recipe and seen[-1].init_from == str(run) and seen[-1].steps == 3
    # the run's block and windows unless asked for others; a recipe.json from before them: sequential, each
    assert (seen[-1].recipe.placement, seen[-1].recipe.window_images) == ("sequential", "each")
    # fmt: off
    main(["train-smollm2", "--output-dir", str(tmp_path / "more"), "--init-from", str(run), "--placement", "parallel",
          "--window-images", "consecutive"])
    # fmt: on
    assert seen[-1].recipe == replace(recipe, placement="parallel", window_images="consecutive")
    parallel = tmp_path / "parallel"
    parallel.mkdir()
    (parallel / "recipe.json").write_text(json.dumps({"recipe": asdict(seen[-1].recipe)}))
    main(["train-smollm2", "--output-dir", str(tmp_path / "more"), "--init-from", str(parallel)])
    assert (seen[-1].recipe.placement, seen[-1].recipe.window_images) == ("parallel", "consecutive")
    # a trained tower is not trained again from its first stage
    config = smollm2_training.SmolLM2TrainConfig(str(tmp_path / "x"), init_from=str(run), vision_steps=5)
    with pytest.raises(ValueError, match="init_from starts from a trained vision tower; vision_steps"):
        train(config)


@pytest.mark.parametrize(
    "options,message",
    [
        (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["--steps", "-1"], "argument --steps: must be a positive integer, got -1"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
        (["--trainable-vision-blocks", "-1"], "argument --trainable-vision-blocks: must be 0 or a positive integer"),
        (["--save-steps", "-2"], "argument --save-steps: must be 0 or a positive integer, got -2"),
        (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    ],
)
def test_train_command_rejects_bad_options(tmp_path, capsys, options, message):
    from casa_hf.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--output-dir", str(tmp_path), *options])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "holding,options,message",
    [
        ("config.json", [], "already holds a trained model or checkpoints; pass --resume"),
        ("checkpoint-5", [], "to continue from its last checkpoint-N, or --overwrite"),
        (None, ["--resume"], "holds no checkpoint-N folder to resume from"),
        (None, ["--fsdp", "--save-steps", "5"], "save_steps and resume are not available with fsdp"),
        (None, ["--kind", "insertion", "--recipe", "casa_only"], "leaves nothing to train"),
        (None, ["--trainable-vision-blocks", "4", "--recipe", "qwen"], "must be within [0, 3]"),
    ],
)
def test_train_command_refuses_runs_that_would_go_wrong(tmp_path, capsys, holding, options, message):
    """Before any training step: an output dir holding a run is neither overwritten nor resumed silently, and a
    run that would train nothing (insertion models have no CASA sub-layers) says so, in one line (status 2)."""
    from casa_hf.cli import main

    if holding == "config.json":
        (tmp_path / holding).write_text("{}")
    elif holding:
        (tmp_path / holding).mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["train", "--output-dir", str(tmp_path), "--image-size", "56", *options])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("casa-hf train: error: ") and message in err, err
    assert err.count("\n") == 1 and not any(path.name.startswith("checkpoint-1") for path in tmp_path.iterdir())


def test_global_batch_must_split_evenly_over_the_processes(tmp_path, monkeypatch, capsys):
    from casa_hf.cli import main

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as stop:
        main(["train", "--output-dir", str(tmp_path)])
    assert stop.value.code == 2 and "batch_size=32 must be divisible by the 3 processes" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["qwen", "full", "casa_only"])
def test_recipes_default_to_the_last_eighth_of_the_vision_tower(processor, recipe):
    from casa_hf.training.freezing import default_trainable_vision_blocks

    assert [default_trainable_vision_blocks(depth) for depth in (3, 8, 32)] == [1, 1, 4]  # 4 of 32: released models
    model = build_model("casa", processor, ModelSize())  # `casa-hf train`'s model: 3 vision blocks
    counts = apply_freezing_recipe(model, recipe)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    vision_blocks = {n.split(".")[3] for n in trainable if n.startswith("model.visual.blocks.")}
    assert counts["trainable"] > 0 and vision_blocks == (set() if recipe == "casa_only" else {"2"})


@pytest.mark.parametrize("kind,layer", [("casa", "CasaDecoderLayer"), ("insertion", "Qwen2_5_VLDecoderLayer")])
def test_fsdp_units_are_each_kinds_decoder_layers_and_vision_blocks(processor, kind, layer):
    import re

    from casa_hf.training.train import FSDP_PLAN

    model = build_model(kind, processor, TINY)
    units = [module for name, module in model.named_modules() if re.sub(r"\.\d+$", ".*", name) in FSDP_PLAN]
    assert {type(module).__name__ for module in units} == {layer, "Qwen2_5_VLVisionBlock"}
    assert len(units) == TINY.layers + TINY.vision_depth


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_train_command_builds_the_block_asked_for(tmp_path, monkeypatch, placement):
    import casa_hf.training.train as training
    from casa_hf.cli import main

    asked = []

    def record(config):
        asked.append(config)
        raise KeyboardInterrupt  # stop before training: the config is what this test checks

    monkeypatch.setattr(training, "train", record)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--output-dir", str(tmp_path), "--placement", placement])
    [config] = asked
    model = training.build_model(config.kind, build_processor(56), TINY, placement=config.placement)
    assert config.placement == placement and model.config.casa_placement == placement
