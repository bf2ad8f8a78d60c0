"""Decode steps taken in turn: CASA (each block layout of `--variants`), Qwen2.5-VL token insertion, the text LLM,
and the text LLM with a bare CASA sub-layer (eager PyTorch's floor for CASA).

The machines we measure on are shared, and two `generate()` calls timed a minute apart differ by several percent:
more than what separates CASA from its floor. Here the models each decode one token in turn, hundreds of times, so
they see the same machine; the medians of their step times are steady to about a percent.

The bare sub-layer is what a CASA layer must compute, written as plainly as eager PyTorch allows: the block's norm,
q/k/v/o projections of the new token, and SDPA over preallocated `[image | text since the image]` K/V written in
place, hooked in before each block's MLP (no RoPE, no window bookkeeping, no attention interface). CASA over it is
what casa_hf's decode path costs beyond the FLOPs and the fewest ops.

    python benchmarks/bench_decode_steps.py --size smollm2 --out results/decode_steps_smollm2
    python benchmarks/bench_decode_steps.py --size smollm2 --cases 1x256 --variants all --out results/decode_variants
    python benchmarks/bench_decode_steps.py --size base --cases 1x256,8x256,32x256 --out results/decode_steps_base
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from casa_hf import every_nth_block
from casa_hf.random_models import SIZES, random_casa, random_qwen2_5_vl, random_text_llm, word_tokenizer

# the real models' vocabularies: the LM head is part of every decode step
VOCABS = {"smollm2": 49152, "base": 151936}
WARMUP_STEPS = 10  # left out of the medians: first buffer allocations, caches warming
PATCH_FEATURES = 1176  # 3 channels x 2 frames x 14 x 14 pixels per patch, what the vision tower takes


# The CASA block layouts, by name: the config options of each (the `n` of `replace_every_n` is filled in) and whether
# its parallel projections are fused (`fuse_attention_projections`)
VARIANTS = {
    "sequential": (dict(casa_placement="sequential"), False),
    "parallel": (dict(casa_placement="parallel"), False),
    "parallel_fused": (dict(casa_placement="parallel"), True),
    "parallel_shared": (dict(casa_placement="parallel", casa_shared=True), False),
    "replace_every_2": (dict(casa_placement="replace", casa_shared=True), False),
}
DEFAULT_VARIANTS = "parallel_fused"


def casa_variant(name: str, size: str, tokenizer, weights: dict) -> nn.Module:
    """A random CASA model of layout `name` holding `weights` where its parameters have the same names (the LLM's,
    and CASA's own in the layouts that have them)."""
    options, fuse = VARIANTS[name]
    if options["casa_placement"] == "replace":
        options = dict(options, casa_layers=every_nth_block(SIZES[size].layers, int(name.rsplit("_", 1)[1])))
    model = random_casa(size, tokenizer, **options)
    model.load_state_dict({k: v for k, v in weights.items() if k in model.state_dict()}, strict=False)
    if fuse:
        model.fuse_attention_projections()
    return model


class BareCasaSubLayer(nn.Module):
    """A CASA sub-layer's decode step with nothing but its FLOPs: norm, projections, SDPA over K/V kept in place."""

    def __init__(self, casa_layer: nn.Module, image_tokens: int, max_text: int):
        super().__init__()
        attention = casa_layer.casa_attn
        self.norm = copy.deepcopy(casa_layer.casa_input_layernorm)
        self.q_proj, self.k_proj = copy.deepcopy(attention.q_proj), copy.deepcopy(attention.k_proj)
        self.v_proj, self.o_proj = copy.deepcopy(attention.v_proj), copy.deepcopy(attention.o_proj)
        self.head_dim = attention.head_dim
        kv_heads = self.k_proj.out_features // self.head_dim
        self.keys = torch.randn(1, kv_heads, image_tokens + max_text, self.head_dim)
        self.values = torch.randn_like(self.keys)
        self.used = image_tokens

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden_states)
        batch, seq_len, _ = normed.shape
        shape = (batch, seq_len, -1, self.head_dim)
        query = self.q_proj(normed).view(shape).transpose(1, 2)
        self.keys[:, :, self.used : self.used + seq_len] = self.k_proj(normed).view(shape).transpose(1, 2)
        self.values[:, :, self.used : self.used + seq_len] = self.v_proj(normed).view(shape).transpose(1, 2)
        self.used += seq_len
        keys, values = self.keys[:, :, : self.used], self.values[:, :, : self.used]
        output = F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
        return hidden_states + self.o_proj(output.transpose(1, 2).reshape(batch, seq_len, -1))


