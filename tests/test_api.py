"""Transformers integration: Auto classes, save/load, training hooks, and clear errors on bad input."""

import json

import pytest
import torch
from tiny import IMAGE_TOKEN, VOCAB, random_images, random_text, tiny_config, tiny_model, tiny_processor
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    FineGrainedFP8Config,
    Trainer,
    TrainingArguments,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

import casa_hf
from casa_hf import CasaConfig, CasaForConditionalGeneration


def image_inputs():
    ids = torch.tensor([random_text(3) + [IMAGE_TOKEN] + random_text(4, 1)])
    pixel_values, grid = random_images([(4, 4)])
    return dict(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid)


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM])
def test_save_load_round_trip_through_auto_classes(tmp_path, auto_class):
    model = tiny_model(attn="sdpa")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "casa" and "auto_map" not in config
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CasaConfig)

    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CasaForConditionalGeneration)
    inputs = image_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    generated = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_parameter_names_keep_the_backbone_layout():
    names = set(dict(tiny_model().named_parameters()))
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in names
    assert "model.language_model.layers.1.casa_attn.o_proj.weight" in names
    assert "model.visual.merger.mlp.0.weight" in names
    casa = {n for n in names if "casa" in n}
    assert casa and all(".layers." in n for n in casa)

    shared = set(dict(tiny_model(casa_shared=True).named_parameters()))
    assert not any("casa_attn" in n for n in shared)
    partial = set(dict(tiny_model(casa_layers=[1]).named_parameters()))
    assert not any("layers.0.casa" in n for n in partial) and any("layers.1.casa" in n for n in partial)


def test_tied_embeddings_follow_the_backbone():
    tied = tiny_model(text_config={**tiny_config().text_config.to_dict(), "tie_word_embeddings": True})
    assert tied.config.tie_word_embeddings
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    untied = tiny_model()
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


def test_labels_give_the_loss_and_logits_to_keep_slices():
    model = tiny_model()
    inputs = image_inputs()
    labels = inputs["input_ids"].clone()
    labels[:, :4] = -100
    out = model(**inputs, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    last = model(**inputs, logits_to_keep=1).logits
    assert last.shape[1] == 1 and torch.allclose(last[:, 0], out.logits[:, -1], atol=1e-6)


def test_gradient_checkpointing_trains_casa_and_backbone():
    model = tiny_model(attn="sdpa").train()
    model.activation_checkpointing_enable()  # the Transformers 5 name of gradient_checkpointing_enable
    assert all(layer.gradient_checkpointing for layer in model.model.language_model.layers)
    inputs = image_inputs()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["model.language_model.layers.0.casa_attn.q_proj.weight"].abs().sum() > 0
    assert grads["model.language_model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["model.visual.blocks.0.attn.qkv.weight"].abs().sum() > 0


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_with_images_gives_the_gradients_of_plain_backward(use_reentrant):
    model = tiny_model(attn="sdpa").train()
    inputs = image_inputs()

    def gradients():
        model.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = gradients()
    assert checkpointed.keys() == plain.keys() and "model.visual.blocks.0.attn.qkv.weight" in plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_past_key_values_alias_still_accepted():
    model = tiny_model()
    ids = torch.tensor([random_text(5)])
    out = model(input_ids=ids, past_key_values=casa_hf.CasaCache(), use_cache=True)
    assert out.cache.get_seq_length() == 5


def test_image_token_count_mismatch_names_both_counts():
    model = tiny_model()
    inputs = image_inputs()
    inputs["input_ids"] = torch.tensor([random_text(3) + [IMAGE_TOKEN, IMAGE_TOKEN] + random_text(2)])
    with pytest.raises(ValueError, match="Found 2 image tokens .* but 1 images"):
        model(**inputs)
    with pytest.raises(ValueError, match="Found 1 image tokens .* but 0 images"):
        model(input_ids=torch.tensor([[5, IMAGE_TOKEN, 6]]))


def test_bad_pixel_shapes_are_refused():
    model = tiny_model()
    inputs = image_inputs()
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:10]})
    with pytest.raises(ValueError, match="image_grid_thw must have shape"):
        model(**{**inputs, "image_grid_thw": inputs["image_grid_thw"][0]})


