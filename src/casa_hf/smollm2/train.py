"""Train CASA-SmolLM2 on the natural-language synthetic VQA data: SmolLM2 frozen, the added weights train.

The loss is taken only where there are labels: the LM head (49k rows) runs on the answer tokens, not on every
position, and the frozen blocks below the lowest CASA layer run without an autograd graph.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..training.collator import IGNORE_INDEX, CasaDataCollator
from ..training.synthetic_vqa import MULTI_KINDS, SINGLE_KINDS, TRAINING_MIX
from ..training.train import generate_answers
from .model import (
    CasaSmolLM2Recipe,
    added_state_dict,
    build_casa_smollm2,
    freeze_smollm2,
    load_added_weights,
    recipe_from_file,
    unwrap_peft,
    with_sa_lora,
)
from .natural_vqa import PROSE, STREAM, TEXT, NaturalVQA, grade
from .vision_pretraining import pretrain_vision_tower

HELD_OUT_SEED_OFFSET = 10_000
# `casa-hf train`'s mix, plus the kinds the previous CASA-SmolLM2 weights scored lowest on (colour in held-out
# phrasings 0.45, "what changed" 0.35)
SMOLLM2_MIX = TRAINING_MIX + ("colour", "change")
FIXED_TEST_SET = 28  # held-out phrasings, 4 questions per kind (the single images and "what changed")
EVALUATED_KINDS = (*SINGLE_KINDS, *MULTI_KINDS, STREAM)


@dataclass
class SmolLM2TrainConfig:
    output_dir: str
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    seed: int = 0
    train_examples: int = 200_000
    kinds: tuple[str, ...] = SMOLLM2_MIX
    # stage 1: steps (batches of `vision_batch_size` images) in which the vision tower learns the scenes'
    # attributes directly (`vision_pretraining`), before the CASA layers learn to read it (it goes on learning in
    # stage 2 unless `freeze_vision`)
    vision_steps: int = 0
    vision_batch_size: int = 32
    freeze_vision: bool = False  # the vision tower and projector do not train in stage 2 (only the CASA layers)
    save_every: int = 100  # added weights written every this many steps (a run stopped early keeps its latest)
    stop_after: int | None = None  # stop after this many steps of the `steps`-long schedule (None: run it all)
    # a run's folder: start from its added weights; with another recipe (e.g. more CASA layers, an SA LoRA), from
    # those both have, the others starting as built (CASA layers and LoRA at zero output: as that run's model)
    init_from: str | None = None
    recipe: CasaSmolLM2Recipe = field(default_factory=CasaSmolLM2Recipe)


class FrozenPrefix(nn.Module):
    """Stands in for the frozen blocks below the lowest CASA layer while training.

    Their output depends on the token ids only (images enter through the CASA layers above), and the templated
    prompts and answers repeat, so each distinct sequence's output is computed once and then looked up: the forward
    pass of those blocks disappears from almost every step. Use it through `frozen_prefix(model)`.
    """

    attention_type = "full_attention"

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.store: dict[tuple[int, ...], torch.Tensor] = {}
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None

    def forward(
        self, hidden_states: torch.Tensor, image_features: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """A decoder block's call (`image_features` are for CASA layers; these blocks have none)."""
        valid = self.attention_mask.bool()
        keys = [tuple(ids[keep].tolist()) for ids, keep in zip(self.input_ids, valid, strict=True)]
        missing = sorted({keys.index(key) for key in keys if key not in self.store})
        if missing:  # run the blocks on the new sequences only
            rows = torch.tensor(missing, device=hidden_states.device)
            size = hidden_states.shape[0]

            def pick(value):
                if isinstance(value, tuple):
                    return tuple(pick(v) for v in value)
                return value[rows] if torch.is_tensor(value) and value.ndim and value.shape[0] == size else value

            computed, kwargs = hidden_states[rows], {name: pick(value) for name, value in kwargs.items()}
            with torch.no_grad():
                for block in self.blocks:
                    computed = block(computed, **kwargs)
            for index, row in enumerate(missing):
                self.store[keys[row]] = computed[index, valid[row]].clone()
        out = torch.zeros_like(hidden_states)
        for row, key in enumerate(keys):
            out[row, valid[row]] = self.store[key]
        return out


