"""Peak memory of `convert_qwen2_5_vl_to_casa` on a random Qwen2.5-VL checkpoint of a few hundred MB.

Each measurement runs in its own process (peak RSS: VmHWM): the conversion itself, and a baseline that
only imports the libraries and builds the weightless target model. Prints a table and writes JSON.

    python benchmarks/conversion_memory.py --out conversion_memory.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, json
from pathlib import Path
import casa_hf
from casa_hf.convert import convert_qwen2_5_vl_to_casa, expected_shapes
from transformers import AutoConfig
source, output, mode, shard = sys.argv[1:5]
if mode == "baseline":
    config = AutoConfig.from_pretrained(source)  # imports + config + meta model, no tensors
    from casa_hf.convert import text_config_from_qwen2_5_vl
    from casa_hf import CasaConfig
    expected_shapes(CasaConfig(text_config=text_config_from_qwen2_5_vl(config),
                                vision_config=config.vision_config.to_dict(), image_token_id=config.image_token_id,
                                vision_start_token_id=config.vision_start_token_id,
                                vision_end_token_id=config.vision_end_token_id))
else:
    convert_qwen2_5_vl_to_casa(source, output, max_shard_size=shard)
# VmHWM, not getrusage: ru_maxrss survives exec and would report the parent's peak
peak_kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"peak_rss_mib": peak_kib / 1024}))
"""


def make_source(folder: Path, layers: int, hidden: int, vocab: int, shard: str) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        ),
        vision_config=dict(
            depth=4,
            hidden_size=256,
            intermediate_size=512,
            num_heads=4,
            out_hidden_size=hidden,
            fullatt_block_indexes=[3],
        ),
        image_token_id=vocab - 3,
        video_token_id=vocab - 4,
        vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1,
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder, max_shard_size=shard)
    save_word_tokenizer(folder, vocab)
    Qwen2VLImageProcessorPil().save_pretrained(folder)


def save_word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer of `vocab` entries whose last ids are the Qwen2.5-VL image tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]
    words = {"<unk>": 0, "<|endoftext|>": 1} | {f"w{i}": i for i in range(2, vocab - len(specials))}
    words |= {token: vocab - len(specials) + i for i, token in enumerate(specials)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>", additional_special_tokens=specials
    ).save_pretrained(folder)


def measure(source: Path, output: Path, mode: str, shard: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(output), mode, shard],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard", default="50MB")
    parser.add_argument("--out", default="conversion_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp) / "qwen", Path(tmp) / "casa"
        make_source(source, args.layers, args.hidden, args.vocab, args.shard)
        files = sorted(source.glob("*.safetensors"))
        checkpoint_mib = sum(f.stat().st_size for f in files) / 2**20
        largest_shard_mib = max(f.stat().st_size for f in files) / 2**20
        baseline = measure(source, output, "baseline", args.shard)
        peak = measure(source, output, "convert", args.shard)
        written_mib = sum(f.stat().st_size for f in output.glob("*.safetensors")) / 2**20
    row = dict(
        checkpoint_mib=checkpoint_mib,
        source_shards=len(files),
        largest_source_shard_mib=largest_shard_mib,
        written_mib=written_mib,
        baseline_rss_mib=baseline,
        conversion_peak_rss_mib=peak,
        conversion_extra_mib=peak - baseline,
        extra_over_largest_shard=(peak - baseline) / largest_shard_mib,
        extra_over_checkpoint=(peak - baseline) / checkpoint_mib,
    )
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:<{width}}  {value:10.2f}" if isinstance(value, float) else f"{key:<{width}}  {value:10d}")
    Path(args.out).write_text(json.dumps(dict(args=vars(args), result=row), indent=1) + "\n")


if __name__ == "__main__":
    main()