def test_a_mask_shorter_than_the_input_is_named():
    model = tiny_model()
    inputs = image_inputs()
    with pytest.raises(ValueError, match="attention_mask has 2 columns but input_ids has"):
        model(**inputs, attention_mask=torch.ones(1, 2, dtype=torch.long))


@pytest.mark.parametrize("argument", ["pixel_values", "image_grid_thw", "attention_mask"])
def test_inputs_that_are_not_tensors_are_named(argument):
    model = tiny_model()
    inputs = {**image_inputs(), argument: "not a tensor"}
    with pytest.raises(TypeError, match=f"{argument} must be a torch.Tensor, got str"):
        model(**inputs)
    if argument != "attention_mask":  # generate() itself reads the mask's shape first, as for any model
        with pytest.raises(TypeError, match=f"{argument} must be a torch.Tensor, got str"):
            model.generate(**inputs, max_new_tokens=2)


def test_an_empty_batch_is_refused_by_forward_and_generate():
    model = tiny_model()
    empty = torch.zeros(0, 4, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"input_ids must be a non-empty \(batch, sequence\) tensor, got shape \(0, 4\)"
    ):
        model(input_ids=empty)
    with pytest.raises(ValueError, match=r"input_ids must be a non-empty .* got shape \(0, 4\)"):
        model.generate(input_ids=empty, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"inputs_embeds must be a non-empty .* got shape \(0, 4, 64\)"):
        model(inputs_embeds=torch.zeros(0, 4, 64))


def test_image_grids_and_patch_widths_the_vision_tower_cannot_take_are_named():
    model = tiny_model()
    inputs = image_inputs()
    for row in ([1, 3, 4], [1, 4, 0], [0, 4, 4]):  # odd height (merge size 2), empty width, no frame
        grid = torch.tensor([row])
        patches = torch.randn(max(int(grid.prod()), 1), inputs["pixel_values"].shape[1])
        with pytest.raises(ValueError, match=rf"image_grid_thw\[0\] = \{row}.*multiples of spatial_merge_size=2"):
            model(**{**inputs, "pixel_values": patches, "image_grid_thw": grid})
    with pytest.raises(ValueError, match=r"pixel_values has shape \(16, 1000\), expected \(16, 1176\)"):
        model(**{**inputs, "pixel_values": torch.randn(16, 1000)})


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(casa_attention="gated"), "casa_attention"),
        (dict(casa_placement="stacked"), "casa_placement"),
        (dict(casa_placement="replace"), "casa_placement='replace'.*set casa_shared=True"),
        (dict(casa_placement="replace", casa_shared=True), r"in every block \(casa_layers=None\)"),
        (dict(casa_shared="yes"), "casa_shared"),
        (dict(casa_cross_attention_rope="yes"), "casa_cross_attention_rope"),
        (dict(casa_layers=[0, 5]), "casa_layers"),
        (dict(casa_layers=[1, 1]), "casa_layers"),
        (dict(casa_layers=[]), r"casa_layers=\[\] gives a model on which images have no effect"),
        (dict(vision_start_token_id=999), "vision_start_token_id"),
        (dict(image_token_id=999), "image_token_id"),
        (dict(casa_image_positions="grid"), "casa_image_positions"),
        (dict(casa_image_centering="yes"), "casa_image_centering"),
        (dict(casa_text_only_windows="drop"), "casa_text_only_windows"),
        (dict(vision_config=dict(out_hidden_size=32)), "out_hidden_size"),
        (dict(text_config=dict(model_type="gpt2")), "text_config.model_type"),
    ],
)
def test_bad_config_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_a_misspelt_casa_field_is_kept_with_a_warning_naming_the_field(caplog):
    with caplog.at_level("WARNING", logger="casa_hf.configuration_casa"):
        config = tiny_config(casa_attenton="cross_attention", library_key=1)
    assert config.casa_attenton == "cross_attention" and config.casa_attention == "casa"
    assert "'casa_attenton'" in caplog.text and "did you mean the CASA field 'casa_attention'" in caplog.text
    assert "library_key" not in caplog.text