class _Skip(nn.Module):
    attention_type = "full_attention"

    def forward(self, hidden_states: torch.Tensor, image_features: torch.Tensor | None = None, **kwargs):
        return hidden_states


@contextmanager
def frozen_prefix(model) -> Iterator[FrozenPrefix]:
    """Within the block, the frozen blocks below the lowest CASA layer are a `FrozenPrefix` (indices are kept, so
    parameter names do not move); right-padded batches only (the collator's training layout)."""
    layers = model.model.language_model.layers
    lowest = min(model.config.casa_layer_indices)
    original = list(layers)
    training = [name for name, p in layers[:lowest].named_parameters() if p.requires_grad]
    if training:  # their cached output would not follow their training
        raise ValueError(f"Blocks below the lowest CASA layer ({lowest}) must be frozen; layers.{training[0]} trains")
    prefix = FrozenPrefix(original[:lowest])
    for index in range(lowest):
        layers[index] = prefix if index == 0 else _Skip()
    try:
        yield prefix
    finally:
        for index in range(lowest):
            layers[index] = original[index]


@contextmanager
def without_casa(model) -> Iterator[None]:
    """Within the block no CASA sub-layer runs: on any tokens the model is its LLM (the teacher of distilled text)."""
    layers = [layer for layer in model.model.language_model.layers if getattr(layer, "has_casa", False)]
    for layer in layers:
        layer.has_casa = False
    try:
        yield
    finally:
        for layer in layers:
            layer.has_casa = True


class DistillingCollator(CasaDataCollator):
    """`CasaDataCollator`, and `distill` (`[rows]`) marking the prose examples: their text after the image (all of
    it without one) is trained to be predicted as the LLM alone predicts it (`PROSE` and `TEXT` in `natural_vqa`)."""

    def __call__(self, examples: list[dict]):
        batch = super().__call__(examples)
        distill = [example.get("kind") in (PROSE, TEXT) for example in examples]
        if any(distill):
            batch["distill"] = torch.tensor(distill)
        return batch


class AnswerOnlyLossTrainer(Trainer):
    """The Trainer with CASA-SmolLM2's loss: cross-entropy on answer tokens only through the LM head (49k rows) of
    those rows alone, distillation from the LLM itself on prose rows (`distillation_loss`); `prefix` is the frozen
    blocks' cache (`FrozenPrefix`), told each batch's ids."""

    prefix: FrozenPrefix | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        distill = inputs.pop("distill", None)
        if self.prefix is not None:
            self.prefix.input_ids, self.prefix.attention_mask = inputs["input_ids"], inputs["attention_mask"]
        wrapped, model = model, unwrap_peft(model)  # a PEFT model's adapters sit inside its base model's modules
        hidden = model.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if distill is not None:
            keep &= ~distill[:, None]
        logits = model.lm_head(hidden[keep])
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        if distill is None:
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum())
        else:  # the Trainer's token count is the labels'; here prose tokens count too
            divergence, distilled = self.distillation_loss(wrapped, inputs, hidden, distill)
            loss = (loss + divergence) / (keep.sum() + distilled)
        return (loss, logits) if return_outputs else loss

    def distillation_loss(self, wrapped, inputs: dict, hidden: torch.Tensor, distill: torch.Tensor):
        """KL divergence, summed over the distilled rows' positions from their image on (all positions of a row
        without one), from the LLM's own next-token distribution on the same tokens (the model without CASA or SA
        LoRA) to the model's; and the number of positions."""
        model = unwrap_peft(wrapped)
        ids, mask = inputs["input_ids"][distill], inputs["attention_mask"][distill]
        image = ids == model.config.image_token_id
        scored = ((image.cumsum(1) > 0) | ~image.any(1, keepdim=True))[:, :-1] & mask[:, 1:].bool()
        adapters_off = wrapped.disable_adapter() if hasattr(wrapped, "disable_adapter") else nullcontext()
        with torch.no_grad(), without_casa(model), adapters_off:
            if self.prefix is not None:
                self.prefix.input_ids, self.prefix.attention_mask = ids, mask
            embeds = model.get_input_embeddings()(ids)
            teacher = model.model.language_model(
                inputs_embeds=embeds, image_mask=torch.zeros_like(image), attention_mask=mask, use_cache=False
            ).last_hidden_state[:, :-1]
            teacher = model.lm_head(teacher[scored]).float().log_softmax(-1)
        student = model.lm_head(hidden[distill][scored]).float().log_softmax(-1)
        return F.kl_div(student, teacher, log_target=True, reduction="sum"), scored.sum()


