"""Stage 1 of CASA-SmolLM2's recipe: the vision tower learns scene attributes through a probe read like CASA reads."""

import numpy as np
import torch
from tiny import random_images, tiny_model, tiny_processor

from casa_hf.smollm2.vision_pretraining import (
    ATTRIBUTES,
    POSITIONS,
    AttributeProbe,
    labelled_image,
    pretrain_vision_tower,
)
from casa_hf.training.collator import IGNORE_INDEX
from casa_hf.training.synthetic_vqa import COUNTS


def test_labels_say_what_the_image_shows():
    rng = np.random.default_rng(0)
    draws = [labelled_image(rng, 112) for _ in range(40)]
    digits = [labels for _, labels in draws if labels["digit"] != IGNORE_INDEX]
    scenes = [labels for _, labels in draws if labels["digit"] == IGNORE_INDEX]
    assert digits and scenes
    assert all(labels["colour"] == labels["shape"] == labels["count"] == IGNORE_INDEX for labels in digits)
    assert all(IGNORE_INDEX not in (labels["colour"], labels["shape"], labels["count"]) for labels in scenes)
    # positions are labelled where "the shape" is one shape
    one_shape = [labels for labels in scenes if COUNTS[labels["count"]] == "one"]
    assert one_shape and len(one_shape) < len(scenes)
    for labels in scenes:
        labelled = [labels[name] != IGNORE_INDEX for name in POSITIONS]
        assert labelled == [labels in one_shape] * len(POSITIONS)
    assert all(image.size == (112, 112) for image, _ in draws)


def test_probe_reads_each_image_on_its_own():
    probe = AttributeProbe(hidden_size=64).eval()
    images = torch.randn(3, 16, 64)
    logits = probe(images)
    assert [scores.shape for scores in logits] == [(3, len(classes)) for classes in ATTRIBUTES.values()]
    moved = images.clone()
    moved[1] += torch.randn(16, 64)
    for before, after in zip(logits, probe(moved), strict=True):
        torch.testing.assert_close(before[[0, 2]], after[[0, 2]])
        assert (before[1] - after[1]).abs().max() > 0


def test_pretraining_trains_the_tower_only_and_leaves_it_as_frozen_as_it_was():
    model = tiny_model(casa_image_centering=True)
    model.model.visual.requires_grad_(False)  # `--freeze-vision`: only stage 1 trains the tower
    processor = tiny_processor(image_size=112)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pixel_values, grid = random_images([(8, 8)])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, grid).pooler_output[0]
    accuracy = pretrain_vision_tower(model, processor, steps=3, batch_size=4)
    assert {"colour", "digit"} & set(accuracy) and set(accuracy) <= set(ATTRIBUTES)
    assert all(0 <= value <= 1 for value in accuracy.values())
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith("model.visual.") for name in changed)
    assert not model.model.visual.training
    assert not any(parameter.requires_grad for parameter in model.model.visual.parameters())
    with torch.no_grad():
        assert (model.model.get_image_features(pixel_values, grid).pooler_output[0] - features).abs().max() > 0