def test_saved_configs_with_keys_casa_does_not_list_reload(tmp_path):
    """Like built-in configs, keep unknown keys: `quantization_config` after a quantized load, other attributes."""
    model = tiny_model(attn="sdpa")
    model.config.quantization_config = FineGrainedFP8Config(dequantize=True)
    model.config.library_state = {"adapter": "lora", "rank": 4}
    model.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path, output_hidden_states=True)
    assert isinstance(config, CasaConfig) and config.library_state == {"adapter": "lora", "rank": 4}
    assert config.quantization_config["quant_method"] == "fp8" and config.quantization_config["dequantize"]
    assert config.output_hidden_states

    # The FP8 quantizer dequantizes on CPU and drops its config; the other keys stay on the loaded model's config.
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CasaForConditionalGeneration) and loaded.config.library_state["rank"] == 4
    inputs = image_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_new_configs_are_parallel_and_reload_as_saved(tmp_path):
    """New configs take the paper's parallel block; whichever placement is saved (the key is always written, even at
    its default) reloads, while a saved config without the key predates it and loads sequential."""
    assert CasaConfig().casa_placement == tiny_config().casa_placement == "parallel"
    for placement in ("parallel", "sequential"):
        tiny_model(attn="sdpa", casa_placement=placement).save_pretrained(tmp_path / placement)
        assert json.loads((tmp_path / placement / "config.json").read_text())["casa_placement"] == placement
        assert AutoConfig.from_pretrained(tmp_path / placement).casa_placement == placement
        loaded = AutoModel.from_pretrained(tmp_path / placement)
        assert {layer.casa_placement for layer in loaded.model.language_model.layers} == {placement}
    saved = tiny_config().to_dict()
    del saved["casa_placement"]
    assert CasaConfig.from_dict(saved).casa_placement == "sequential"
    assert CasaConfig.from_dict(saved, casa_placement="parallel").casa_placement == "parallel"


def test_new_cross_attention_has_no_rope_and_saved_configs_without_the_key_keep_it(tmp_path):
    """New cross-attention configs use no positional embeddings and round-trip so; a saved config without
    `casa_cross_attention_rope` predates it and loads with RoPE, computing the outputs it computed before."""
    assert CasaConfig().casa_cross_attention_rope is False and CasaConfig().casa_uses_rope  # CASA always rotates
    inputs = image_inputs()
    new = tiny_model(attn="sdpa", casa_attention="cross_attention")
    assert not new.config.casa_uses_rope
    new.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["casa_cross_attention_rope"] is False
    reloaded = AutoModel.from_pretrained(tmp_path / "new").eval()
    assert not reloaded.config.casa_cross_attention_rope
    assert {layer.casa_attn.rotary for layer in reloaded.model.language_model.layers} == {False}

    old = tiny_model(attn="sdpa", casa_attention="cross_attention", casa_cross_attention_rope=True)
    old.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["casa_cross_attention_rope"]
    config_file.write_text(json.dumps(saved))
    loaded = AutoModel.from_pretrained(tmp_path / "old").eval()
    assert loaded.config.casa_cross_attention_rope is True
    with torch.no_grad():
        old_logits, loaded_logits, new_logits = (m(**inputs).logits for m in (old, loaded, reloaded))
    assert torch.equal(old_logits, loaded_logits)
    assert (new_logits - old_logits).abs().max() > 1e-4  # same weights (seed 0): only RoPE differs


