"""The benchmark scripts run end to end at a tiny size (their figures are measured by hand, never asserted)."""

import json
import math
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_decode_benchmark_runs_casa_insertion_and_text_llm_side_by_side(tmp_path):
    out = tmp_path / "decode"
    command = [sys.executable, "benchmarks/bench_decode.py", "--size", "tiny", "--images", "1,2", "--image-size", "56"]
    command += ["--new-tokens", "3", "--repeats", "1", "--generate-images", "1", "--caches", "dynamic,static"]
    subprocess.run([*command, "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    summary = json.loads(out.with_suffix(".json").read_text())
    rows = summary["rows"]
    assert [row["images"] for row in rows] == [1, 2]
    assert all(row["casa_ms"] > 0 and row["insertion_ms"] > 0 and row["text_llm_ms"] > 0 for row in rows)
    [row] = summary["generate_rows"]  # generate() with each cache, for the three models; a decode time is a
    # difference of two timings, which noise can make negative at this size: only their presence is checked
    timed = [
        row[f"{model}_{cache}{kind}_ms"]
        for model in ("casa", "insertion", "text_llm")
        for cache in ("dynamic", "static")
        for kind in ("", "_first_token")
    ]
    assert len(timed) == 12 and all(math.isfinite(value) for value in timed)
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow  # the real SmolLM2
def test_streaming_benchmark_smollm2_caches_image_tokens_only_for_idefics3(tmp_path, monkeypatch):
    """CASA-SmolLM2, Idefics3 and bare SmolLM2 on the same SmolLM2 weights, turn after turn: per turn, CASA's cache
    grows by SmolLM2's text plus the frame's 3 placeholder tokens, Idefics3's by the frame's image tokens more."""
    from transformers import AutoConfig, AutoProcessor

    from casa_hf.builtin_models import resolve_model

    monkeypatch.syspath_prepend(ROOT / "benchmarks")
    from common import SMOLLM2_TURN

    out, new_tokens = tmp_path / "streaming", 2
    command = [sys.executable, "benchmarks/bench_streaming.py", "--models", "smollm2", "--turns", "3", "--window", "1"]
    command += ["--new-tokens", str(new_tokens), "--image-size", "112", "--threads", "1", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    payload = json.loads(out.with_suffix(".json").read_text())
    turns = payload["turns"]
    assert list(turns) == ["casa_smollm2", "idefics3", "smollm2"] and all(len(rows) == 3 for rows in turns.values())

    folder = resolve_model("casa-smollm2")
    tokenizer, config = AutoProcessor.from_pretrained(folder).tokenizer, AutoConfig.from_pretrained(folder)
    turn_text = SMOLLM2_TURN["frame_prefix"] + SMOLLM2_TURN["frame_text"]
    # the previous turn's last token, the chat turn, all but the last new token (fed at the next turn)
    text = 1 + len(tokenizer(turn_text, add_special_tokens=False)["input_ids"]) + new_tokens - 1
    vision = config.vision_config
    image_tokens = (112 // vision.patch_size) ** 2 // vision.spatial_merge_size**2  # CASA-SmolLM2's, per frame
    growth = {
        name: {after["cache_tokens"] - before["cache_tokens"] for before, after in pairwise(rows)}
        for name, rows in turns.items()
    }
    assert growth["smollm2"] == {text}
    assert growth["casa_smollm2"] == {text + 3}  # <|vision_start|><|image_pad|><|vision_end|>: no image token
    assert growth["idefics3"] == {text + 3 + image_tokens}  # <fake_token_around_image><global-img>, 16 x <image>, ...

    text_config = config.text_config  # plain K/V caches: layers x (K, V) x KV heads x head dim x fp32 bytes
    per_token = text_config.num_hidden_layers * 2 * text_config.num_key_value_heads * text_config.head_dim * 4
    for name in ("idefics3", "smollm2"):
        assert all(math.isclose(r["cache_mib"], r["cache_tokens"] * per_token / 2**20) for r in turns[name])
    assert all(r["cache_mib"] > r["cache_tokens"] * per_token / 2**20 for r in turns["casa_smollm2"])  # + windows
    assert all(r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["rss_mib"] > 0 for r in sum(turns.values(), []))
    summary = payload["summary"]
    assert set(summary["casa_smollm2_over_idefics3_at_turns"]) == set(summary["casa_smollm2_over_smollm2_at_turns"])
    assert summary["casa_smollm2_over_idefics3_at_last"]["cache_tokens"] < 1
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow  # the real SmolLM2 (its first 2 blocks)
def test_variants_benchmark_gives_every_row_of_the_papers_table_1(tmp_path):
    """CA, CA-shared, CASA, CA-replace and token insertion, each in its own process: the table, JSON and PNG have
    every row and column, with the paper's ratios beside ours."""
    out = tmp_path / "variants"
    command = [sys.executable, "benchmarks/bench_variants.py", "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    payload = json.loads(out.with_suffix(".json").read_text())
    names = ["ca", "ca_shared", "casa", "ca_replace", "insertion"]
    assert list(payload["rows"]) == names
    columns = ["train_tokens_per_s", "train_mem", "stream_fps", "stream_mem", "kv"]
    for name in names:
        row = payload["rows"][name]
        assert row["train_text_tokens_per_s"] > 0 and row["stream_frames_per_s"] > 0
        assert row["train_peak_rss_mib"] > 0 and row["stream_peak_rss_mib"] > 0
        assert list(payload["ratios_to_insertion"][name]) == columns
    assert payload["ratios_to_insertion"]["insertion"] == dict.fromkeys(columns, 1.0)
    # the same conversations for every variant; insertion's cache also holds each frame's image tokens
    assert len({row["text_tokens_per_step"] for row in payload["rows"].values()}) == 1
    kv = {name: row["kv_entries"] for name, row in payload["rows"].items()}
    assert payload["rows"]["insertion"]["cache_tokens"] > payload["rows"]["ca"]["cache_tokens"]
    # the paper's KV column: CASA's windows also hold the text since the image (kT + (T + N) against kT + N);
    # CA-replace's replaced blocks hold their window alone ("kT or N")
    assert kv["ca"] == kv["ca_shared"] < kv["casa"] and kv["ca_replace"] < kv["ca"]
    table = payload["table"]
    for label in ("| CA |", "| CA-shared (D1) |", "| CASA (D2) |", "| CA-replace (D3, n=2) |", "| insertion |"):
        assert label in table and label in done.stdout
    assert out.with_suffix(".png").stat().st_size > 0
