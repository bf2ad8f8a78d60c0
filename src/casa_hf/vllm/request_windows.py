"""Each running vLLM request's CASA windows, and how one engine step's flat batch splits into their chunks.

vLLM pages the self-attention K/V of every request; a CASA window (the latest image's K/V and the text since it) is
per request and moves at each image, which no vLLM KV spec expresses. So the windows live here, one `CasaWindow`
(batch of one) per CASA layer and request, exactly as `CasaCache` holds them in Transformers, and CASA attention
runs request by request through casa_hf's own code. A request is known by its first KV-cache block, which it keeps
from its first step to its last (prefix caching, which would share blocks between requests, is turned off by the
plugin); a chunk starting at position 0 starts the request afresh (a new request, or one recomputed after
preemption), so a block handed to a later request never carries an earlier request's windows into it, and a
finished request's windows are released when vLLM's runner drops the request.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import accumulate

import torch

from ..casa_attention import CasaInputs, build_casa_windows
from ..casa_cache import CasaWindow
from ..casa_positions import CasaPositions


@dataclass
class StepImages:
    """The images of one engine step, as `embed_input_ids` saw them: features in placeholder order, and masks over
    the step's flat tokens."""

    features: list[torch.Tensor]  # one [image_tokens, hidden] tensor per placeholder of the step, in order
    grids: list[torch.Tensor]  # each image's (t, h, w) patch grid
    image_mask: torch.Tensor  # [num_tokens] image placeholders
    marker_mask: torch.Tensor | None  # [num_tokens] vision start / end tokens (None: the config has neither)

    def padded_to(self, num_tokens: int) -> StepImages:
        """The masks over `num_tokens` tokens, padding (neither placeholders nor markers) after the step's own."""
        padding = num_tokens - self.image_mask.shape[0]
        if padding < 0:
            raise RuntimeError(
                f"The step has {num_tokens} tokens, its embeddings were made for {self.image_mask.shape[0]}"
            )
        if padding == 0:
            return self

        def pad(mask: torch.Tensor | None) -> torch.Tensor | None:
            return None if mask is None else torch.nn.functional.pad(mask, (0, padding), value=False)

        return StepImages(self.features, self.grids, pad(self.image_mask), pad(self.marker_mask))


@dataclass
class RequestChunk:
    """One request's tokens in a step (`start:end` of the flat batch) and what its CASA layers need."""

    start: int
    end: int
    windows: dict[int, CasaWindow]  # per CASA block
    casa_inputs: CasaInputs
    image_rows: slice  # its images' rows in the step's concatenated image features


@dataclass
class CasaStep:
    """What every CASA layer of one engine step shares: its request chunks, RoPE and image features."""

    chunks: list[RequestChunk]
    text_rope: tuple[torch.Tensor, torch.Tensor]  # cos/sin of every token, [1, tokens, dim]
    image_features: torch.Tensor | None  # the step's images, concatenated in placeholder order


class RequestWindows:
    """The CASA windows of every running request, by request key (its first KV-cache block)."""

    def __init__(self, casa_blocks: list[int], consecutive_images: bool, uses_rope: bool, positions: CasaPositions):
        self.casa_blocks = casa_blocks
        self.consecutive_images = consecutive_images
        self.uses_rope = uses_rope  # CASA queries and image keys carry RoPE (`CasaConfig.casa_uses_rope`)
        self.positions = positions
        self.by_request: dict[int, dict[int, CasaWindow]] = {}

    def split_step(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        request_keys: list[int],
        query_start_loc: list[int],
        images: StepImages,
    ) -> CasaStep:
        """Cut a step's flat tokens into request chunks, each with its windows (new ones at position 0) and CASA
        inputs."""
        image_mask = images.image_mask
        image_features = torch.cat(images.features) if images.features else None
        image_sizes = [feature.shape[0] for feature in images.features]
        image_positions = None
        if image_features is not None and self.uses_rope:
            grids = torch.stack(images.grids) if images.grids else None
            image_positions = self.positions.image_positions(positions[image_mask], image_sizes, grids)
        text_rope, image_rope = self.positions.embeddings(hidden_states[None], positions[None], image_positions)

        chunks = []
        image_index = 0
        offsets = [0, *accumulate(image_sizes)]  # each image's first row in `image_features`
        # read once from the device: each request's first position, and where the placeholders are
        starts, ends = query_start_loc[:-1], query_start_loc[1:]
        first_index = torch.tensor(starts, dtype=torch.long, device=positions.device).clamp(max=positions.shape[0] - 1)
        first_positions = positions[first_index].tolist()  # (an empty request's, clamped, is never read)
        placeholders = image_mask.nonzero()[:, 0].tolist()
        for key, start, end, first_position in zip(request_keys, starts, ends, first_positions, strict=True):
            if end == start:
                continue
            chunk_images = bisect.bisect_left(placeholders, end) - bisect.bisect_left(placeholders, start)
            sizes = image_sizes[image_index : image_index + chunk_images]
            rows = slice(offsets[image_index], offsets[image_index + chunk_images])
            windows, continues = self._windows_of(key, first_position)
            chunk_image_mask = image_mask[None, start:end]
            markers = images.marker_mask[None, start:end] if images.marker_mask is not None else None
            casa_windows = None
            if not continues or chunk_images:
                open_runs = None
                if continues and self.consecutive_images:
                    open_runs = next(iter(windows.values())).open_runs()
                casa_windows = build_casa_windows(
                    chunk_image_mask,
                    torch.ones_like(chunk_image_mask),
                    sizes,
                    None,
                    marker_mask=markers,
                    consecutive=self.consecutive_images,
                    open_runs=open_runs,
                )
            else:
                for window in windows.values():
                    window.note_markers(markers)
            chunk_image_rope = None
            if image_rope is not None and chunk_images:
                chunk_image_rope = (image_rope[0][:, rows], image_rope[1][:, rows])
            chunks.append(RequestChunk(start, end, windows, CasaInputs(casa_windows, chunk_image_rope), rows))
            image_index += chunk_images
        return CasaStep(chunks, text_rope, image_features)

    def release(self, key: int) -> None:
        """A finished request's windows go (vLLM's runner reports it, see `casa_hf.vllm.register`)."""
        self.by_request.pop(key, None)

    def _windows_of(self, key: int, first_position: int) -> tuple[dict[int, CasaWindow], bool]:
        """A request's windows, and whether its chunk continues them; new (empty) ones for a chunk at position 0."""
        if first_position == 0:
            self.by_request[key] = {block: CasaWindow() for block in self.casa_blocks}
            return self.by_request[key], False
        windows = self.by_request.get(key)
        if windows is None:
            raise RuntimeError(
                f"A request continues at position {first_position} but its CASA windows were never started: a step "
                "skipped its first tokens (prefix caching, or a KV connector that loads computed tokens), which "
                "CASA cannot follow, since its windows live outside vLLM's KV cache"
            )
        return windows, True


__all__ = ["CasaStep", "RequestChunk", "RequestWindows", "StepImages"]
