"""Batches of interleaved image-text conversations for training: labels on assistant tokens only, optional packing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.feature_extraction_utils import BatchFeature

IGNORE_INDEX = -100


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


class CasaDataCollator:
    """Turns examples `{"messages": [...]}` into model inputs with `labels` (-100 except on assistant tokens).

    With `pack=True`, conversations are laid back to back in rows of at most `max_length` tokens (first fit, in
    order); `position_ids` restart at 0 for each conversation, which is how the model keeps self-attention and CASA
    windows inside each conversation. Without packing, rows are right-padded.

    `expand_image_tokens=True` repeats each image token once per image feature: the same data for a token-insertion
    baseline (Qwen2.5-VL), with the image tokens out of the loss.
    """

    def __init__(
        self, processor, pack: bool = False, max_length: int | None = None, expand_image_tokens: bool = False
    ):
        if pack and not max_length:
            raise ValueError("Packing needs max_length (the row length)")
        self.processor = processor
        self.pack = pack
        self.max_length = max_length
        self.expand_image_tokens = expand_image_tokens
        self.pad_token_id = processor.tokenizer.pad_token_id

    def encode(self, messages: list[dict]) -> EncodedConversation:
        """Token ids and labels of one conversation (which must contain an assistant turn)."""
        encoded = self.processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
        )
        ids = encoded["input_ids"][0].tolist()
        assistant = encoded["assistant_masks"][0].tolist()
        if 1 not in assistant:
            raise ValueError("A training conversation needs an assistant turn to learn from")
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, assistant, strict=True)]
        grid = encoded.get("image_grid_thw")
        ids, labels = self._expand(ids, grid), self._expand(labels, grid, ids)
        return EncodedConversation(ids, labels, encoded.get("pixel_values"), grid)

    def encode_prompt(self, messages: list[dict]) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """Token ids (with the generation prompt) and images of a conversation to answer."""
        encoded = self.processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
        )
        grid = encoded.get("image_grid_thw")
        return self._expand(encoded["input_ids"][0].tolist(), grid), encoded.get("pixel_values"), grid

    def _expand(self, values: list[int], grid: torch.Tensor | None, ids: list[int] | None = None) -> list[int]:
        """For token insertion: repeat the entry of each image token once per image feature."""
        if not self.expand_image_tokens or grid is None:
            return values
        ids = ids if ids is not None else values
        per_image = iter((grid.prod(-1) // self.processor.image_processor.merge_size**2).tolist())
        image = self.processor.image_token_id
        return [v for v, t in zip(values, ids, strict=True) for _ in range(next(per_image) if t == image else 1)]

    def __call__(self, examples: list[dict]) -> BatchFeature:
        conversations = [self.encode(example["messages"]) for example in examples]
        if self.max_length:
            too_long = [len(c.input_ids) for c in conversations if len(c.input_ids) > self.max_length]
            if too_long:
                raise ValueError(f"Conversations of {too_long} tokens exceed max_length={self.max_length}")
        rows = self._pack(conversations) if self.pack else [[c] for c in conversations]
        width = max(sum(len(c.input_ids) for c in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        position_ids = torch.zeros(len(rows), width, dtype=torch.long)
        pixels, grids = [], []
        for r, row in enumerate(rows):
            start = 0
            for conversation in row:
                end = start + len(conversation.input_ids)
                input_ids[r, start:end] = torch.tensor(conversation.input_ids)
                labels[r, start:end] = torch.tensor(conversation.labels)
                attention_mask[r, start:end] = 1
                position_ids[r, start:end] = torch.arange(end - start)
                if conversation.pixel_values is not None:
                    pixels.append(conversation.pixel_values)
                    grids.append(conversation.image_grid_thw)
                start = end
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.pack:
            batch["position_ids"] = position_ids
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat(grids)
        return BatchFeature(batch)

    def _pack(self, conversations: list[EncodedConversation]) -> list[list[EncodedConversation]]:
        rows: list[list[EncodedConversation]] = []
        for conversation in conversations:
            for row in rows:
                if sum(len(c.input_ids) for c in row) + len(conversation.input_ids) <= self.max_length:
                    row.append(conversation)
                    break
            else:
                rows.append([conversation])
        return rows


__all__ = ["CasaDataCollator", "IGNORE_INDEX"]
