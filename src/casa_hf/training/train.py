"""Train a small CASA model (or its cross-attention / token-insertion baselines) on the synthetic VQA data with the
Hugging Face Trainer, on CPU or GPU; evaluate answers by greedy generation."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments
from transformers.distributed import DistributedConfig
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..errors import OptionsError
from ..processing_casa import CasaProcessor
from ..random_models import ModelSize, random_casa, random_qwen2_5_vl, word_tokenizer
from .collator import CasaDataCollator
from .freezing import apply_freezing_recipe
from .synthetic_vqa import TRAINING_MIX, SyntheticVQA, vocabulary

MODEL_KINDS = ("casa", "cross_attention", "insertion")
# FSDP2 units, by module name: the same names hold for CASA (CasaDecoderLayer) and Qwen2.5-VL (Qwen2_5_VLDecoderLayer)
# models; embeddings, norms and the vision merger stay with the root unit.
FSDP_PLAN = {"model.language_model.layers.*": "free_full_weight", "model.visual.blocks.*": "free_full_weight"}
RUN_SUMMARY = "training_run.json"


def build_processor(image_size: int = 112) -> CasaProcessor:
    """Word-level tokenizer over the synthetic data's vocabulary + the Qwen2-VL image processor."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    words = vocabulary()
    tokenizer = word_tokenizer(vocab_size=len(words) + 2 + 7 + 8, words=words)
    area = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=area, max_pixels=area)
    return CasaProcessor(image_processor, tokenizer, image_size=image_size)


