"""CasaProcessor, chat template and `pipeline("image-text-to-text")`, offline on a tiny saved model."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMAGE_TOKEN, tiny_model, tiny_processor, tiny_tokenizer
from transformers import AutoProcessor, pipeline

import casa_hf  # noqa: F401  (registers the Auto classes)
from casa_hf.image_inputs import load_image_input

PROMPT_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def expected_grid(height: int, width: int, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> list[int]:
    """Qwen2-VL resizing worked out by hand: sides rounded to 28 px, area kept within [min, max]."""
    h, w = round(height / 28) * 28, round(width / 28) * 28
    if h * w > max_pixels:
        scale = (height * width / max_pixels) ** 0.5
        h, w = int(height / scale // 28) * 28, int(width / scale // 28) * 28
    elif h * w < min_pixels:
        scale = (min_pixels / (height * width)) ** 0.5
        h, w = -(-height * scale // 28) * 28, -(-width * scale // 28) * 28
    return [1, int(h) // 14, int(w) // 14]


def expected_ids(text: str) -> list[int]:
    vocab = tiny_tokenizer().get_vocab()
    text = text.replace(PROMPT_IMAGE, " <|vision_start|> <|image_pad|> <|vision_end|> ")
    for special in ("<|im_start|>", "<|im_end|>"):
        text = text.replace(special, f" {special} ")
    return [vocab[word] for word in text.split()]


def test_processor_outputs_match_an_independent_computation():
    processor = tiny_processor()
    sizes = [(60, 90), (30, 30), (200, 120)]
    images = [[picture(*sizes[0], 0), picture(*sizes[1], 1)], [picture(*sizes[2], 2)]]
    texts = [f"what is {PROMPT_IMAGE} and {PROMPT_IMAGE} ?", f"describe {PROMPT_IMAGE}"]
    out = processor(images=images, text=texts, return_tensors="pt")

    assert out["image_grid_thw"].tolist() == [expected_grid(*size) for size in sizes]
    assert out["pixel_values"].shape == (int(out["image_grid_thw"].prod(-1).sum()), 3 * 2 * 14 * 14)
    rows = [expected_ids(text) for text in texts]
    width = max(len(row) for row in rows)
    for row, ids, mask in zip(rows, out["input_ids"].tolist(), out["attention_mask"].tolist(), strict=True):
        pad = width - len(row)
        assert ids == [0] * pad + row  # left padding, for generation
        assert mask == [0] * pad + [1] * len(row)
    assert (out["input_ids"] == IMAGE_TOKEN).sum().item() == 3  # one token per image


def test_resolution_controls():
    processor = tiny_processor()
    image = picture(60, 90)
    fixed = processor(images=[image], text=f"{PROMPT_IMAGE} ?", image_size=56, return_tensors="pt")
    assert fixed["image_grid_thw"].tolist() == [[1, 4, 4]]
    bigger = processor(images=[image], text=f"{PROMPT_IMAGE} ?", max_pixels=224 * 224, return_tensors="pt")
    assert bigger["image_grid_thw"].tolist() == [expected_grid(60, 90, max_pixels=224 * 224)]
    arrays = processor(
        images=[np.asarray(image), torch.from_numpy(np.array(image)).permute(2, 0, 1)],
        text=f"{PROMPT_IMAGE} {PROMPT_IMAGE}",
        return_tensors="pt",
    )
    assert arrays["image_grid_thw"].tolist() == [expected_grid(60, 90)] * 2


def test_save_load_round_trip(tmp_path):
    processor = tiny_processor(image_size=84)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "CasaProcessor"
    assert loaded.chat_template == processor.chat_template and loaded.image_size == 84
    inputs = dict(images=[picture(60, 90)], text=f"what is {PROMPT_IMAGE} ?", return_tensors="pt")
    a, b = processor(**inputs), loaded(**inputs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chat_template_places_images_and_video_frames_and_marks_the_assistant():
    processor = tiny_processor()
    frames = [picture(56, 56, seed) for seed in range(3)]
    messages = [
        {"role": "system", "content": "describe it ."},
        {"role": "user", "content": [{"type": "image", "image": picture(60, 90)}, {"type": "text", "text": "what ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red square ."}]},
        {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "what changed ?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\ndescribe it .<|im_end|>\n"
        f"<|im_start|>user\n{PROMPT_IMAGE}what ?<|im_end|>\n"
        "<|im_start|>assistant\na red square .<|im_end|>\n"
        f"<|im_start|>user\n{PROMPT_IMAGE * 3}what changed ?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    out = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        return_tensors="pt",
    )
    assert out["input_ids"][0].tolist() == expected_ids(text)
    assert out["image_grid_thw"].tolist() == [expected_grid(60, 90)] + [expected_grid(56, 56)] * 3
    ids, mask = out["input_ids"][0].tolist(), out["assistant_masks"][0].tolist()
    assert [i for i, m in zip(ids, mask, strict=True) if m] == expected_ids("a red square . <|im_end|>")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-casa")
    tiny_model(attn="sdpa").save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def test_pipeline_equals_generate(saved_model):
    pipe = pipeline("image-text-to-text", model=str(saved_model))
    model, processor = pipe.model, pipe.processor
    image, other = picture(60, 90), picture(84, 56, 1)

    def generate(images, text, new_tokens):
        """Reference: processor + `model.generate`, returning the new token ids of each sample."""
        inputs = processor(images=images, text=text, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return out[:, inputs["input_ids"].shape[1] :].tolist()

    def pipeline_ids(*args, **kwargs):
        out = pipe(*args, return_tensors=True, **kwargs)
        prompt_length = len(processor.tokenizer(out[0]["input_text"])["input_ids"])
        return out[0]["generated_token_ids"][prompt_length:].tolist()

    prompt = f"what is {PROMPT_IMAGE} ?"
    single = pipe(images=image, text=prompt, max_new_tokens=6, return_full_text=False)
    expected = generate([image], prompt, 6)[0]
    assert single[0]["generated_text"].strip() == processor.decode(expected, skip_special_tokens=True)
    assert pipeline_ids(images=image, text=prompt, max_new_tokens=6) == expected
    full = pipe(images=image, text=prompt, max_new_tokens=6)
    assert full[0]["generated_text"].startswith(prompt)
    assert full[0]["generated_text"].endswith(single[0]["generated_text"])

    two = f"{PROMPT_IMAGE} and {PROMPT_IMAGE} ?"
    assert pipeline_ids(images=[image, other], text=two, max_new_tokens=4) == generate([image, other], two, 4)[0]

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "image", "image": other},
                {"type": "text", "text": "what changed ?"},
            ],
        }
    ]
    chat = pipe(text=messages, max_new_tokens=5, return_full_text=False)
    chat_prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = generate([image, other], chat_prompt, 5)[0]
    assert chat[0]["generated_text"].strip() == processor.decode(expected, skip_special_tokens=True)

    # Images in several turns: each turn's text sees the image(s) of that turn only, as CASA defines.
    multi_turn = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is it ?"}]},
        {"role": "assistant", "content": "a square ."},
        {"role": "user", "content": [{"type": "image", "image": other}, {"type": "text", "text": "and this ?"}]},
    ]
    turns = pipe(text=multi_turn, max_new_tokens=4, return_full_text=False)
    expected = generate([image, other], processor.apply_chat_template(multi_turn, add_generation_prompt=True), 4)
    assert turns[0]["generated_text"].strip() == processor.post_process_image_text_to_text(expected)[0]

    texts = [prompt, f"describe {PROMPT_IMAGE}"]
    batch = pipe(images=[[image], [other]], text=texts, max_new_tokens=4, return_full_text=False, batch_size=2)
    expected = generate([[image], [other]], texts, 4)
    assert [b["generated_text"].strip() for b in batch] == processor.batch_decode(expected, skip_special_tokens=True)
    assert all(len(ids) == 4 for ids in expected)


def test_bad_inputs_name_the_problem(tmp_path):
    processor = tiny_processor()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="Cannot read image file .*corrupt.png"):
        processor(images=[str(corrupt)], text=PROMPT_IMAGE)
    truncated = tmp_path / "truncated.png"
    picture(64, 64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="Cannot read image file .*truncated.png"):
        processor(images=[truncated], text=PROMPT_IMAGE)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor(images=[tmp_path / "missing.png"], text=PROMPT_IMAGE)
    with pytest.raises(TypeError, match="Unsupported image type dict"):
        processor(images=[{"pixels": 1}], text=PROMPT_IMAGE)
    with pytest.raises(ValueError, match="image"):
        processor(images=[picture(56, 56), picture(56, 56)], text=f"one {PROMPT_IMAGE} only")
    with pytest.raises(ValueError, match="image"):
        processor(images=[picture(56, 56)], text=f"{PROMPT_IMAGE} and {PROMPT_IMAGE}")
    with pytest.raises(ValueError, match="empty prompt"):
        processor(images=[picture(56, 56)], text="  ")
    with pytest.raises(ValueError, match="non-empty list"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}])


def test_a_file_that_is_not_an_image_is_named_with_its_size_and_what_it_looks_like(tmp_path):
    pdf, text = tmp_path / "scan.png", tmp_path / "notes.jpg"
    pdf.write_bytes(b"%PDF-1.7\n" + bytes(91))
    text.write_text("a shopping list\n")
    with pytest.raises(ValueError, match=r"Cannot read image file .*scan\.png \(100 bytes, starts like a PDF file\)"):
        load_image_input(str(pdf))
    with pytest.raises(ValueError, match=r"notes\.jpg \(16 bytes, looks like plain text \('a shopping list"):
        load_image_input(text)


def test_data_urls_load_as_transformers_load_image_takes_them():
    """`transformers serve` hands an OpenAI `image_url` to the processor as it came: a data URL is an image too."""
    image = picture(20, 30)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    np.testing.assert_array_equal(np.asarray(load_image_input(url)), np.asarray(image))
    with pytest.raises(ValueError, match=r"Cannot read the image in a data URL \(6 bytes, starts like a PDF file\)"):
        load_image_input("data:image/png;base64," + base64.b64encode(b"%PDF-1").decode())


def test_images_given_per_sample_must_match_each_sample():
    processor = tiny_processor()
    red, blue = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")
    texts = [f"{PROMPT_IMAGE} a", f"{PROMPT_IMAGE} b"]
    # same total (2 images, 2 tokens) but sample 1 would silently take sample 0's second image
    with pytest.raises(ValueError, match=r"Sample 0 has 2 image\(s\) in images\[0\] but 1 image token"):
        processor(images=[[red, blue], []], text=texts)
    with pytest.raises(ValueError, match=r"Sample 1 has 0 image\(s\) in images\[1\] but 1 image token"):
        processor(images=[[red], []], text=texts)
    with pytest.raises(ValueError, match="images has 1 per-sample lists but text has 2 samples"):
        processor(images=[[red, blue]], text=texts)

    per_sample = processor(images=[[red], [blue]], text=texts, return_tensors="pt")
    alone = [
        processor(images=[image], text=text, return_tensors="pt")
        for image, text in zip((red, blue), texts, strict=True)
    ]
    assert torch.equal(per_sample["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    text_only = processor(images=[[red], []], text=[f"{PROMPT_IMAGE} a", "b"], return_tensors="pt")
    assert text_only["image_grid_thw"].shape == (1, 3)


@pytest.mark.parametrize("images", [None, []])
def test_an_empty_batch_of_prompts_is_refused(images):
    with pytest.raises(ValueError, match="text is an empty list"):
        tiny_processor()(text=[], images=images)


def test_the_processor_pads_left_without_changing_the_callers_tokenizer():
    processor = tiny_processor()
    processor.tokenizer.padding_side = "right"  # the caller's choice, for its own use of the tokenizer
    batch = processor(text=["what colour", "what colour is the square"], return_tensors="pt")
    assert batch["attention_mask"][0].tolist() == [0, 0, 0, 1, 1]
    assert processor.tokenizer.padding_side == "right"