def with_bare_casa(llm: nn.Module, casa: nn.Module, image_tokens: int, max_text: int) -> nn.Module:
    """A copy of `llm` running a bare CASA sub-layer before each MLP, where casa_hf's blocks have one."""
    floor = copy.deepcopy(llm)
    for block, casa_block in zip(floor.model.layers, casa.model.language_model.layers, strict=True):
        if casa_block.has_casa:
            block.bare_casa = BareCasaSubLayer(casa_block, image_tokens, max_text)
            block.post_attention_layernorm.register_forward_pre_hook(
                lambda module, args, sub_layer=block.bare_casa: (sub_layer(args[0]),)
            )
    return floor


class Decoder:
    """One model decoding greedily through its own cache, a step at a time."""

    def __init__(self, model: nn.Module, inputs: dict):
        self.model = model
        with torch.no_grad():
            output = model(**inputs, use_cache=True, logits_to_keep=1)
        self.cache, self.length = output.cache, inputs["input_ids"].shape[1]
        self.token = output.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step(self) -> float:
        """Decode one token; milliseconds it took."""
        self.length += 1
        mask = torch.ones(1, self.length, dtype=torch.long)
        start = time.perf_counter()
        output = self.model(
            input_ids=self.token, cache=self.cache, attention_mask=mask, use_cache=True, logits_to_keep=1
        )
        self.token = output.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) * 1e3


