"""What the paper's variants promise beyond computing the same function as the reference (`test_attention.py`,
`test_cache.py` check that): the shared parallel block computes the text's projections once, a replaced block keeps
no text K/V, and the "every n-th block" layout."""

from collections import Counter

import pytest
import torch
from tiny import IMAGE_TOKEN, PLACEMENTS, random_images, random_text, tiny_model

from casa_hf import CasaCache, every_nth_block
from casa_hf.casa_cache import CasaWindowLayer


def count_projection_calls(model) -> tuple[Counter, list]:
    """Calls of every q/k/v/o projection in the text model, by `block.module.projection` name, and the rows each
    call projected."""
    calls, handles = Counter(), []
    for name, module in model.model.language_model.layers.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):

            def record(module, args, output, name=name):
                calls[name] += 1

            handles.append(module.register_forward_hook(record))
    return calls, handles


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_shared_parallel_block_projects_the_text_once(with_image):
    """Shared parallel (D1): per block and forward, q and o once, k and v once for the text plus once for the chunk's
    images; the parallel block with its own projections runs each of SA's and CASA's. A decode step (no image)
    projects q/k/v/o once per block."""
    ids = torch.tensor([random_text(3) + ([IMAGE_TOKEN] if with_image else []) + random_text(4, 1)])
    images = dict(zip(("pixel_values", "image_grid_thw"), random_images([(4, 4)]), strict=True))
    expected = {
        "parallel_shared": {"q_proj": 1, "k_proj": 1 + with_image, "v_proj": 1 + with_image, "o_proj": 1},
        "parallel": {"q_proj": 2, "k_proj": 2 + with_image, "v_proj": 2 + with_image, "o_proj": 2},
    }
    for placement, per_block in expected.items():
        model = tiny_model(attn="sdpa", **PLACEMENTS[placement])
        calls, handles = count_projection_calls(model)
        cache = CasaCache()
        with torch.no_grad():
            out = model(input_ids=ids, cache=cache, use_cache=True, **(images if with_image else {}))
            prefill = Counter(calls)
            calls.clear()
            model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        for handle in handles:
            handle.remove()
        for block in range(2):
            for projection, count in per_block.items():
                done = sum(n for name, n in prefill.items() if name.startswith(f"{block}.") and projection in name)
                assert done == count, f"{placement}: block {block} ran {projection} {done} times, not {count}"
            if placement == "parallel_shared":
                assert {name for name in calls if name.startswith(f"{block}.")} == {
                    f"{block}.self_attn.{projection}" for projection in per_block
                }
                assert all(n == 1 for n in calls.values())


def test_a_replaced_block_keeps_only_its_window():
    """CASA replacing block 0's self-attention: its cache layer holds the CASA window and no text K/V, the next
    block holds the whole text, and the cache's length is the text's."""
    model = tiny_model(attn="sdpa", **PLACEMENTS["replace"])
    ids = torch.tensor([random_text(5) + [IMAGE_TOKEN] + random_text(3, 1)])
    pixel_values, grid = random_images([(4, 4)])
    output = model.generate(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=4)
    cache = model.generate(
        input_ids=ids,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        max_new_tokens=4,
        return_dict_in_generate=True,
    ).cache
    replaced, kept = cache.layers
    assert isinstance(replaced, CasaWindowLayer) and replaced.keys is None
    assert replaced.nbytes() == replaced.window.nbytes() > 0
    text = output.shape[1] - 1  # the last generated token is not fed back
    assert cache.get_seq_length() == kept.get_seq_length() == text
    assert replaced.window.lengths().tolist() == [4 + text - 5]  # the image's 4 tokens and the text since it


def test_every_nth_block_is_the_papers_replace_layout():
    assert every_nth_block(8) == [1, 3, 5, 7]
    assert every_nth_block(8, 4) == [3, 7]
    for bad in (1, 0, 9, 2.0):
        with pytest.raises(ValueError, match="n=.* must be an integer in \\[2, num_hidden_layers=8\\]"):
            every_nth_block(8, bad)


def parallel_model_with_weights_that_count(backbone: str, **options):
    """A parallel model whose norm weights and biases are not the 1s and 0s they start at: what fusing folds."""
    model = tiny_model(backbone, attn="sdpa", casa_placement="parallel", **options)
    with torch.no_grad():
        for name, parameter in model.model.language_model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("proj.bias"):
                parameter.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.5)
    return model


@pytest.mark.parametrize("mode", ["casa", "cross_attention"])
@pytest.mark.parametrize("backbone", ["qwen2", "llama", "helium"])
def test_fused_parallel_projections_compute_what_the_modules_compute(backbone, mode):
    """`fuse_attention_projections`: the full forward within 1e-5 of the modules' (fp32), cached generate() the same
    tokens, and the fused weights follow a weight changed in place afterwards (norm weights are folded into them)."""
    options = dict(casa_attention=mode)
    if backbone == "llama":
        options["text_overrides"] = dict(attention_bias=True)
    model = parallel_model_with_weights_that_count(backbone, **options)
    ids = torch.tensor([random_text(3) + [IMAGE_TOKEN] + random_text(6, 1)])
    images = dict(zip(("pixel_values", "image_grid_thw"), random_images([(4, 4)]), strict=True))
    generate = dict(input_ids=ids, **images, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        reference = model(input_ids=ids, **images).logits
        tokens = model.generate(**generate)
        assert model.fuse_attention_projections() == [0, 1]
        assert (model(input_ids=ids, **images).logits - reference).abs().max() <= 1e-5
        assert model.generate(**generate).tolist() == tokens.tolist()
        block = model.model.language_model.layers[1]
        block.casa_input_layernorm.weight.mul_(3.0)  # folded into the q/k/v weights
        block.casa_attn.o_proj.weight.mul_(10.0)  # half of the fused output weight
        changed = model(input_ids=ids, **images).logits
        model.unfuse_attention_projections()
        assert (model(input_ids=ids, **images).logits - changed).abs().max() <= 1e-5
        assert (changed - reference).abs().max() > 1e-3


def test_fused_projections_leave_training_to_the_modules():
    """With autograd on, a fused model computes from its modules: gradients reach their weights."""
    model = parallel_model_with_weights_that_count("qwen2")
    model.fuse_attention_projections()
    ids = torch.tensor([random_text(3) + [IMAGE_TOKEN] + random_text(4, 1)])
    images = dict(zip(("pixel_values", "image_grid_thw"), random_images([(4, 4)]), strict=True))
    model(input_ids=ids, **images, labels=ids).loss.backward()
    block = model.model.language_model.layers[0]
    for module in (block.input_layernorm, block.casa_input_layernorm, block.self_attn.q_proj, block.casa_attn.q_proj):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_fusing_refuses_projections_that_are_not_plain_linears():
    """A LoRA-wrapped projection has weights of its own: fusing would silently drop the adapter."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(attn="sdpa", casa_placement="parallel")
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=r".*casa_attn\.q_proj"))
    with pytest.raises(ValueError, match=r"casa_attn\.q_proj is a .*not a plain nn\.Linear"):
        adapted.base_model.model.fuse_attention_projections()
