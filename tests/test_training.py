"""Training support: assistant-only labels, packing, freezing recipes, LoRA, two-process training."""

import pytest
import torch
from transformers import AutoModel

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


def test_two_process_training_step_saves_a_checkpoint_that_reloads(processor, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_step, args=(2, str(tmp_path)), nprocs=2, join=True)
    reloaded = AutoModel.from_pretrained(tmp_path / "checkpoint")
    saved = torch.load(tmp_path / "rank0_weights.pt")
    for name, parameter in reloaded.named_parameters():
        assert torch.equal(parameter, saved[name]), name
    initial = build_model("casa", processor, TINY)
    moved = [n for n, p in initial.named_parameters() if not torch.equal(p, saved[n])]
    assert moved  # the step changed the weights


def _distributed_step(rank: int, world_size: int, folder: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    processor = build_processor(image_size=56)
    model = build_model("casa", processor, TINY)  # same seed on both ranks
    ddp = DistributedDataParallel(model)
    examples = [SyntheticVQA(8, seed=5, image_size=56)[i] for i in range(rank * 4, rank * 4 + 4)]
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ddp(**CasaDataCollator(processor)(examples)).loss.backward()
    optimizer.step()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {n: p.detach().clone() for n, p in model.named_parameters()})
    if rank == 0:
        for name, parameter in gathered[1].items():
            assert torch.equal(parameter, gathered[0][name]), name  # DDP kept the replicas identical
        model.save_pretrained(os.path.join(folder, "checkpoint"))
        processor.save_pretrained(os.path.join(folder, "checkpoint"))
        torch.save(gathered[0], os.path.join(folder, "rank0_weights.pt"))
    dist.barrier()
    dist.destroy_process_group()


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
          "--recipe", "full"])
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
    )
