"""The benchmark scripts run end to end at a tiny size (their figures are measured by hand, never asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

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
