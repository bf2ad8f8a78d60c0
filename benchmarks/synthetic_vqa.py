"""CASA vs plain cross-attention vs token insertion (Transformers' Qwen2.5-VL) on the synthetic VQA data: the same
data, model size, steps and seed for each; accuracy on held-out examples per question kind (a small-scale
replication of the paper's comparison). Prints the table and writes JSON.

    python benchmarks/synthetic_vqa.py --steps 1500 --workers 1 --out results/synthetic_vqa_cpu
    python benchmarks/synthetic_vqa.py --steps 1500 --parallel --workers 4 --out results/synthetic_vqa_h100  # GPU box
"""

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from casa_hf.training.train import MODEL_KINDS, TrainConfig, evaluate, held_out_questions, train


def train_and_score(kind: str, args: argparse.Namespace) -> dict:
    """Train one model kind with the shared settings and score it on the shared held-out set."""
    started = time.time()
    scratch = tempfile.TemporaryDirectory(prefix=f"synthetic_vqa_{kind}_")
    config = TrainConfig(
        str(Path(args.save_models) / kind) if args.save_models else scratch.name,
        kind=kind,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        workers=args.workers,
    )
    model, processor, trainer = train(config)
    held_out = held_out_questions(args.eval_examples, config.image_size, args.seed)
    accuracy = evaluate(model, processor, held_out, expand_image_tokens=kind == "insertion")
    scratch.cleanup()
    return dict(
        accuracy=accuracy,
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=time.time() - started,
        final_loss=[h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--eval-examples", type=int, default=700)
    parser.add_argument("--kinds", default=",".join(MODEL_KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="dataloader processes per model")
    parser.add_argument("--parallel", action="store_true", help="train the models at the same time, one process each")
    parser.add_argument("--out", default="results/synthetic_vqa", help="JSON path (without .json)")
    parser.add_argument("--save-models", default=None, help="folder to keep the trained models in (default: none)")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kinds = args.kinds.split(",")
    if args.parallel:
        with ProcessPoolExecutor(len(kinds), mp_context=get_context("spawn")) as pool:
            futures = {kind: pool.submit(train_and_score, kind, args) for kind in kinds}
            results = {kind: future.result() for kind, future in futures.items()}
    else:
        results = {kind: train_and_score(kind, args) for kind in kinds}
    columns = list(next(iter(results.values()))["accuracy"])
    print(f"\nHeld-out accuracy after {args.steps} steps x {args.batch_size} examples (same data, size, seed)")
    print(f"{'model':<16} {'params':>8} {'train s':>8} " + " ".join(f"{c[:12]:>12}" for c in columns))
    for kind, row in results.items():
        cells = " ".join(f"{row['accuracy'][c]:>12.3f}" for c in columns)
        print(f"{kind:<16} {row['parameters'] / 1e6:>7.2f}M {row['train_seconds']:>8.0f} {cells}")
    out.with_suffix(".json").write_text(json.dumps(dict(args=vars(args), results=results), indent=1) + "\n")
    print(f"\nwrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
