"""Which image patches did the answer look at? CASA's attention on the image, drawn over it.

The shipped model (or `--model`) answers a question about a generated image; one eager forward over the question and
answer with `output_attentions=True` then gives, per CASA layer, each token's weights on the tokens of the image it
sees (`cross_attentions`, `[batch, heads, tokens, image_tokens]`, image tokens in raster order of the merged patch
grid). The answer tokens' weights, averaged over heads and layers, are drawn over the image.

    python examples/attention_map.py --out attention_map.png [--model tiny] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def attention_map(model, processor, image, question: str) -> tuple[str, np.ndarray, float]:
    """The answer, its mean attention over the merged patch grid (rows x columns) and the share of its attention
    that went to the image (the rest went to the text since the image)."""
    from casa_hf.training.synthetic_vqa import SYSTEM_TEXT

    messages = [
        {"role": "system", "content": SYSTEM_TEXT},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        model.set_attn_implementation({"text_config": "eager"})  # only eager attention returns its weights
        out = model(
            input_ids=sequence,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            output_attentions=True,
        )
    answer = processor.decode(sequence[0, prompt:], skip_special_tokens=True).strip()
    # the answer's tokens are predicted from position prompt - 1 on
    weights = torch.stack(out.cross_attentions)[:, 0, :, prompt - 1 : sequence.shape[1] - 1]  # layers, heads, tokens
    mean = weights.float().mean(dim=(0, 1, 2))
    _, height, width = inputs["image_grid_thw"][0].tolist()
    merge = model.config.vision_config.spatial_merge_size
    grid = mean.reshape(height // merge, width // merge).numpy()
    return answer, grid, float(mean.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a built-in model name or a CASA checkpoint folder")
    parser.add_argument("--out", default="attention_map.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from casa_hf.demo import load_demo_model
    from casa_hf.training.synthetic_vqa import QUESTIONS, random_scene, render

    model, processor = load_demo_model(args.model)
    rng = np.random.default_rng(args.seed)
    scene = random_scene(rng, count=1)
    image = render(scene, processor.image_size or 112, rng)
    question = QUESTIONS["colour"]
    answer, grid, image_share = attention_map(model, processor, image, question)
    print(f"image: one {scene.colour} {scene.shape}; Q: {question} A: {answer}")
    print(f"{image_share:.0%} of the answer's CASA attention went to the image; patch weights (rows x columns):")
    print(np.array2string(grid / grid.max(), precision=2))

    figure, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    axes[1].imshow(grid, cmap="inferno", alpha=0.6, extent=(0, image.width, image.height, 0), interpolation="nearest")
    axes[1].set_title(f"{question}  ->  {answer}", fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
