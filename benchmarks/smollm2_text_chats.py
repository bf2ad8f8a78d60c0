"""Text-only chats: does CASA-SmolLM2 still answer as SmolLM2 (loaded alone from its GGUF file) does?

For each prompt (no image, the chat template's generation prompt): whether the two models' 20 greedy tokens are the
same, and the next-token KL divergence KL(SmolLM2 || model) in nats, its maximum and mean over the prompt's positions
(what `tests/test_casa_smollm2.py` bounds) and over the prompt and the model's 20 answer tokens.

    python benchmarks/smollm2_text_chats.py --out results/smollm2_text_chats
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from casa_hf.builtin_models import resolve_model
from casa_hf.smollm2.gguf_llm import load_gguf_llm, smollm2_gguf

PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "How do I sort a list in Python?")


@torch.no_grad()
def kl_per_position(model, smollm2, ids: torch.Tensor) -> torch.Tensor:
    """KL(SmolLM2 || model) of the next token at every position of `ids` (`[1, T]`), over SmolLM2's vocabulary."""
    reference = smollm2(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[..., : reference.shape[-1]]
    log_p, log_q = logits.log_softmax(-1), reference.log_softmax(-1)
    return torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)[0]


@torch.no_grad()
def compare(model, processor, smollm2, prompt: str, new_tokens: int) -> dict:
    messages = [{"role": "user", "content": prompt}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    reference = smollm2.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    on_prompt, on_chat = kl_per_position(model, smollm2, inputs["input_ids"]), kl_per_position(model, smollm2, out)
    start = inputs["input_ids"].shape[1]
    return {
        "same_tokens": out.tolist() == reference.tolist(),
        "answer": processor.decode(out[0, start:], skip_special_tokens=True),
        "smollm2_answer": processor.decode(reference[0, start:], skip_special_tokens=True),
        "kl_prompt": {"max": on_prompt.max().item(), "mean": on_prompt.mean().item()},
        "kl_prompt_and_answer": {"max": on_chat.max().item(), "mean": on_chat.mean().item()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="casa-smollm2", help="a built-in name, checkpoint folder or run folder")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--out", default="results/smollm2_text_chats")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    smollm2, _ = load_gguf_llm(smollm2_gguf())
    rows = {prompt: compare(model, processor, smollm2, prompt, args.new_tokens) for prompt in PROMPTS}
    print(f"| prompt | same {args.new_tokens} greedy tokens | KL max / mean, prompt | KL max / mean, + answer |")
    print("|---|---|---|---|")
    for prompt, row in rows.items():
        prompt_kl, chat_kl = row["kl_prompt"], row["kl_prompt_and_answer"]
        print(
            f"| {prompt} | {row['same_tokens']} | {prompt_kl['max']:.3f} / {prompt_kl['mean']:.4f} "
            f"| {chat_kl['max']:.3f} / {chat_kl['mean']:.4f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "new_tokens": args.new_tokens, "rows": rows}
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
