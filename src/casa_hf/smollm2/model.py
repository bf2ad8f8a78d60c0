"""CASA-SmolLM2: SmolLM2-135M-Instruct (frozen) + a small Qwen2.5-VL-style vision tower, projector and CASA
sub-layers in some of its blocks.

Only the weights that are not SmolLM2's (CASA sub-layers, vision tower, projector, the added token rows, an SA LoRA)
are trained and shipped: here are the recipe, the model it builds and those added weights saved and loaded;
`assembly` joins the shipped ones with the installed SmolLM2 into a standard checkpoint folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..casa_init import init_casa, llm_weights_for_vocab
from ..configuration_casa import CasaConfig
from ..modeling_casa import CasaForConditionalGeneration
from ..processing_casa import DEFAULT_CHAT_TEMPLATE, IMAGE_TOKENS, CasaProcessor, add_missing_tokens
from .gguf_llm import load_gguf_llm, smollm2_gguf

# SmolLM2's own default system prompt, which its chat template adds to chats without one. CASA-SmolLM2's template
# adds none (shorter training sequences); pass it as the system message for SmolLM2's usual text answers.
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass
class CasaSmolLM2Recipe:
    """What is added to SmolLM2. CASA sits in the top blocks: gradients then flow back through those blocks only,
    and the frozen blocks below see text only, so their output is cached while training (`FrozenPrefix`); a step
    is far cheaper than with CASA everywhere (`benchmarks/smollm2_step_time.py`)."""

    casa_layers: tuple[int, ...] = (26, 27, 28, 29)
    # CASA q/k/v: "random" (normal, std 0.02) or "copy" (the block's SA). Copied projections score the window's text
    # keys as SA does, so random image keys get almost no attention (and the vision tower no gradient) at the start.
    casa_init: str = "random"
    casa_attention: str = "casa"  # or "cross_attention": image keys only (no text-to-text part)
    # Each image's mean token subtracted before CASA (`CasaConfig.casa_image_centering`): without it the tower grows
    # a component shared by all images and the trained model ignores the image (README, CASA-SmolLM2).
    image_centering: bool = True
    # No CASA update before the first image (`CasaConfig.casa_text_only_windows`): text-only chats are SmolLM2's
    text_only_windows: str = "skip"
    # LoRA rank of SmolLM2's self-attention (q/k/v/o) in the blocks above the lowest CASA layer (0: none). A question
    # after a second image learns about the first only through SA over the text written in the first image's window;
    # frozen SA does not learn to read it ("what changed" stays at chance), adapted SA does. Shipped as the LoRA
    # factors, merged into SmolLM2's SA weights when the model is assembled.
    sa_lora_rank: int = 0
    vision_depth: int = 4
    vision_hidden: int = 256
    vision_heads: int = 4
    image_size: int = 112
    # `CasaConfig.casa_placement`: "sequential" (CASA after self-attention; a new run's and that of a recipe.json
    # written before the field) or "parallel" (the paper's block, the shipped weights': SA and CASA both read the
    # block input, each through its own norm, their outputs summed into the residual). The same parameters and
    # names: a run's weights load into either.
    placement: str = "sequential"
    # `CasaConfig.casa_window_images`: "each" (every image opens a window; a new run's and that of a recipe.json
    # written before the field) or "consecutive" (the paper's, the shipped weights': a run of images shares one
    # window, and the processor puts a user turn's images before its text, so "what changed" reads both frames
    # through CASA)
    window_images: str = "each"

    def vision_config(self, out_hidden_size: int) -> dict:
        return dict(
            depth=self.vision_depth,
            hidden_size=self.vision_hidden,
            intermediate_size=self.vision_hidden * 2,
            num_heads=self.vision_heads,
            out_hidden_size=out_hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=self.image_size,
            fullatt_block_indexes=list(range(self.vision_depth)),
        )


def build_processor(tokenizer, image_size: int, group_images: bool = False) -> CasaProcessor:
    """SmolLM2's tokenizer (+ the image tokens) and fixed square frames of `image_size` pixels; `group_images` for
    consecutive-image windows (without it, chats render as written: with a window per image the two-frame question
    has text between its frames)."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    add_missing_tokens(tokenizer)  # the image tokens: SmolLM2 has the chat tokens
    area = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=area, max_pixels=area)
    return CasaProcessor(
        image_processor,
        tokenizer,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        image_size=image_size,
        group_images=group_images,
    )


