"""Shared pieces of the benchmarks: the token-insertion baseline driven like `CasaStream`, frames, memory."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import DynamicCache

from casa_hf.streaming import CasaStream


class InsertionStream(CasaStream):
    """Transformers' Qwen2.5-VL (token insertion) through the same streaming loop as CASA: one persistent cache,
    each frame's image tokens inserted into the sequence (and so into the cache)."""

    def __init__(self, model, processor, **kwargs):
        super().__init__(model, processor, **kwargs)
        # like CASA (whose generation config suppresses it), the baseline never generates its image token
        model.generation_config.suppress_tokens = [model.config.image_token_id]

    def _new_cache(self) -> DynamicCache:
        return DynamicCache()

    def _encode_turn(self, frame, text):
        input_ids, pixel_values, grid = super()._encode_turn(frame, text)
        if grid is not None:
            tokens_per_image = int(grid.prod()) // 4
            image = self.processor.image_token_id
            expanded = [
                t
                for token in input_ids[0].tolist()
                for t in ([token] * tokens_per_image if token == image else [token])
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


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


class TextOnlyStream(CasaStream):
    """The bare text LLM through the same loop: frames are skipped, only their text is fed (the floor)."""

    def _new_cache(self) -> DynamicCache:
        return DynamicCache()

    def _encode_turn(self, frame, text):
        return super()._encode_turn(None, self.frame_text if frame is not None and not text else text)

    def _forward(self, input_ids, pixel_values, grid) -> torch.Tensor:
        out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        return out.logits[0, -1].float()