def build_model(
    kind: str,
    processor: CasaProcessor,
    size: ModelSize,
    seed: int = 0,
    image_positions: str = "insertion",
    placement: str = "parallel",
):
    """A randomly initialised CASA model (`casa` or `cross_attention`, its block `placement`) or Qwen2.5-VL
    (`insertion`) of `size`."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"Unknown model kind {kind!r}; choose one of {MODEL_KINDS}")
    torch.manual_seed(seed)
    if kind == "insertion":
        return random_qwen2_5_vl(size, processor.tokenizer)
    return random_casa(
        size,
        processor.tokenizer,
        casa_attention=kind,
        casa_image_positions=image_positions,
        casa_placement=placement,
    )


@dataclass
class TrainConfig:
    output_dir: str
    kind: str = "casa"
    steps: int = 3000
    batch_size: int = 32  # global batch: split evenly over the processes of a multi-process launch
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    train_examples: int = 200_000
    seed: int = 0
    image_size: int = 112
    pack: bool = False
    max_length: int = 512
    recipe: str | None = None
    trainable_vision_blocks: int | None = None  # for `recipe`; None: the recipe's default for the model's depth
    gradient_checkpointing: bool = False
    bf16: bool = False  # bfloat16 autocast; weights and optimizer state stay float32
    fsdp: bool = False  # shard weights, gradients and optimizer state over the launched processes (FSDP2)
    save_steps: int = 0  # write a resumable `checkpoint-N` every N steps (0: only the final model)
    resume: bool = False  # continue from the last `checkpoint-N` in output_dir
    overwrite: bool = False  # train from scratch into an output_dir that already holds a run
    workers: int = 0  # dataloader processes drawing and preprocessing examples
    image_positions: str = "raster"  # CASA image-key positions: "raster" (needed to learn layout) or "insertion"
    placement: str = "parallel"  # CASA beside self-attention (the paper's block) or after it ("sequential")
    kinds: tuple[str, ...] = TRAINING_MIX  # question kinds drawn in turn (repeat a kind to draw it more often)
    size: ModelSize = None

    def __post_init__(self):
        self.size = self.size or ModelSize()
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionsError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.save_steps < 0:
            raise OptionsError(f"save_steps must be >= 0 (0: no intermediate checkpoints), got {self.save_steps}")
        if self.resume and self.overwrite:
            raise OptionsError(
                "resume and overwrite exclude each other: continue the run in output_dir, or replace it"
            )
        if self.fsdp and (self.save_steps or self.resume):
            raise OptionsError(
                "save_steps and resume are not available with fsdp: Transformers does not checkpoint the optimizer "
                "state of a model it shards; train without them (the final model is saved in full)"
            )


def _resume_checkpoint(config: TrainConfig) -> str | None:
    """The checkpoint to resume from, after refusing to silently train over a previous run in `output_dir`."""
    folder = Path(config.output_dir)
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if config.resume:
        if last is None:
            raise FileNotFoundError(
                f"--resume: {folder} holds no {PREFIX_CHECKPOINT_DIR}-N folder to resume from "
                "(they are written every --save-steps steps)"
            )
        return last
    holds_run = last is not None or (folder / "config.json").is_file()
    if holds_run and not config.overwrite:
        raise FileExistsError(
            f"--output-dir {folder} already holds a trained model or checkpoints; pass --resume to continue from "
            f"its last {PREFIX_CHECKPOINT_DIR}-N, or --overwrite to train from scratch in its place"
        )
    return None


def _shard(model, world_size: int):
    """FSDP2 over the launched processes, by Transformers' own sharding (`DistributedConfig`, as `from_pretrained`
    does), which runs on CPU (gloo) as well as GPUs and which the Trainer neither wraps in DDP nor shards again."""
    model.fsdp_plan = FSDP_PLAN
    distributed_config, _, mesh = model.prepare_distribute_model(DistributedConfig(fsdp_size=world_size))
    return model.maybe_distribute_model(model, distributed_config, mesh)


def train(config: TrainConfig, model=None, processor: CasaProcessor | None = None):
    """Train on `SyntheticVQA(train_examples, seed)` and save model + processor to `output_dir` (from the main
    process; under torchrun / accelerate every process runs this with its share of each batch)."""
    resume_from = _resume_checkpoint(config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    if config.fsdp and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise OptionsError(
            "fsdp shards the model itself: launch it with torchrun, or drop it under an accelerate FSDP config"
        )
    if config.batch_size % world_size:
        raise OptionsError(f"batch_size={config.batch_size} must be divisible by the {world_size} processes")
    processor = processor or build_processor(config.image_size)
    model = model or build_model(
        config.kind, processor, config.size, config.seed, config.image_positions, config.placement
    )
    if config.recipe:
        apply_freezing_recipe(model, config.recipe, config.trainable_vision_blocks)
    dataset = SyntheticVQA(config.train_examples, seed=config.seed, image_size=config.image_size, kinds=config.kinds)
    collator = CasaDataCollator(
        processor,
        pack=config.pack,
        max_length=config.max_length if config.pack else None,
        expand_image_tokens=config.kind == "insertion",
    )
    arguments = TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size // world_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=max(config.steps // 20, 1),
        save_strategy="steps" if config.save_steps else "no",
        save_steps=max(config.save_steps, 1),
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=config.workers,
        activation_checkpointing=config.gradient_checkpointing,
        bf16=config.bf16,
        use_cpu=not torch.accelerator.is_available(),  # so that torchrun on CPU gives one gloo group, not N runs
        seed=config.seed,
        disable_tqdm=False,
    )
    if arguments.world_size != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size}, but the Trainer sees {arguments.world_size} process(es)")
    if config.fsdp and world_size > 1:
        model = _shard(model, world_size)
    if config.overwrite:
        with arguments.main_process_first(local=False, desc="removing the previous run's checkpoints"):
            if arguments.should_save:
                for stale in Path(config.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                    shutil.rmtree(stale)
    trainer = Trainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collator, processing_class=processor
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    model.eval()
    trainer.save_model()  # the main process writes model and processor; FSDP shards are gathered first
    if trainer.is_world_process_zero():
        _write_summary(config, trainer, world_size, time.perf_counter() - started)
    return model, processor, trainer


def _write_summary(config: TrainConfig, trainer: Trainer, world_size: int, seconds: float) -> None:
    """`training_run.json`: how the run was launched (as the training code saw it) and its logged losses."""
    parameters = list(trainer.model.parameters())
    summary = dict(
        world_size=world_size,
        parallelism="fsdp" if config.fsdp and world_size > 1 else "ddp" if world_size > 1 else "single process",
        mixed_precision=trainer.args.mixed_precision,  # --bf16, or the launcher's (accelerate launch)
        per_process_batch_size=config.batch_size // world_size,
        global_batch_size=config.batch_size,
        steps=trainer.state.global_step,
        parameters=sum(p.numel() for p in parameters),
        parameters_on_main_process=sum(_local_size(p) for p in parameters),
        train_seconds=round(seconds, 2),
        losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        config={k: v for k, v in asdict(config).items() if k != "output_dir"},
    )
    path = Path(config.output_dir) / RUN_SUMMARY
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(summary, indent=1))
    staging.replace(path)


def _local_size(parameter: torch.Tensor) -> int:
    """Elements this process holds: its shard of an FSDP2 (DTensor) parameter, or the whole parameter."""
    return parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()


def held_out_questions(
    examples: int, image_size: int, training_seed: int = 0, kinds: tuple[str, ...] | None = None
) -> SyntheticVQA:
    """Questions a run trained with `training_seed` never draws (data seed + 10,000), each of `kinds` (default: all)
    equally often, so every score of a model is taken on the same set."""
    kinds = tuple(dict.fromkeys(kinds)) if kinds else None
    return SyntheticVQA(examples, seed=training_seed + 10_000, image_size=image_size, kinds=kinds)


@torch.no_grad()
def evaluate(
    model, processor: CasaProcessor, dataset: SyntheticVQA, batch_size: int = 32, expand_image_tokens: bool = False
) -> dict[str, float]:
    """Greedy answers to every example of `dataset`; accuracy per question kind and over single-image ones."""
    collator = CasaDataCollator(processor, expand_image_tokens=expand_image_tokens)
    correct, total = defaultdict(int), defaultdict(int)
    model.eval()
    for start in tqdm(range(0, len(dataset), batch_size), desc="Evaluating", unit="batch"):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        for example, answer in zip(examples, _answer_batch(model, processor, collator, examples), strict=True):
            correct[example["kind"]] += int(answer == example["answer"])
            total[example["kind"]] += 1
    accuracy = {kind: correct[kind] / total[kind] for kind in total}
    single = [kind for kind in total if kind != "change"]
    accuracy["single_image"] = sum(correct[k] for k in single) / max(sum(total[k] for k in single), 1)
    accuracy["all"] = sum(correct.values()) / max(sum(total.values()), 1)
    return accuracy


def _answer_batch(model, processor, collator: CasaDataCollator, examples: list[dict]) -> list[str]:
    """The first generated token (a word) of each example's answer."""
    out = generate_answers(model, processor, collator, examples, max_new_tokens=2)
    return processor.tokenizer.convert_ids_to_tokens(out[:, 0].tolist())  # answers are one word: one token


def generate_answers(
    model, processor: CasaProcessor, collator: CasaDataCollator, examples: list[dict], max_new_tokens: int
) -> torch.Tensor:
    """Greedy answer token ids to the examples' prompts (without the assistant turn), batched with left padding;
    `[len(examples), generated]`, prompts cut off."""
    prompts = [collator.encode_prompt(example["messages"][:-1]) for example in examples]
    width = max(len(ids) for ids, _, _ in prompts)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in prompts])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in prompts])
    pixel_values = torch.cat([p for _, p, _ in prompts])
    grid = torch.cat([g for _, _, g in prompts])
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        pixel_values=pixel_values.to(model.device),
        image_grid_thw=grid.to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[:, width:]


__all__ = [
    "FSDP_PLAN",
    "MODEL_KINDS",
    "RUN_SUMMARY",
    "ModelSize",
    "TrainConfig",
    "build_model",
    "build_processor",
    "evaluate",
    "held_out_questions",
    "train",
]