def build_casa_smollm2(recipe: CasaSmolLM2Recipe, seed: int = 0) -> tuple[CasaForConditionalGeneration, CasaProcessor]:
    """SmolLM2 with new CASA sub-layers, vision tower and projector, computing exactly SmolLM2 on text."""
    llm, tokenizer = load_gguf_llm(smollm2_gguf())
    processor = build_processor(tokenizer, recipe.image_size, group_images=recipe.window_images == "consecutive")
    text = {**llm.config.to_dict(), "vocab_size": len(tokenizer)}
    config = CasaConfig(
        text_config=text,
        vision_config=recipe.vision_config(llm.config.hidden_size),
        casa_layers=list(recipe.casa_layers),
        casa_placement=recipe.placement,  # the block the weights were trained in (the shipped ones: "parallel")
        casa_window_images=recipe.window_images,  # and the windows they were trained with
        casa_image_positions="raster",
        casa_attention=recipe.casa_attention,
        casa_image_centering=recipe.image_centering,
        casa_text_only_windows=recipe.text_only_windows,
        image_token_id=processor.image_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    config.architectures = ["CasaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = CasaForConditionalGeneration(config)
    weights = llm_weights_for_vocab(llm, len(tokenizer))
    missing, unexpected = model.model.language_model.load_state_dict(weights, strict=False)
    if unexpected or any(".casa_" not in name for name in missing):
        raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    init_casa(model, recipe.casa_init)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def is_added(name: str) -> bool:
    """Whether parameter `name` is one CASA-SmolLM2 adds to SmolLM2 (trained and shipped)."""
    return ".casa_" in name or name.startswith("model.visual.")


SA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def unwrap_peft(model):
    """The model inside a PEFT wrapper (its adapters sit in that model's modules), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sa_lora_modules(recipe: CasaSmolLM2Recipe, num_blocks: int) -> list[str]:
    """The SA projections that `recipe.sa_lora_rank` adapts: those of the blocks above the lowest CASA layer (the
    blocks below see no image, and stay frozen for `FrozenPrefix`)."""
    if not recipe.sa_lora_rank:
        return []
    blocks = range(min(recipe.casa_layers) + 1, num_blocks)
    return [f"model.language_model.layers.{block}.self_attn.{name}" for block in blocks for name in SA_PROJECTIONS]


def with_sa_lora(model: CasaForConditionalGeneration, recipe: CasaSmolLM2Recipe):
    """`model` as a PEFT model with the recipe's SA LoRA (B zero: it starts as `model`), for training."""
    from peft import LoraConfig, get_peft_model

    modules = sa_lora_modules(recipe, model.config.text_config.num_hidden_layers)
    rank = recipe.sa_lora_rank
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=modules))


def _lora_factors(model) -> dict[str, torch.Tensor]:
    """`<projection>.lora_A` / `.lora_B` of a PEFT-wrapped model's SA LoRA, named after the plain model's modules."""
    factors = {}
    for name, module in model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            factors[f"{name}.lora_A"] = module.lora_A["default"].weight
            factors[f"{name}.lora_B"] = module.lora_B["default"].weight
    return factors


def freeze_smollm2(model) -> dict[str, int]:
    """SmolLM2 frozen; CASA sub-layers, vision tower, projector and a PEFT-wrapped model's SA LoRA train. Returns the
    parameter counts."""
    counts = {"trainable": 0, "frozen": 0}
    plain = unwrap_peft(model)
    for name, parameter in plain.named_parameters():
        parameter.requires_grad_(is_added(name) or ".lora_" in name)
        counts["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
    return counts


ADDED_ROWS = "model.language_model.embed_tokens.weight.added_rows"


def added_state_dict(model, dtype: torch.dtype = torch.float16) -> dict:
    """The weights CASA-SmolLM2 adds to SmolLM2 (CASA, vision tower, projector, the added token rows, the SA LoRA
    factors of a PEFT-wrapped model), as `dtype`."""
    plain = unwrap_peft(model)
    state = {name: tensor for name, tensor in plain.state_dict().items() if is_added(name)}
    state[ADDED_ROWS] = plain.get_input_embeddings().weight[-len(IMAGE_TOKENS) :]
    if plain is not model:
        state.update(_lora_factors(model))
    return {name: tensor.detach().to(dtype).contiguous() for name, tensor in state.items()}


@torch.no_grad()
def load_added_weights(model, path: str | Path, partial: bool = False) -> list[str]:
    """Put trained added weights (from `added_state_dict`) into a model built by `build_casa_smollm2`; SA LoRA
    factors go into the adapters of a PEFT-wrapped model, or are merged into SmolLM2's SA weights of a plain one.

    The weights must match the model's recipe. With `partial` (a run continued with another recipe, e.g. more CASA
    layers) what both have is loaded, and the names of the model's added weights left as built are returned."""
    plain = unwrap_peft(model)
    state = load_file(str(path))
    rows = state.pop(ADDED_ROWS)
    plain.get_input_embeddings().weight[-len(rows) :] = rows.float()
    lora = {name: state.pop(name) for name in [name for name in state if name.endswith((".lora_A", ".lora_B"))]}
    expected = {name for name in plain.state_dict() if is_added(name)}
    factors = _lora_factors(model) if plain is not model else {}
    modules = dict(plain.named_modules())
    # a plain model takes any SA LoRA (merged); a PEFT model exactly the factors of its adapters
    expected_lora = set(factors) if factors else {name for name in lora if name.rsplit(".", 1)[0] in modules}
    if not partial and (set(state) != expected or set(lora) != expected_lora):
        mismatch = sorted((set(state) ^ expected) | (set(lora) ^ expected_lora))
        raise ValueError(f"{path} does not match the recipe: {mismatch[:5]} ...")
    plain.load_state_dict({name: tensor.float() for name, tensor in state.items() if name in expected}, strict=False)
    for name in expected_lora & set(lora):
        if factors:
            factors[name].copy_(lora[name].float())
        elif name.endswith(".lora_A"):  # lora_alpha = rank: the update is B @ A
            projection = name.removesuffix(".lora_A")
            modules[projection].weight += lora[f"{projection}.lora_B"].float() @ lora[name].float()
    return sorted((expected - set(state)) | (set(factors) - set(lora)))


def recipe_from_file(path: str | Path) -> CasaSmolLM2Recipe:
    """The `recipe` entry of a training run's `recipe.json`."""
    recipe = json.loads(Path(path).read_text())["recipe"]
    return CasaSmolLM2Recipe(**{**recipe, "casa_layers": tuple(recipe["casa_layers"])})