class _SaveAdded(TrainerCallback):
    def __init__(self, folder: Path, every: int, stop_after: int | None):
        self.folder, self.every, self.stop_after = folder, every, stop_after

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.stop_after:
            control.should_training_stop = True
        if state.global_step % self.every == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = self.folder / "added.safetensors.tmp"
            save_file(added_state_dict(model), str(staging), metadata={"step": str(state.global_step)})
            staging.rename(self.folder / "added.safetensors")


def train_answers(model, processor, dataset, arguments: TrainingArguments, callbacks=()) -> Trainer:
    """Train `model`'s trainable parameters (or a PEFT model's adapters) on `dataset` with the loss on answer tokens
    only (prose examples: on their text after the image, distilled from the LLM alone), the frozen blocks below the
    lowest CASA layer computed once per distinct sequence (`FrozenPrefix`)."""
    trainer = AnswerOnlyLossTrainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        data_collator=DistillingCollator(processor),
        callbacks=list(callbacks),
    )
    with frozen_prefix(unwrap_peft(model)) as trainer.prefix:
        trainer.train()
    return trainer


def train_casa_smollm2(config: SmolLM2TrainConfig):
    """Build CASA-SmolLM2, train its added weights on `NaturalVQA` (training phrasings) and write them to
    `output_dir/added.safetensors` (fp16) with `recipe.json`."""
    if config.init_from and config.vision_steps:
        raise ValueError("init_from starts from a trained vision tower; vision_steps would train it again (set 0)")
    plain, processor = build_casa_smollm2(config.recipe, config.seed)
    model = with_sa_lora(plain, config.recipe) if config.recipe.sa_lora_rank else plain
    if config.init_from:
        # neither the placement nor the window rule moves a weight (the same names): the run's weights all load
        layout = {"placement": config.recipe.placement, "window_images": config.recipe.window_images}
        initial = replace(recipe_from_file(Path(config.init_from, "recipe.json")), **layout)
        partial = initial != config.recipe
        fresh = load_added_weights(model, Path(config.init_from, "added.safetensors"), partial=partial)
        if fresh:
            print(f"{len(fresh)} added tensors not in {config.init_from} start as built, e.g. {fresh[0]}")
    freeze_smollm2(model)
    if config.freeze_vision:  # stage 1 still trains the tower
        plain.model.visual.requires_grad_(False)
    trainable = plain.num_parameters(only_trainable=True)
    frozen = plain.num_parameters() - trainable
    print(f"CASA-SmolLM2: {trainable / 1e6:.2f}M trainable in stage 2, {frozen / 1e6:.1f}M frozen")
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "recipe.json").write_text(json.dumps(asdict(config), indent=1, default=list))
    if config.vision_steps:
        steps, batch = config.vision_steps, config.vision_batch_size
        probe = pretrain_vision_tower(plain, processor, steps, batch, seed=config.seed)
        print("vision tower, attribute accuracy (last 50 steps):", json.dumps(probe))
    dataset = NaturalVQA(config.train_examples, config.seed, config.recipe.image_size, config.kinds)
    arguments = TrainingArguments(
        output_dir=str(output),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=config.seed,
        disable_tqdm=False,
    )
    start = time.perf_counter()
    trainer = train_answers(
        model, processor, dataset, arguments, [_SaveAdded(output, config.save_every, config.stop_after)]
    )
    seconds, steps = time.perf_counter() - start, trainer.state.global_step
    save_file(added_state_dict(model), str(output / "added.safetensors"), metadata={"step": str(steps)})
    print(f"trained {steps} steps in {seconds:.0f} s ({seconds / steps:.2f} s/step)")
    if model is not plain:  # the SA LoRA merged into SmolLM2's SA weights, as an assembled model has it
        model.merge_and_unload()
    return plain.eval(), processor


