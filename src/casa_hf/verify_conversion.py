"""`--verify` for conversions: the converted model must reproduce its source on text, and run with an image."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

TEXT_PROMPTS = ("Describe the weather today.", "1, 2, 3, 4, 5,", "The capital of France is")
TEXT_TOLERANCE = 1e-4  # fp32; a zero-initialised CASA output leaves the text path exactly the source's


def _text_logit_difference(source_model, casa_model, tokenizer, vocab: int | None = None) -> float:
    worst = 0.0
    for prompt in TEXT_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = source_model(input_ids=ids).logits[..., :vocab]
            actual = casa_model(input_ids=ids).logits[..., :vocab]
        worst = max(worst, (expected - actual).abs().max().item())
    return worst


def _probe_image() -> Image.Image:
    image = Image.new("RGB", (112, 112), (30, 60, 160))
    ImageDraw.Draw(image).ellipse([20, 20, 80, 80], fill=(230, 200, 40))
    return image


def _image_inputs(processor) -> dict:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _probe_image()}, {"type": "text", "text": "Describe the image."}],
        }
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _answer(model, processor, inputs: dict) -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def _check(difference: float, exact: bool) -> None:
    if exact and difference > TEXT_TOLERANCE:
        raise ValueError(
            f"Converted model's text logits differ from the source by {difference:.3g} (> {TEXT_TOLERANCE}); "
            "the conversion is wrong, nothing was written"
        )


def verify_against_qwen2_5_vl(source: Path, converted: Path, exact: bool = True) -> dict:
    """Text-only logits of source and conversion (equal with zero-initialised CASA outputs), and an image prompt
    through both (the source with its image placeholder expanded to one token per image feature)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    source_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    casa_model = AutoModel.from_pretrained(converted, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(converted)
    difference = _text_logit_difference(source_model, casa_model, processor.tokenizer)
    _check(difference, exact)

    inputs = _image_inputs(processor)
    tokens_per_image = int(inputs["image_grid_thw"].prod()) // casa_model.model.visual.spatial_merge_size**2
    expanded = []
    for token in inputs["input_ids"][0].tolist():
        expanded += [token] * (tokens_per_image if token == processor.image_token_id else 1)
    source_inputs = dict(
        input_ids=torch.tensor([expanded]),
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
    )
    return {
        "text_prompts": len(TEXT_PROMPTS),
        "text_max_abs_logit_diff": difference,
        "casa_image_answer": repr(_answer(casa_model, processor, inputs)),
        "source_image_answer": repr(_answer(source_model, processor, source_inputs)),
    }


def verify_against_llm(llm: Path, converted: Path, vocab: int, exact: bool = True) -> dict:
    """Text-only logits over the LLM's own vocabulary, and an image prompt through the converted model."""
    source_model = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    casa_model = AutoModel.from_pretrained(converted, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(converted)
    difference = _text_logit_difference(source_model, casa_model, AutoTokenizer.from_pretrained(llm), vocab)
    _check(difference, exact)
    return {
        "text_prompts": len(TEXT_PROMPTS),
        "text_max_abs_logit_diff": difference,
        "casa_image_answer": repr(_answer(casa_model, processor, _image_inputs(processor))),
    }


__all__ = ["verify_against_llm", "verify_against_qwen2_5_vl"]
