"""`casa-hf` command line: `demo` (CASA-SmolLM2 answers questions about generated images, offline),
`convert` (checkpoints into CASA), `train` (the synthetic VQA recipe), `evaluate` (its held-out accuracy),
`serve` (an OpenAI-compatible server with live video sessions)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from .builtin_models import BUILTIN_MODELS, DEFAULT_MODEL, DEMO_MODEL, check_model, questions_for
from .configuration_casa import CasaPlacement, ImagePositions
from .errors import OptionsError
from .kyutai_release import UnsupportedCheckpointError

# What a user gets wrong (a missing or existing path, a package not installed, a checkpoint casa_hf cannot load):
# one line and status 2, as argparse answers a bad option. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    ModuleNotFoundError,
    UnsupportedCheckpointError,
    OptionsError,
)
SERVE_EXTRA = ("fastapi", "uvicorn", "starlette")  # what `pip install 'casa-hf[serve]'` brings
MODEL_HELP = (
    f"a built-in model name ({', '.join(BUILTIN_MODELS)}), a CASA checkpoint folder or a train-smollm2 run's folder "
    "(assembled with SmolLM2 as its recipe says)"
)
QUESTIONS_HELP = (
    "tiny and folders with a word-level tokenizer (casa-hf train's) get the synthetic questions, answered in one "
    "word; casa-smollm2 and other folders (a real LLM's tokenizer) English questions, answered in sentences"
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless there is none to show (None, an unset flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _layer_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _add_conversion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="folder to write (appears only when complete)")
    parser.add_argument("--casa-layers", type=_layer_list, default=None, help="e.g. 0,4,8 (default: every block)")
    parser.add_argument(
        "--casa-init",
        choices=("copy", "random"),
        default="copy",
        help="CASA q/k/v: copied from the block's self-attention, or random (output proj. is zero)",
    )
    parser.add_argument("--shared", action="store_true", help="the -Shared variant: CASA reuses SA projections")
    parser.add_argument(
        "--placement",
        choices=get_args(CasaPlacement),
        default="parallel",
        help="CASA beside self-attention on the block input (the paper's block), after it, or instead of it "
        "(replace, with --shared)",
    )
    parser.add_argument(
        "--replace-every",
        type=int,
        default=None,
        metavar="N",
        help="the paper's CA-replace: CASA replaces self-attention in blocks N-1, 2N-1, ... (sets --placement "
        "replace, --shared and the CASA blocks)",
    )
    parser.add_argument(
        "--image-positions",
        choices=get_args(ImagePositions),
        default=None,
        help="RoPE positions of CASA image keys (default: mrope, Qwen2.5-VL's own layout, for a Qwen2.5-VL source; "
        "insertion for a text LLM)",
    )
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: keep the source dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--verify", action="store_true", help="compare with the source and run an image prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomly initialised CASA weights")


def run_convert(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from .convert import ConversionOptions, convert_llm_to_casa, convert_qwen2_5_vl_to_casa

    options = ConversionOptions(**{option.name: getattr(args, option.name) for option in fields(ConversionOptions)})
    if args.source_kind == "qwen2_5_vl":
        report = convert_qwen2_5_vl_to_casa(args.source, args.output, options)
    else:
        report = convert_llm_to_casa(args.llm, args.vision, args.output, options)
    print(report.summary())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {value}")
    return value


def _model(text: str) -> str:
    """`--model`: checked before anything loads, so a typo costs no model load."""
    try:
        check_model(text)
    except (FileNotFoundError, UnsupportedCheckpointError) as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--model ")) from error
    return text


def _existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def run_train(args: argparse.Namespace) -> None:
    import json

    import torch

    from .training.train import TrainConfig, evaluate, held_out_questions, train

    options = dict(
        kind=args.kind,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        image_size=args.image_size,
        pack=args.pack,
        recipe=args.recipe,
        trainable_vision_blocks=args.trainable_vision_blocks,
        workers=args.workers,
        image_positions=args.image_positions,
        placement=args.placement,
        kinds=tuple(args.kinds.split(",")) if args.kinds else None,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        fsdp=args.fsdp,
        save_steps=args.save_steps,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    config = TrainConfig(args.output_dir, **{name: value for name, value in options.items() if value is not None})
    model, processor, trainer = train(config)
    # every process of a launch leaves its process group here: a gloo group still alive at interpreter exit can
    # abort the process (SIGABRT) as its worker threads are torn down (FSDP's rank 0 scores the saved checkpoint)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if args.eval_examples and trainer.is_world_process_zero():  # the other processes of a launch are done
        if model.is_distributed_loading_by_transformers:  # FSDP shards: score the gathered checkpoint instead
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(config.output_dir).eval()
        held_out = held_out_questions(args.eval_examples, config.image_size, config.seed, config.kinds)
        accuracy = evaluate(model, processor, held_out, expand_image_tokens=config.kind == "insertion")
        print(json.dumps(accuracy, indent=1))


def run_demo(args: argparse.Namespace) -> None:
    """The demo of the questions the model is asked (`questions_for`): one-word synthetic ones, or CASA-SmolLM2's
    English ones."""
    from .demo import start_demo

    if questions_for(args.model) == "natural":
        from .smollm2.demo import run_natural_demo as demo
    else:
        from .demo import run_word_demo as demo
    model, processor, seed = start_demo(args.model, args.seed)
    demo(model, processor, args.images, args.frames, seed, args.save_images)


def run_evaluate(args: argparse.Namespace) -> None:
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .builtin_models import resolve_model
    from .training.train import evaluate, held_out_questions

    path = resolve_model(args.model)
    model, processor = AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    if (args.questions or questions_for(args.model)) == "natural":
        from .smollm2.train import natural_accuracy

        print(json.dumps(natural_accuracy(model, processor, args.examples, args.seed), indent=1))
        return
    held_out = held_out_questions(args.examples, processor.image_size, args.seed)
    insertion = model.config.model_type != "casa"  # a Qwen2.5-VL baseline trained by `casa-hf train --kind insertion`
    print(json.dumps(evaluate(model, processor, held_out, expand_image_tokens=insertion), indent=1))


def run_serve(args: argparse.Namespace) -> None:
    try:
        from .serving import ServeLimits, serve
    except ModuleNotFoundError as error:
        if error.name not in SERVE_EXTRA:  # a bug, not a missing extra
            raise
        raise ModuleNotFoundError(
            f"casa-hf serve needs the serve extra: pip install 'casa-hf[serve]' ({error})"
        ) from error

    limits = ServeLimits(
        max_sessions=args.max_sessions, session_ttl_s=args.session_ttl, max_tokens=args.max_tokens_limit
    )
    serve(args.model, args.host, args.port, limits)


def _add_serve_parser(commands) -> None:
    server = commands.add_parser(
        "serve",
        help="an OpenAI-compatible server with live video sessions and a captioning page (casa-hf[serve])",
        formatter_class=_HelpFormatter,
    )
    server.add_argument("--model", type=_model, default=DEFAULT_MODEL, help=MODEL_HELP)
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=_port, default=8000, help="TCP port to listen on")
    server.add_argument(
        "--max-sessions", type=_positive_int, default=8, help="live sessions at once; more get HTTP 429"
    )
    server.add_argument(
        "--session-ttl", type=_positive_float, default=300.0, help="seconds before an idle session expires"
    )
    server.add_argument(
        "--max-tokens-limit", type=_positive_int, default=512, help="the largest max_tokens a request may ask"
    )


def _add_train_parser(commands) -> None:
    from .training.train import TrainConfig

    defaults = TrainConfig("")
    trainer = commands.add_parser(
        "train",
        help="train a small model on the synthetic VQA data (Trainer, CPU or GPU)",
        description="Defaults are those of casa_hf.training.TrainConfig.",
        formatter_class=_HelpFormatter,
    )
    trainer.add_argument("--output-dir", required=True, help="folder for the model, checkpoints and training_run.json")
    trainer.add_argument(
        "--kind", choices=("casa", "cross_attention", "insertion"), default=defaults.kind, help="the model to train"
    )
    trainer.add_argument("--steps", type=_positive_int, default=defaults.steps, help="optimizer steps")
    trainer.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help="global batch, split over the launched processes",
    )
    trainer.add_argument("--learning-rate", type=_positive_float, default=defaults.learning_rate, help="AdamW's")
    trainer.add_argument(
        "--warmup-steps", type=_non_negative_int, default=defaults.warmup_steps, help="before the cosine decay"
    )
    trainer.add_argument(
        "--image-size", type=_positive_int, default=defaults.image_size, help="side of the drawn images, in pixels"
    )
    trainer.add_argument("--pack", action="store_true", help="pack several conversations per row")
    trainer.add_argument(
        "--recipe", choices=("qwen", "full", "casa_only"), help="freezing recipe (default: everything trains)"
    )
    trainer.add_argument(
        "--trainable-vision-blocks",
        type=_non_negative_int,
        default=None,
        help="last vision blocks the qwen / full recipes train (default: an eighth of the tower, at least 1)",
    )
    trainer.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    trainer.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (autocast)")
    trainer.add_argument(
        "--fsdp", action="store_true", help="shard the model over the launched processes (FSDP2; torchrun)"
    )
    trainer.add_argument(
        "--save-steps",
        type=_non_negative_int,
        default=defaults.save_steps,
        help="write a resumable checkpoint every N steps (0: only the final model)",
    )
    existing = trainer.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue from the output dir's last checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="train from scratch over a previous run")
    trainer.add_argument("--seed", type=int, default=defaults.seed, help="model initialisation and data seed")
    trainer.add_argument(
        "--workers", type=_non_negative_int, default=defaults.workers, help="dataloader processes drawing examples"
    )
    trainer.add_argument(
        "--image-positions",
        choices=("insertion", "raster"),
        default=defaults.image_positions,
        help="RoPE positions of CASA image keys (raster: token j at placeholder + j)",
    )
    trainer.add_argument(
        "--placement",
        choices=get_args(CasaPlacement),
        default=defaults.placement,
        help="CASA beside self-attention on the block input (the paper's block), or after it",
    )
    trainer.add_argument(
        "--kinds", default=None, help="comma-separated question kinds drawn in turn (default: TrainConfig's mix)"
    )
    trainer.add_argument(
        "--eval-examples", type=_non_negative_int, default=700, help="held-out examples to score afterwards"
    )


def _add_train_smollm2_parser(commands) -> None:
    smol = commands.add_parser(
        "train-smollm2",
        help="train CASA-SmolLM2's added weights (SmolLM2 frozen) on natural-language VQA",
        formatter_class=_HelpFormatter,
    )
    smol.add_argument("--output-dir", required=True, help="folder for the added weights, recipe and scores")
    smol.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps of stage 2 (the questions)")
    smol.add_argument("--batch-size", type=_positive_int, default=16, help="questions per step")
    smol.add_argument("--learning-rate", type=_positive_float, default=1e-3, help="AdamW's peak learning rate")
    smol.add_argument("--casa-layers", type=_layer_list, default=None, help="SmolLM2 blocks given CASA (e.g. 26,27)")
    smol.add_argument(
        "--vision-depth", type=_positive_int, default=None, help="vision tower blocks (default: the recipe's)"
    )
    smol.add_argument(
        "--sa-lora-rank",
        type=_non_negative_int,
        default=None,
        help="LoRA rank of SmolLM2's self-attention above the lowest CASA layer (0: frozen; default: the recipe's)",
    )
    smol.add_argument(
        "--vision-steps",
        type=_non_negative_int,
        default=0,
        help="stage 1: steps training the vision tower on scene attributes",
    )
    smol.add_argument(
        "--kinds",
        default=None,
        help="comma-separated question kinds drawn in turn, e.g. adding prose (default: the mix)",
    )
    smol.add_argument(
        "--freeze-vision", action="store_true", help="after stage 1, only the CASA layers train (not the tower)"
    )
    smol.add_argument(
        "--text-only-windows",
        choices=("attend", "skip"),
        default=None,
        help="CASA in windows without an image (default: the recipe's 'skip')",
    )
    smol.add_argument(
        "--placement",
        choices=("parallel", "sequential"),
        default=None,
        help="CASA beside self-attention (the paper's block) or after it (default: the recipe's, a new run's "
        "'sequential'; the same weights load into either)",
    )
    smol.add_argument(
        "--window-images",
        choices=("each", "consecutive"),
        default=None,
        help="every image opens a CASA window, or a run of images shares one, the processor grouping a turn's "
        "images before its text (default: the recipe's, a new run's 'each')",
    )
    smol.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    smol.add_argument(
        "--stop-after", type=_positive_int, default=None, help="stop after this many steps of the schedule"
    )
    smol.add_argument(
        "--init-from",
        type=_existing_path,
        default=None,
        help="a run's output folder: train on from its weights and recipe (with --casa-layers or --sa-lora-rank, "
        "what it lacks starts at zero output)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casa-hf", description=__doc__, formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="a shipped CASA model answers questions about generated images", formatter_class=_HelpFormatter
    )
    demo.add_argument("--model", type=_model, default=DEMO_MODEL, help=f"{MODEL_HELP}; {QUESTIONS_HELP}")
    demo.add_argument("--images", type=_positive_int, default=3, help="scenes to draw and ask about (then one digit)")
    demo.add_argument(
        "--frames", type=_non_negative_int, default=8, help="frames of the streaming part (0 to skip it)"
    )
    demo.add_argument(
        "--seed", type=int, default=None, help="seed of the drawn images (default: from the clock, printed)"
    )
    demo.add_argument("--save-images", default=None, help="folder where the generated images are written")

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint folder into a CASA checkpoint folder",
        formatter_class=_HelpFormatter,
    )
    sources = convert.add_subparsers(dest="source_kind", required=True)
    qwen = sources.add_parser(
        "qwen2_5_vl", help="a Qwen2.5-VL (token insertion) checkpoint -> CASA", formatter_class=_HelpFormatter
    )
    qwen.add_argument("source", type=_existing_path, help="local Qwen2.5-VL checkpoint folder")
    _add_conversion_options(qwen)
    llm = sources.add_parser(
        "llm",
        help="a text LLM (Qwen2, Llama, Helium) + a Qwen2.5-VL vision tower -> CASA",
        formatter_class=_HelpFormatter,
    )
    llm.add_argument(
        "llm", type=_existing_path, help="local text LLM checkpoint folder, or a .gguf file (dequantized on the way)"
    )
    llm.add_argument(
        "vision", type=_existing_path, help="local Qwen2.5-VL checkpoint folder whose vision tower is used"
    )
    _add_conversion_options(llm)

    _add_train_parser(commands)
    _add_train_smollm2_parser(commands)

    export = commands.add_parser(
        "export", help="write a built-in model as a standard checkpoint folder", formatter_class=_HelpFormatter
    )
    export.add_argument("model", type=_model, help=MODEL_HELP)
    export.add_argument("output", help="folder to write (appears only when complete)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    scorer = commands.add_parser(
        "evaluate", help="held-out synthetic VQA accuracy of a model", formatter_class=_HelpFormatter
    )
    scorer.add_argument("--model", type=_model, default=DEFAULT_MODEL, help=MODEL_HELP)
    scorer.add_argument(
        "--examples", type=_positive_int, default=700, help="held-out questions, every kind equally often"
    )
    scorer.add_argument("--seed", type=int, default=0, help="training seed whose held-out questions to use")
    scorer.add_argument(
        "--questions",
        choices=("synthetic", "natural"),
        default=None,
        help=f"one-word synthetic questions, or English phrasings with sentence answers (default: {QUESTIONS_HELP})",
    )
    _add_serve_parser(commands)
    return parser


def run_command(args: argparse.Namespace) -> None:
    if args.command == "demo":
        run_demo(args)
    elif args.command == "convert":
        run_convert(args)
    elif args.command == "train":
        run_train(args)
    elif args.command == "train-smollm2":
        from .smollm2.train import run_train_smollm2

        run_train_smollm2(args)
    elif args.command == "export":
        from .builtin_models import export_model

        print(f"wrote {export_model(args.model, args.output, args.overwrite)}")
    elif args.command == "evaluate":
        run_evaluate(args)
    elif args.command == "serve":
        run_serve(args)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_command(args)
    except USER_ERRORS as error:
        parser.exit(2, f"casa-hf {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
