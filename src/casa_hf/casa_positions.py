"""RoPE positions of a CASA model's text and image keys: the image keys' positions follow `casa_image_positions`
(each image's insertion point, its tokens laid out from it, or Qwen2.5-VL's mRoPE grid), and one rotary call gives
the cos/sin of both. Shared by the Transformers model and the vLLM one (`casa_hf.vllm`)."""

from __future__ import annotations

import torch
from torch import nn

from .configuration_casa import CasaConfig, mrope_section


class CasaPositions:
    """The backbone's rotary embedding (`rotary_emb`, a module of the model that owns it), applied to CASA's text
    and image keys as `CasaConfig.casa_image_positions` lays the images out."""

    def __init__(self, config: CasaConfig, rotary_emb: nn.Module):
        self.rotary_emb = rotary_emb
        self.text_config = config.text_config
        self.kind = config.casa_image_positions
        self.spatial_merge_size = config.vision_config.spatial_merge_size
        # mRoPE: which of (temporal, height, width) turns each rotary dimension: Qwen2.5-VL's sections over the
        # frequencies, repeated for the two rotated halves of a head as its cos/sin are
        self.mrope_components = None
        if self.kind == "mrope":
            section = mrope_section(config.text_config)
            components = [i % 3 for i, size in enumerate(section) for _ in range(size)]
            self.mrope_components = components + components

    def embeddings(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, image_positions: torch.Tensor | None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """RoPE cos/sin of the text tokens and of the image keys, from one rotary call: rope types whose frequencies
        follow the largest position seen (`dynamic`) then rotate an image's keys with the frequencies of the text
        around it, and the rotary state does not depend on the order of two calls.

        `image_positions` is `[1, N]`, or `[3, N]` (temporal, height, width) for mRoPE: each rotary dimension then
        takes the cos/sin of its section's component, as Qwen2.5-VL's rotary embedding composes them, so the image
        keys' cos/sin keep the shape of 1-D ones and `apply_rotary_pos_emb` rotates them unchanged."""
        if image_positions is None:
            return self.rotary_emb(inputs_embeds, position_ids=position_ids), None
        num_text = position_ids.numel()
        joint = torch.cat([position_ids.reshape(1, -1), image_positions.reshape(1, -1)], dim=-1)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids=joint)
        shape = (*position_ids.shape, cos.shape[-1])
        text = (cos[:, :num_text].reshape(shape), sin[:, :num_text].reshape(shape))
        image_cos, image_sin = cos[0, num_text:], sin[0, num_text:]
        if image_positions.shape[0] > 1:  # [components * N, dim] -> each dimension from its component's row
            rows = image_positions.shape[-1]
            pick = torch.tensor(self.mrope_components, device=image_cos.device)[None, None].expand(1, rows, -1)
            image_cos = image_cos.view(-1, rows, image_cos.shape[-1]).gather(0, pick)[0]
            image_sin = image_sin.view(-1, rows, image_sin.shape[-1]).gather(0, pick)[0]
        return text, (image_cos[None], image_sin[None])

    def image_positions(
        self,
        insertion_points: torch.Tensor,
        image_sizes: list[int],
        image_grids: torch.Tensor | None,
    ) -> torch.Tensor:
        """RoPE positions of the image keys, `[1, N]` or, for mRoPE, `[3, N]` (temporal, height, width), from each
        image's insertion point (its placeholder's text position) and, for `"raster"` and `"mrope"`, its tokens'
        places. mRoPE lays an image out as Qwen2.5-VL's `get_rope_index` does, its temporal position frozen at the
        insertion point p: the token of frame f, row r, column c of the merged grid is at (p + f, p + r, p + c)."""
        device = insertion_points.device
        sizes = torch.tensor(image_sizes, device=device)
        positions = insertion_points.repeat_interleave(sizes)
        local = torch.arange(len(positions), device=device) - (torch.cumsum(sizes, 0) - sizes).repeat_interleave(sizes)
        if self.kind == "raster":  # token j of an image sits at insertion point + j
            return (positions + local)[None]
        if self.kind == "mrope":
            if image_grids is None:
                raise ValueError(
                    "casa_image_positions='mrope' lays image keys out by each image's grid: pass `pixel_values` with "
                    "`image_grid_thw`, or `mm_encoder_outputs['image']` as `get_image_features` returns it (with its "
                    "`image_grid_thw`)"
                )
            grids = image_grids.to(device)
            merge = self.spatial_merge_size
            merged = torch.stack([grids[:, 0], grids[:, 1] // merge, grids[:, 2] // merge], -1)
            if merged.prod(-1).tolist() != list(image_sizes):
                raise ValueError(
                    f"image grids {grids.tolist()} (merged by {merge}) do not give the images' token counts "
                    f"{list(image_sizes)}"
                )
            height, width = merged[:, 1].repeat_interleave(sizes), merged[:, 2].repeat_interleave(sizes)
            frame, row, column = local // (height * width), (local // width) % height, local % width
            return torch.stack([frame, row, column]) + positions[None]
        return positions[None]


__all__ = ["CasaPositions"]