def test_placement_changes_the_block_only_where_casa_updates():
    """Parallel and sequential blocks differ once CASA updates the stream, and not on text before the first image
    when text-only windows are skipped (CASA adds nothing there in either block)."""
    inputs = image_inputs()
    first_image = int((inputs["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    logits = {}
    for placement in ("parallel", "sequential"):
        model = tiny_model(casa_placement=placement, casa_text_only_windows="skip")
        with torch.no_grad():
            logits[placement] = model(**inputs).logits[0]
    torch.testing.assert_close(logits["parallel"][:first_image], logits["sequential"][:first_image])
    assert (logits["parallel"][first_image:] - logits["sequential"][first_image:]).abs().max() > 1e-3


def test_a_small_vocabulary_needs_only_the_image_token():
    """Only values the user gives are checked against the vocabulary; no default id may make a valid config fail."""
    reference = tiny_config()
    config = CasaConfig(
        text_config=reference.text_config, vision_config=reference.vision_config, image_token_id=IMAGE_TOKEN
    )
    assert (config.vision_start_token_id, config.vision_end_token_id) == (None, None)
    assert config.text_config.vocab_size == VOCAB


def test_inputs_embeds_find_the_image_placeholders():
    model = tiny_model()
    inputs = image_inputs()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        from_embeds = model(
            inputs_embeds=embeds, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        ).logits
    assert torch.equal(from_ids, from_embeds)


@pytest.mark.parametrize("mode", ["insertion", "raster"])
def test_image_key_positions(mode):
    """Image keys get their placeholder's position (`insertion`), or placeholder + token index (`raster`)."""
    model = tiny_model(casa_image_positions=mode)
    ids = torch.tensor([random_text(3) + [IMAGE_TOKEN] + random_text(2, 1) + [IMAGE_TOKEN] + random_text(2, 2)])
    pixel_values, grid = random_images([(4, 4), (2, 4)])
    seen = []
    hook = model.model.language_model.layers[0].casa_attn.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["casa_inputs"].image_position_embeddings),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid)
    hook.remove()
    placeholders = [3, 6]
    expected = []
    for placeholder, tokens in zip(placeholders, [4, 2], strict=True):
        expected += [placeholder + (j if mode == "raster" else 0) for j in range(tokens)]
    cos, _ = model.model.language_model.rotary_emb(torch.zeros(1, 6, 64), position_ids=torch.tensor([expected]))
    assert torch.allclose(seen[0][0], cos)


def test_image_centering_gives_casa_each_images_tokens_minus_their_mean(tmp_path):
    """With `casa_image_centering`, the model computes what the same weights without it compute on image features
    centred by hand; the field is off by default (existing models unchanged) and survives save/load."""
    plain = tiny_model()
    centred = tiny_model(casa_image_centering=True)
    centred.load_state_dict(plain.state_dict())
    assert tiny_config().casa_image_centering is False
    centred.save_pretrained(tmp_path)
    assert CasaConfig.from_pretrained(tmp_path).casa_image_centering is True
    ids = torch.tensor([random_text(3) + [IMAGE_TOKEN] + random_text(2, 1) + [IMAGE_TOKEN] + random_text(2, 2)])
    pixel_values, grid = random_images([(4, 4), (2, 4)])
    with torch.no_grad():
        features = plain.model.get_image_features(pixel_values, grid).pooler_output
        by_hand = BaseModelOutputWithPooling(pooler_output=tuple(f - f.mean(0, keepdim=True) for f in features))
        expected = plain(input_ids=ids, mm_encoder_outputs={"image": by_hand}).logits
        uncentred = plain(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits
        logits = centred(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, uncentred, atol=1e-3)


def test_transformers_serve_loads_casa_and_sends_it_images(tmp_path):
    """`transformers serve` picks the loading class and the modality from the static name tables, as for built-ins."""
    from transformers.cli.serving.model_manager import ModelLoader
    from transformers.cli.serving.utils import Modality

    model = tiny_model(attn="sdpa")
    model.save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    served, processor = ModelLoader(device="cpu", dtype="float32").load_model_and_processor(str(tmp_path))
    assert isinstance(served, CasaForConditionalGeneration)
    # as Qwen2.5-VL: images go in
    assert ModelLoader.get_model_modality(served.config, processor) == Modality.MULTIMODAL
    with torch.no_grad():
        assert torch.equal(model(**image_inputs()).logits, served.eval()(**image_inputs()).logits)


def test_trainer_label_smoothing_shifts_casa_labels(tmp_path):
    """Trainer shifts labels for label smoothing only for class names in its causal-LM name table."""
    model = tiny_model()
    inputs = image_inputs()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=tmp_path, label_smoothing_factor=0.1))
    loss = trainer.compute_loss(model, {**inputs, "labels": inputs["input_ids"].clone()})
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], inputs["input_ids"][0, 1:], label_smoothing=0.1)
    assert (loss.detach() - expected).abs() <= 1e-5