def held_out_natural(examples: int, image_size: int, phrasings: str = "held_out", training_seed: int = 0, kinds=None):
    """Questions on images a run with `training_seed` never draws, every kind equally often."""
    kinds = tuple(dict.fromkeys(kinds)) if kinds else None
    return NaturalVQA(examples, training_seed + HELD_OUT_SEED_OFFSET, image_size, kinds, phrasings=phrasings)


@torch.no_grad()
def evaluate_natural(model, processor, dataset: NaturalVQA, batch_size: int = 16, max_new_tokens: int = 8) -> dict:
    """Greedy sentence answers to every example, graded by their answer word; accuracy per kind and overall."""
    collator = CasaDataCollator(processor)
    correct, total = defaultdict(int), defaultdict(int)
    model.eval()
    for start in tqdm(range(0, len(dataset), batch_size), desc="Evaluating", unit="batch"):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        answers = processor.batch_decode(
            generate_answers(model, processor, collator, examples, max_new_tokens), skip_special_tokens=True
        )
        for example, text in zip(examples, answers, strict=True):
            correct[example["kind"]] += grade(example["kind"], text, example["answer"])
            total[example["kind"]] += 1
    accuracy = {kind: correct[kind] / total[kind] for kind in total}
    single = [kind for kind in total if kind not in (*MULTI_KINDS, STREAM)]
    accuracy["single_image"] = sum(correct[k] for k in single) / max(sum(total[k] for k in single), 1)
    return accuracy


def natural_accuracy(model, processor, examples: int, training_seed: int = 0) -> dict:
    """Accuracy on `examples` new images per phrasing split (training phrasings, held-out phrasings), every kind of
    `EVALUATED_KINDS` equally often, and on the fixed test set that `tests/test_casa_smollm2.py` re-measures."""
    size = processor.image_size
    splits = {
        "training phrasings": (examples, "train", EVALUATED_KINDS),
        "held-out phrasings": (examples, "held_out", EVALUATED_KINDS),
        "fixed test set": (FIXED_TEST_SET, "held_out", None),
    }
    return {
        split: evaluate_natural(model, processor, held_out_natural(count, size, phrasings, training_seed, kinds))
        for split, (count, phrasings, kinds) in splits.items()
    }


def run_train_smollm2(args) -> None:
    """`casa-hf train-smollm2`: train, then score the held-out phrasings on new images."""
    recipe = recipe_from_file(Path(args.init_from, "recipe.json")) if args.init_from else CasaSmolLM2Recipe()
    if args.casa_layers:
        recipe.casa_layers = tuple(args.casa_layers)
    if args.vision_depth:
        recipe.vision_depth = args.vision_depth
    if args.text_only_windows:
        recipe.text_only_windows = args.text_only_windows
    if args.sa_lora_rank is not None:
        recipe.sa_lora_rank = args.sa_lora_rank
    if args.placement:
        recipe.placement = args.placement
    if args.window_images:
        recipe.window_images = args.window_images
    config = SmolLM2TrainConfig(
        args.output_dir,
        args.steps,
        args.batch_size,
        args.learning_rate,
        seed=args.seed,
        vision_steps=args.vision_steps,
        freeze_vision=args.freeze_vision,
        kinds=tuple(args.kinds.split(",")) if args.kinds else SMOLLM2_MIX,
        stop_after=args.stop_after,
        init_from=args.init_from,
        recipe=recipe,
    )
    model, processor = train_casa_smollm2(config)
    accuracy = natural_accuracy(model, processor, 160, args.seed)
    Path(args.output_dir, "accuracy.json").write_text(json.dumps(accuracy, indent=1))
    print(json.dumps(accuracy, indent=1))
