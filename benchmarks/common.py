"""Shared pieces of the benchmarks: the token-insertion baseline driven like `CasaStream`, frames, memory."""

from __future__ import annotations

import ctypes
import gc
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import DynamicCache

from casa_hf.casa_init import llm_weights_for_vocab
from casa_hf.streaming import CasaStream

if TYPE_CHECKING:  # Idefics3 is imported where it is built: seconds that the other models' workers need not pay
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor


class InsertionStream(CasaStream):
    """A token-insertion VLM through the same streaming loop as CASA: one persistent cache, each frame's image tokens
    inserted into the sequence (and so into the cache). Qwen2.5-VL with the CASA processor (one placeholder per
    image, expanded here from its grid) or Idefics3 with its own processor (which expands the placeholder itself)."""

    def __init__(self, model, processor, **kwargs):
        super().__init__(model, processor, **kwargs)
        # like CASA (whose generation config suppresses it), the baseline never generates its image token
        model.generation_config.suppress_tokens = [model.config.image_token_id]

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    def encode_frame(self, image, turn):
        encoded = self.processor(images=[image], text=turn, add_special_tokens=False, return_tensors="pt")
        input_ids, pixel_values = encoded["input_ids"], encoded["pixel_values"]
        grid = encoded.get("image_grid_thw")  # Idefics3's processor gives none: it expands its image tokens itself
        if grid is not None:
            tokens_per_image = int(grid.prod()) // 4
            image_token = self.processor.image_token_id
            expanded = [
                t
                for token in input_ids[0].tolist()
                for t in ([token] * tokens_per_image if token == image_token else [token])
            ]
            input_ids = torch.tensor([expanded])
        return input_ids, pixel_values, grid


def synthetic_frame(index: int, size: int) -> Image.Image:
    """Frame `index` of a synthetic video: a square moving over a slowly changing background."""
    image = Image.new("RGB", (size, size), color=(20 + (7 * index) % 200, 40, 90))
    x = (index * 9) % max(size - size // 4, 1)
    ImageDraw.Draw(image).rectangle([x, size // 3, x + size // 4, size // 3 + size // 4], fill=(240, 200, 40))
    return image


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory (VmHWM)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


def reset_peak_rss() -> None:
    """Start a new high-water mark (VmHWM) at the current resident memory, after handing freed memory back to the
    system: what a later `peak_rss_mib` reads is then the peak of what ran since, not of what came before in this
    process (e.g. building a model from another). Linux's `clear_refs` (5: reset the peak RSS)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


class TextOnlyStream(CasaStream):
    """The bare text LLM through the same loop: frames are skipped, only their text is fed (the floor)."""

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    def encode_turn(self, frame, text):
        if frame is not None:  # the frame's turn without its image
            text = self.frame_prefix + (text or self.prompt or "") + self.frame_text
        return super().encode_turn(None, text)


# SmolLM2 chat turns around each frame (bare SmolLM2 gets them without the frame)
SMOLLM2_TURN = dict(
    frame_prefix="<|im_start|>user\n", frame_text="What happens now?<|im_end|>\n<|im_start|>assistant\n"
)


def smollm2_chat(new_tokens: int) -> dict:
    """`CasaStream` arguments of a SmolLM2 chat: its system prompt, one user turn per frame (`SMOLLM2_TURN`), and
    `new_tokens` tokens generated per turn, never stopping early."""
    from casa_hf.smollm2.model import SYSTEM_PROMPT

    system = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
    return dict(system=system, **SMOLLM2_TURN, max_new_tokens=new_tokens, eos_token_id=-1)


def idefics3_on(
    llm, tokenizer, *, image_size: int, patch_size: int, scale_factor: int, vision: dict
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """Transformers' Idefics3 (SmolVLM's architecture, token insertion) on a text LLM's weights.

    The vision tower (SigLIP-style, `vision`: its sizes) and the pixel-shuffle connector are random: this baseline
    is for timing and memory only. Each image is one `image_size` tile (no splitting) of
    `(image_size / patch_size)^2 / scale_factor^2` image tokens, wrapped as Idefics3's processor does
    (`<fake_token_around_image><global-img><image>...<fake_token_around_image>`). `tokenizer` gains its tokens.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    if not llm.config.tie_word_embeddings:
        raise ValueError("idefics3_on: `llm` must tie its LM head to its embeddings (as SmolLM2 does)")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<global-img>"]})  # one token in SmolVLM's vocab
    side = {"longest_edge": image_size}
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size=side, max_image_size=side)
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len)
    config = Idefics3Config(
        text_config={**llm.config.to_dict(), "vocab_size": len(tokenizer)},
        vision_config=dict(image_size=image_size, patch_size=patch_size, **vision),
        scale_factor=scale_factor,
        image_token_id=processor.image_token_id,
        tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration(config).eval()
    model.model.text_model.load_state_dict(llm_weights_for_vocab(llm, len(tokenizer)))
    model.tie_weights()
    return model, processor


def idefics3_like(casa, tokenizer, image_size: int) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """`idefics3_on` the text LLM of a CASA model, its vision tower the size of the CASA model's (random) and as many
    image tokens per `image_size` frame (2 x 2 patches per token, as the CASA merger)."""
    vision = casa.config.vision_config
    return idefics3_on(
        casa.backbone_llm(),
        tokenizer,
        image_size=image_size,
        patch_size=vision.patch_size,
        scale_factor=vision.spatial_merge_size,
        vision=dict(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.depth,
            num_attention_heads=vision.num_heads,
        ),
    )