def case_inputs(config, count: int, tokens_per_image: int, text_tokens: int = 16) -> dict[str, dict]:
    """Each model's prompt: `count` turns of (an image, 3 words), then `text_tokens` words. CASA has one placeholder
    per image, insertion the image's tokens, the text LLM the words alone. Random patches: the vision tower's output
    is timed in the prefill, not here."""
    side = int((4 * tokens_per_image) ** 0.5)  # patches per side before the 2 x 2 merger
    start, image, end = config.vision_start_token_id, config.image_token_id, config.vision_end_token_id
    images = dict(
        pixel_values=torch.randn(count * side * side, PATCH_FEATURES),
        image_grid_thw=torch.tensor([[1, side, side]] * count),
    )
    text = list(range(200, 200 + text_tokens))

    def turns(image_tokens: list[int]) -> list[int]:
        return [token for i in range(count) for token in (start, *image_tokens, end, 100 + i, 101, 102)]

    return {
        "casa": dict(input_ids=torch.tensor([turns([image]) + text]), **images),
        "insertion": dict(input_ids=torch.tensor([turns([image] * tokens_per_image) + text]), **images),
        "text_llm": dict(input_ids=torch.tensor([text])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="smollm2", choices=tuple(SIZES))
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: the real model's for smollm2 and base)")
    parser.add_argument("--cases", default="1x256,32x64", help="images x tokens per image, comma separated")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"CASA block layouts, comma separated, or all: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--steps", type=int, default=200, help="decode steps per model and case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/decode_steps", help="prefix of the .json and .png outputs")
    args = parser.parse_args()
    if args.steps < 2 * WARMUP_STEPS:
        raise ValueError(
            f"--steps must be at least {2 * WARMUP_STEPS} (the first {WARMUP_STEPS} are warm-up), got {args.steps}"
        )
    cases = []
    for case in args.cases.split(","):
        count, _, tokens = case.partition("x")
        if not (count.isdigit() and tokens.isdigit() and int(count) > 0 and int(tokens) > 0):
            raise ValueError(f"--cases: expected IMAGESxTOKENS such as 32x64, got {case!r}")
        if int((4 * int(tokens)) ** 0.5) ** 2 != 4 * int(tokens):
            raise ValueError(f"--cases: {tokens} tokens per image is not a square grid after the 2 x 2 merger")
        cases.append((int(count), int(tokens)))
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; choose among {list(VARIANTS)} or all")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = word_tokenizer(args.vocab or VOCABS.get(args.size, 1024))
    casa = random_casa(args.size, tokenizer, casa_placement="parallel")  # holds every variant's weights
    insertion = random_qwen2_5_vl(args.size, tokenizer)
    llm = random_text_llm(args.size, tokenizer)
    llm.load_state_dict(
        {k.replace("model.language_model.", "model."): v for k, v in casa.state_dict().items() if "casa" not in k},
        strict=False,
    )
    models = {name: casa_variant(name, args.size, tokenizer, casa.state_dict()) for name in variants}
    started = time.time()
    rows = []
    for count, tokens in tqdm(cases, desc="cases"):
        prompts = case_inputs(casa.config, count, tokens)
        floor = with_bare_casa(llm, casa, tokens, args.steps + len(prompts["text_llm"]["input_ids"][0]) + 8)
        decoders = {
            "text_llm": Decoder(llm, prompts["text_llm"]),
            "floor": Decoder(floor, prompts["text_llm"]),
            **{name: Decoder(model, prompts["casa"]) for name, model in models.items()},
            "insertion": Decoder(insertion, prompts["insertion"]),
        }
        times = {name: [] for name in decoders}
        for _ in tqdm(range(args.steps), desc=f"{count} x {tokens} image tokens", leave=False):
            for name, decoder in decoders.items():
                times[name].append(decoder.step())
        timed = {name: series[WARMUP_STEPS:] for name, series in times.items()}
        medians = {name: statistics.median(series) for name, series in timed.items()}
        for name in variants:
            rows.append(
                dict(
                    images=count,
                    tokens_per_image=tokens,
                    variant=name,
                    text_llm_ms=medians["text_llm"],
                    floor_ms=medians["floor"],
                    casa_ms=medians[name],
                    insertion_ms=medians["insertion"],
                    floor_over_llm=medians["floor"] / medians["text_llm"],
                    casa_over_llm=medians[name] / medians["text_llm"],
                    casa_over_floor=medians[name] / medians["floor"],
                    casa_speed_over_insertion=medians["insertion"] / medians[name],
                    step_ms={key: timed[key] for key in ("text_llm", "floor", name, "insertion")},
                )
            )

    header = f"{'images':>10} {'variant':>16} {'LLM ms':>8} {'floor ms':>9} {'CASA ms':>8} {'floor/LLM':>10}"
    header += f" {'CASA/LLM':>9}"
    header += f" {'CASA/floor':>11} {'ins. ms':>8} {'CASA speed/ins.':>16}"
    print(f"\nDecode step medians, {args.size} shape, {args.steps} steps each, in turn\n{header}")
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['images']:>4} x {r['tokens_per_image']:<3} {r['variant']:>16} {r['text_llm_ms']:>8.2f} "
            f"{r['floor_ms']:>9.2f} "
            f"{r['casa_ms']:>8.2f} {r['floor_over_llm']:>10.3f} {r['casa_over_llm']:>9.3f} "
            f"{r['casa_over_floor']:>11.3f} {r['insertion_ms']:>8.2f} {r['casa_speed_over_insertion']:>16.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = dict(args=vars(args), seconds=time.time() - started, device=f"CPU ({args.threads} threads)", rows=rows)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 4), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], rows, strict=True):
        ax.boxplot([r["step_ms"][name] for name in ("text_llm", "floor", r["variant"], "insertion")], showfliers=False)
        ax.set_xticks([1, 2, 3, 4], ["text LLM", "LLM + bare\nCASA", f"CASA\n{r['variant']}", "insertion"])
        title = f"{r['images']} x {r['tokens_per_image']}, {r['variant']}: CASA/LLM {r['casa_over_llm']:.2f}"
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("ms per decode step")
    fig.suptitle(f"Decode steps taken in turn ({args.size} shape, CPU {args.threads} threads)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
