"""GPU correctness check of the CASA attention backends (run by hand on a CUDA machine; CI has none).

For each backend: a padded multi-image batch against the slow reference (fp32), and cached token-by-token
decoding against one full forward (fp32 and bf16); then `generate()` on the static cache with compiled decode steps
(CUDA graphs on a GPU) against the dynamic cache. `flash_torch_varlen` (a "flash" name: what sends CASA to its
packed-window path) drives that path through PyTorch's own flash varlen kernel, so the `cu_seqlens` packing is
checked on a real flash kernel even where the flash-attn package is not installed; `flash_attention_2` runs too
when flash-attn is importable.

    python scripts/check_cuda.py --out results.json
"""

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch
from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reference import reference_casa_window_attention  # noqa: E402
from test_attention import batch_inputs  # noqa: E402
from test_cache import conversation, incremental_logits  # noqa: E402
from test_static_cache import batch_inputs as static_batch_inputs  # noqa: E402
from tiny import tiny_model  # noqa: E402
from varlen import register_varlen_stand_in  # noqa: E402

import casa_hf.casa_attention as casa_attention  # noqa: E402


def torch_varlen_kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling, is_causal):
    """PyTorch's own flash varlen kernel."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    extra = {"scale": scaling}
    if "window_size" in params:
        extra["window_size"] = (-1, 0) if is_causal else (-1, -1)
    else:
        extra["is_causal"] = is_causal
    return varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **extra)


register_varlen_stand_in("flash_torch_varlen", torch_varlen_kernel)


def to_device(inputs, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def check(attn, mode, device, dtype):
    model = tiny_model(attn=attn, casa_attention=mode).to(device=device, dtype=dtype)
    inputs = to_device(batch_inputs(), device)
    with torch.no_grad():
        fast = model(**inputs).logits.float()
        original = casa_attention.casa_window_attention
        casa_attention.casa_window_attention = reference_casa_window_attention
        try:
            reference_model = tiny_model(attn="eager", casa_attention=mode).to(device)
            reference_model.load_state_dict(model.state_dict())
            slow = reference_model(**inputs).logits.float()
        finally:
            casa_attention.casa_window_attention = original
        valid = inputs["attention_mask"].bool()
        vs_reference = (fast[valid] - slow[valid]).abs().max().item()

        input_ids, pixel_values, grid = conversation(4)
        input_ids, pixel_values, grid = input_ids.to(device), pixel_values.to(device), grid.to(device)
        full = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid).logits.float()
        steps = [6] + [1] * (input_ids.shape[1] - 6)
        cached, _ = incremental_logits(model, input_ids, pixel_values, grid, steps)
        vs_full = (full - cached.float()).abs().max().item()
    return vs_reference, vs_full, full.abs().max().item()


def check_compiled_static(device, dtype):
    """generate() on the static cache with compiled decode steps (on CUDA: CUDA graphs) against the dynamic cache:
    the same tokens, and logits as close as the dtype allows up to any token where a near tie went the other way."""
    model = tiny_model(attn="sdpa").to(device=device, dtype=dtype)
    inputs = to_device(static_batch_inputs(), device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    options = dict(inputs, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    dynamic = model.generate(**options)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # CPU dry runs
    static = model.generate(**options, cache_implementation="static", compile_config=compile_config)
    # in bf16 a near tie can pick another token, after which the two runs see different text: compare each step's
    # logits only while every token before it agrees
    steps = len(static.logits)
    agree = (static.sequences[:, -steps:] == dynamic.sequences[:, -steps:]).long().cumprod(1)
    comparable = torch.cat([torch.ones_like(agree[:, :1]), agree[:, :-1]], dim=1).bool().T  # [steps, batch]
    difference = (torch.stack(static.logits) - torch.stack(dynamic.logits)).float().abs().amax(-1)
    return dict(
        same_tokens=torch.equal(static.sequences, dynamic.sequences),
        static_vs_dynamic_logits=difference[comparable].max().item(),
        steps_compared=int(comparable.sum()),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="cuda_check.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    backends = ["eager", "sdpa", "flex_attention"]
    if device == "cuda":
        backends.append("flash_torch_varlen")
        try:
            import flash_attn  # noqa: F401

            backends.append("flash_attention_2")
        except ImportError:
            print("flash-attn not installed: flash_attention_2 not run")
    rows = []
    for attn in backends:
        for dtype in (torch.float32, torch.bfloat16):
            if attn in ("flash_torch_varlen", "flash_attention_2") and dtype == torch.float32:
                continue  # flash kernels are half-precision only
            for mode in ("casa", "cross_attention"):
                # CPU dry runs only: torch's CPU flex template breaks under dynamic shapes (see README).
                static = device == "cpu" and attn == "flex_attention"
                try:
                    with torch._dynamo.config.patch(automatic_dynamic_shapes=not static):
                        vs_reference, vs_full, scale = check(attn, mode, device, dtype)
                    rows.append(
                        dict(
                            attn=attn,
                            dtype=str(dtype),
                            mode=mode,
                            vs_reference=vs_reference,
                            cached_vs_full=vs_full,
                            logit_scale=scale,
                        )
                    )
                except Exception as error:  # report and go on: one broken backend must not hide the others
                    rows.append(dict(attn=attn, dtype=str(dtype), mode=mode, error=repr(error)[:300]))
                print(rows[-1], flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        try:
            rows.append(dict(attn="sdpa", dtype=str(dtype), mode="compiled static cache", **check_compiled_static(
                device, dtype)))  # fmt: skip
        except Exception as error:
            rows.append(dict(attn="sdpa", dtype=str(dtype), mode="compiled static cache", error=repr(error)[:300]))
        print(rows[-1], flush=True)
    Path(args.out).write_text(
        json.dumps(
            dict(
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__, rows=rows
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
