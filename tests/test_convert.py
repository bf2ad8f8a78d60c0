"""Conversion of tiny Qwen2.5-VL and text-LLM checkpoints, built offline, into CASA checkpoints."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny import IMAGE_TOKEN, random_images, random_text, save_tiny_llm, save_tiny_qwen2_5_vl
from transformers import AutoModel, AutoProcessor

import casa_hf.checkpoint_io as checkpoint_io
from casa_hf import CasaForConditionalGeneration
from casa_hf.checkpoint_io import CheckpointReader
from casa_hf.convert import convert_llm_to_casa, convert_qwen2_5_vl_to_casa


@pytest.fixture(scope="module")
def qwen_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen25vl")
    model = save_tiny_qwen2_5_vl(folder)
    return folder, model


def text_ids():
    return torch.tensor([random_text(12, 7), random_text(12, 8)])


def test_qwen2_5_vl_converts_to_an_equivalent_casa_model(qwen_source, tmp_path):
    source, source_model = qwen_source
    assert len(list(source.glob("model-*.safetensors"))) >= 2
    report = convert_qwen2_5_vl_to_casa(source, tmp_path / "casa", max_shard_size="200KB", verify=True)

    model = AutoModel.from_pretrained(tmp_path / "casa").eval()
    assert isinstance(model, CasaForConditionalGeneration)
    assert model.config.casa_placement == "parallel"  # the paper's block
    with torch.no_grad():
        expected = source_model(input_ids=text_ids()).logits
        actual = model(input_ids=text_ids()).logits
    assert (expected - actual).abs().max() <= 1e-5
    assert report.verification["text_max_abs_logit_diff"] <= 1e-5

    pixel_values, grid = random_images([(4, 4)])
    ids = torch.tensor([random_text(3) + [IMAGE_TOKEN] + random_text(3, 1)])
    out = model.generate(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=4)
    assert out.shape == (1, ids.shape[1] + 4)

    processor = AutoProcessor.from_pretrained(tmp_path / "casa")
    assert processor.image_token_id == IMAGE_TOKEN and "<|vision_start|>" in processor.chat_template
    card = (tmp_path / "casa" / "README.md").read_text()
    assert "import casa_hf" in card and str(source) in card and "text_max_abs_logit_diff" in card
    assert len(list((tmp_path / "casa").glob("model-*.safetensors"))) >= 2


def test_every_source_tensor_is_accounted_for(qwen_source, tmp_path):
    source, _ = qwen_source
    report = convert_qwen2_5_vl_to_casa(source, tmp_path / "casa", casa_layers=[1], casa_init="random")
    with CheckpointReader(source) as reader:
        names = set(reader.names())
    assert set(report.carried) | set(report.dropped) == names
    with CheckpointReader(tmp_path / "casa") as written:
        written_names = set(written.names())
        assert written_names == set(report.carried.values()) | set(report.created)
        assert not any("layers.0.casa" in n for n in written_names)
        assert torch.count_nonzero(written.get("model.language_model.layers.1.casa_attn.o_proj.weight")) == 0
        sa = written.get("model.language_model.layers.1.self_attn.q_proj.weight")
        assert not torch.equal(written.get("model.language_model.layers.1.casa_attn.q_proj.weight"), sa)
    saved = json.loads((tmp_path / "casa" / "conversion_report.json").read_text())
    assert saved["carried"] == report.carried


def test_copy_init_and_dtype(qwen_source, tmp_path):
    source, _ = qwen_source
    convert_qwen2_5_vl_to_casa(source, tmp_path / "casa", dtype="bfloat16")
    with CheckpointReader(tmp_path / "casa") as written:
        q = written.get("model.language_model.layers.0.casa_attn.q_proj.weight")
        assert q.dtype == torch.bfloat16
        assert torch.equal(q, written.get("model.language_model.layers.0.self_attn.q_proj.weight"))
        norm = written.get("model.language_model.layers.0.casa_image_layernorm.weight")
        assert torch.equal(norm, written.get("model.language_model.layers.0.input_layernorm.weight"))


@pytest.mark.parametrize(
    "backbone,vocab_size,tie", [("llama", 120, False), ("qwen2", None, True), ("helium", None, False)]
)
def test_llm_plus_vision_tower_converts(qwen_source, tmp_path, backbone, vocab_size, tie):
    vision, _ = qwen_source
    llm = tmp_path / "llm"
    llm_model = save_tiny_llm(llm, backbone, vocab_size=vocab_size, tie=tie)
    report = convert_llm_to_casa(llm, vision, tmp_path / "casa", verify=True)
    model = AutoModel.from_pretrained(tmp_path / "casa").eval()
    assert model.config.casa_placement == "parallel"
    assert model.config.casa_image_positions == "insertion"  # a text LLM has no mRoPE sections
    ids = torch.randint(4, 40, (2, 10))  # words of the LLM tokenizer, never the added image token
    with torch.no_grad():
        expected = llm_model(input_ids=ids).logits
        actual = model(input_ids=ids).logits[..., : expected.shape[-1]]
    assert (expected - actual).abs().max() <= 1e-5
    assert model.config.vision_config.out_hidden_size == 48
    grown = vocab_size is None  # the added image/chat tokens needed new embedding rows
    assert (model.config.text_config.vocab_size > llm_model.config.vocab_size) == grown
    assert any(name.startswith("model.language_model.embed_tokens.weight[") for name in report.created) == grown
    assert any("merger.mlp.2" in name for name in report.dropped)
    assert all(
        reason == "language model of the vision source" or "merger" in name for name, reason in report.dropped.items()
    )

    processor = AutoProcessor.from_pretrained(tmp_path / "casa")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": torch.rand(3, 56, 56)}, {"type": "text", "text": "what is it ?"}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert model.generate(**inputs, max_new_tokens=3).shape[1] == inputs["input_ids"].shape[1] + 3


def test_interrupted_conversion_leaves_nothing(qwen_source, tmp_path, monkeypatch):
    source, _ = qwen_source
    calls = {"n": 0}
    real_save = checkpoint_io.save_file

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        convert_qwen2_5_vl_to_casa(source, tmp_path / "casa", max_shard_size="100KB")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(qwen_source, tmp_path):
    source, _ = qwen_source
    (tmp_path / "casa").mkdir()
    (tmp_path / "casa" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_qwen2_5_vl_to_casa(source, tmp_path / "casa")
    assert (tmp_path / "casa" / "keep.txt").read_text() == "mine"
    convert_qwen2_5_vl_to_casa(source, tmp_path / "casa", overwrite=True)
    assert not (tmp_path / "casa" / "keep.txt").exists() and (tmp_path / "casa" / "config.json").exists()


def copy_source(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def rewrite_shard(folder, edit):
    """Apply `edit(tensors) -> tensors` to the first shard of a checkpoint and update its index."""
    from safetensors.torch import save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    with safe_open(folder / shard, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors = edit(tensors)
    save_file(tensors, folder / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index_path.write_text(json.dumps(index))
    return sorted(tensors)


def test_options_object_and_keyword_overrides_agree(qwen_source, tmp_path):
    from casa_hf.convert import ConversionOptions

    source, _ = qwen_source
    from_object = convert_qwen2_5_vl_to_casa(source, tmp_path / "a", ConversionOptions(casa_layers=[1], seed=3))
    from_keywords = convert_qwen2_5_vl_to_casa(source, tmp_path / "b", casa_layers=[1], seed=3)
    assert from_object.options == from_keywords.options and from_object.options["casa_layers"] == [1]
    with pytest.raises(TypeError, match=r"Unknown conversion option\(s\) \['verfy'\]; the options are .*'verify'"):
        convert_qwen2_5_vl_to_casa(source, tmp_path / "c", verfy=True)
    assert not (tmp_path / "c").exists()


def test_bad_sources_raise_listed_errors(qwen_source, tmp_path):
    source, _ = qwen_source
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_qwen2_5_vl_to_casa(tmp_path, out)

    llm = tmp_path / "llm"
    save_tiny_llm(llm)
    with pytest.raises(ValueError, match="'llama' checkpoint, not 'qwen2_5_vl'"):
        convert_qwen2_5_vl_to_casa(llm, out)

    missing_shard = copy_source(source, tmp_path / "missing_shard")
    next(missing_shard.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        convert_qwen2_5_vl_to_casa(missing_shard, out)

    corrupt = copy_source(source, tmp_path / "corrupt")
    next(corrupt.glob("model-00001-*.safetensors")).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="Cannot read shard"):
        convert_qwen2_5_vl_to_casa(corrupt, out)

    extra = copy_source(source, tmp_path / "extra")
    rewrite_shard(extra, lambda t: {**t, "model.layers.0.mystery.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.mystery.weight'\]"):
        convert_qwen2_5_vl_to_casa(extra, out)

    missing = copy_source(source, tmp_path / "missing")
    removed = []

    def drop_one(tensors):
        name = sorted(tensors)[0]
        removed.append(name)
        return {k: v for k, v in tensors.items() if k != name}

    rewrite_shard(missing, drop_one)
    with pytest.raises(ValueError, match="missing tensors"):
        convert_qwen2_5_vl_to_casa(missing, out)

    reshaped = copy_source(source, tmp_path / "reshaped")
    rewrite_shard(reshaped, lambda t: {k: (v[:-1] if i == 0 else v) for i, (k, v) in enumerate(sorted(t.items()))})
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_qwen2_5_vl_to_casa(reshaped, out)
    assert not out.exists()


def test_command_line_and_script(qwen_source, tmp_path):
    import subprocess
    import sys

    from casa_hf.cli import main

    source, _ = qwen_source
    main(["convert", "qwen2_5_vl", str(source), str(tmp_path / "a"), "--casa-layers", "0", "--dtype", "float16"])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["casa_layers"] == [0] and config["dtype"] == "float16"
    assert AutoModel.from_pretrained(tmp_path / "a").dtype == torch.float16
    result = subprocess.run(
        [sys.executable, "conversion/convert_qwen2_5_vl_to_casa.py", str(source), str(tmp_path / "a")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "already exists" in result.stderr


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_placement_option_writes_the_block_asked_for_exact_on_text(qwen_source, tmp_path, placement):
    """`--placement` chooses the block; either starts as its source on text (`--verify` fails beyond 1e-4)."""
    from casa_hf.cli import main

    source, _ = qwen_source
    main(["convert", "qwen2_5_vl", str(source), str(tmp_path / "out"), "--placement", placement, "--verify"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert config["casa_placement"] == placement and report["options"]["placement"] == placement


def test_replace_every_writes_the_papers_ca_replace_layout(qwen_source, tmp_path, capsys):
    """`--replace-every 2`: CASA, on the blocks' own projections, replaces self-attention in blocks 1, 3, ...; the
    model loads and generates, and the option refuses the CASA blocks or a placement it would override."""
    from transformers import AutoModel

    from casa_hf.cli import main

    source, _ = qwen_source
    main(["convert", "qwen2_5_vl", str(source), str(tmp_path / "out"), "--replace-every", "2"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    assert config["casa_layers"] == list(range(1, layers, 2))
    assert config["casa_placement"] == "replace" and config["casa_shared"] is True
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["options"]["placement"] == "replace" and report["options"]["shared"] is True
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert [layer.casa_placement for layer in model.model.language_model.layers if layer.has_casa] == ["replace"] * (
        layers // 2
    )
    assert model.generate(input_ids=text_ids(), max_new_tokens=3, do_sample=False).shape[1] == text_ids().shape[1] + 3
    for extra in (["--casa-layers", "0"], ["--placement", "sequential"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", "qwen2_5_vl", str(source), str(tmp_path / "bad"), "--replace-every", "2", *extra])
        assert exit_info.value.code == 2
        assert "replace_every=2 chooses the CASA blocks and their placement itself" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "qwen2_5_vl", str(source), str(tmp_path / "bad"), "--placement", "replace"])
    assert exit_info.value.code == 2 and "add shared=True (--shared)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
