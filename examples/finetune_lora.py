"""Teach CASA-SmolLM2 a question it was never trained on with PEFT LoRA: "Which corner is the shape in?".

The shipped model was trained to say whether a shape is on the left or the right and at the top or the bottom, never
which corner it is in (`UNTRAINED_KINDS` in `casa_hf.smollm2.natural_vqa`); asked, it says half ("It is at the
top."). LoRA adapters on the CASA sub-layers and the vision projector learn the new question and its answer ("It is
at the top, on the left.") from a few hundred steps of examples in its training phrasings, half of them questions
of the shipped model's own mix (`--replay`), so that the adapters do not make it forget those. The held-out
accuracy (new images, phrasings never used in training) is printed before and after, on the new kind and on kinds
the model already knew; the adapter is saved as safetensors.

    python examples/finetune_lora.py --output-dir lora_corner [--steps 300] [--batch-size 8] [--eval-examples 64]

Reload it onto the base model with `PeftModel.from_pretrained(AutoModel.from_pretrained(folder), "lora_corner")`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoProcessor, TrainingArguments, set_seed

import casa_hf  # noqa: F401  (registers CASA with the Auto classes)
from casa_hf.builtin_models import resolve_model
from casa_hf.checkpoint_io import staged_output
from casa_hf.smollm2.assembly import SHIPPED_WEIGHTS
from casa_hf.smollm2.natural_vqa import PHRASINGS, NaturalVQA
from casa_hf.smollm2.train import evaluate_natural, held_out_natural, train_answers

NEW_KIND = "corner"
# Images reach the LLM only through the CASA sub-layers, which read the projector's output: the new question needs
# a new reading of the image (where the shape is on both axes, one after the other), so the adapters go there: CASA
# q/k (where to look), v/o (what is read and written into the residual stream) and the projector's two linear
# layers. SmolLM2's own blocks stay untouched, and everything below the lowest CASA layer stays frozen, so its
# output is still computed once per distinct prompt while training (FrozenPrefix).
TARGET_MODULES = r"model\.(language_model\.layers\.\d+\.casa_attn\.(q|k|v|o)_proj|visual\.merger\.mlp\.(0|2))"


@dataclass
class FinetuneResult:
    model: PeftModel
    processor: object
    before: dict[str, float]  # held-out accuracy per kind
    after: dict[str, float]
    losses: list[float]  # the training loss as logged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="where the adapter (safetensors) and results go")
    parser.add_argument("--model", default="casa-smollm2", help="a built-in model name or a CASA-SmolLM2 folder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--kept-kinds", default="colour,horizontal", help="known kinds checked for forgetting")
    parser.add_argument(
        "--replay",
        type=float,
        default=0.5,
        help="share of training examples from the shipped weights' own mix (their recipe.json)",
    )
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out questions per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "rank", "eval_examples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.replay < 1:
        parser.error(f"--replay must be in [0, 1), got {args.replay}")
    args.kept_kinds = tuple(kind for kind in args.kept_kinds.split(",") if kind)
    unknown = set(args.kept_kinds) - set(PHRASINGS)
    if unknown or NEW_KIND in args.kept_kinds:
        parser.error(f"--kept-kinds must list known kinds other than {NEW_KIND!r}, got {args.kept_kinds}")
    if Path(args.output_dir).exists() and not args.overwrite:
        parser.error(f"--output-dir {args.output_dir} already exists; pass --overwrite to replace it")
    return args


def training_kinds(replay: float) -> tuple[str, ...]:
    """The new kind, with a `replay` share of the shipped model's training mix: trained on the new kind alone, the
    adapters make the model answer every question with a corner sentence (colour 0.52 -> 0.00 in 300 steps, README)."""
    shipped = tuple(json.loads((SHIPPED_WEIGHTS / "recipe.json").read_text())["kinds"])  # what it was trained on
    new = round(len(shipped) * (1 - replay) / replay) if replay else 1
    return (NEW_KIND,) * new + (shipped if replay else ())


def accuracy(model, processor, args: argparse.Namespace) -> dict[str, float]:
    """Held-out accuracy per kind: new images, phrasings never used in training, every kind equally often."""
    kinds = (NEW_KIND, *args.kept_kinds)
    questions = held_out_natural(
        args.eval_examples * len(kinds), processor.image_size, training_seed=args.seed, kinds=kinds
    )
    scores = evaluate_natural(model, processor, questions, max_new_tokens=12)
    return {kind: scores[kind] for kind in kinds}


def run(args: argparse.Namespace) -> FinetuneResult:
    """Measure, fine-tune with LoRA, measure again, save the adapter."""
    folder = resolve_model(args.model)
    model, processor = AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    before = accuracy(model, processor, args)
    print("before:", json.dumps(before))

    set_seed(args.seed)  # the adapters' random start (LoRA A)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGET_MODULES)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    data = NaturalVQA(args.steps * args.batch_size, args.seed, processor.image_size, kinds=training_kinds(args.replay))
    with staged_output(args.output_dir, args.overwrite) as staging:  # the folder appears only once complete
        trainer = train_answers(model, processor, data, training_arguments(args, staging))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        after = accuracy(model, processor, args)
        print("after: ", json.dumps(after))
        model.save_pretrained(staging)  # adapter_model.safetensors + adapter_config.json
        report = {"args": vars(args), "before": before, "after": after, "losses": losses}
        (staging / "finetune_lora.json").write_text(json.dumps(report, indent=1))
    return FinetuneResult(model, processor, before, after, losses)


def training_arguments(args: argparse.Namespace, output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=min(20, args.steps // 10),
        lr_scheduler_type="cosine",
        logging_steps=max(1, min(10, args.steps // 5)),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=args.seed,
        dataloader_pin_memory=False,
        disable_tqdm=False,  # the progress bar
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(f"\nheld-out accuracy ({args.eval_examples} new images per kind, phrasings never used in training)")
    print(f"{'kind':<12} {'before':>7} {'after':>7}")
    for kind in result.before:
        label = f"{kind} (new)" if kind == NEW_KIND else kind
        print(f"{label:<12} {result.before[kind]:>7.2f} {result.after[kind]:>7.2f}")
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
