"""Training-step time of CASA-SmolLM2 (SmolLM2 frozen) by where the CASA sub-layers sit, side by side in one run.

A step's backward runs through every block from the top down to the lowest CASA layer, and the frozen blocks below
it see text only, so their output is looked up (`FrozenPrefix`, as in training): CASA in the top blocks is much
cheaper than CASA everywhere. Prints a table of median step times (forward + backward + AdamW step on the
same batch) and writes JSON.

    python benchmarks/smollm2_step_time.py --batch-size 16 --steps 4 --out results/smollm2_step_time
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from casa_hf.smollm2.model import CasaSmolLM2Recipe, build_casa_smollm2, freeze_smollm2
from casa_hf.smollm2.natural_vqa import NaturalVQA
from casa_hf.smollm2.train import AnswerOnlyLossTrainer, frozen_prefix
from casa_hf.training.collator import CasaDataCollator

LAYOUTS = {
    "all 30 blocks": tuple(range(30)),
    "every 3rd (0..27)": tuple(range(0, 30, 3)),
    "every 2nd of the top 16 (14..28)": tuple(range(14, 30, 2)),
    "top 4 (26..29, the shipped model)": (26, 27, 28, 29),
}


def step_seconds(casa_layers: tuple[int, ...], batch: dict, steps: int) -> tuple[float, int]:
    model, _ = build_casa_smollm2(CasaSmolLM2Recipe(casa_layers=casa_layers))
    trainable = freeze_smollm2(model)["trainable"]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trainer = SimpleNamespace(prefix=None)
    times = []
    with frozen_prefix(model) as trainer.prefix:
        for _ in range(steps + 1):  # the first step warms up (and fills the frozen prefix's store)
            start = time.perf_counter()
            loss = AnswerOnlyLossTrainer.compute_loss(trainer, model, dict(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="results/smollm2_step_time")
    args = parser.parse_args()
    torch.manual_seed(0)
    _, processor = build_casa_smollm2(CasaSmolLM2Recipe(casa_layers=(29,)))
    batch = CasaDataCollator(processor)([NaturalVQA(args.batch_size)[i] for i in range(args.batch_size)])
    rows = []
    for name, layers in LAYOUTS.items():
        seconds, trainable = step_seconds(layers, batch, args.steps)
        rows.append({"casa_layers": name, "layers": list(layers), "step_s": seconds, "trainable": trainable})
        print(f"{name:<28} {trainable / 1e6:6.2f}M trainable  {seconds:6.2f} s/step", flush=True)
    base = rows[0]["step_s"]
    print("\n| CASA layers | trainable | s/step | vs all blocks |\n|---|---|---|---|")
    for row in rows:
        ratio = row["step_s"] / base
        print(f"| {row['casa_layers']} | {row['trainable'] / 1e6:.1f}M | {row['step_s']:.2f} | x{ratio:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"batch_size": args.batch_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
