"""Live captioning: frames stream through a CASA model with one persistent cache; per frame it prints the caption,
the time to first token and the memory in use.

    python examples/live_captioning.py                                 # synthetic video, tiny random model
    python examples/live_captioning.py --video clip.mp4 --fps 2        # your video (needs casa-hf[video])
    python examples/live_captioning.py --model path/to/casa-checkpoint --budget 2048

With random weights the captions are noise; the point is the flat latency and memory. Pass `--model` for a real
checkpoint (`--budget` keeps the text cache bounded for endless streams).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import rss_mib, synthetic_frame  # noqa: E402

from casa_hf.random_models import random_casa, random_processor, word_tokenizer  # noqa: E402
from casa_hf.streaming import CasaStream, TextBudget  # noqa: E402


def load(model_path: str | None, image_size: int):
    if model_path is None:
        tokenizer = word_tokenizer(1024)
        torch.manual_seed(0)
        return random_casa("small", tokenizer), random_processor(tokenizer, image_size=image_size)
    from transformers import AutoModel, AutoProcessor

    import casa_hf  # noqa: F401  (registers CASA with the Auto classes)

    return AutoModel.from_pretrained(model_path).eval(), AutoProcessor.from_pretrained(model_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", help="a video file (PyAV); default: a synthetic video generated in code")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--frames", type=int, default=40, help="frames of the synthetic video / at most from the file")
    parser.add_argument("--model", help="a CASA checkpoint folder; default: a small random model built in code")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--budget", type=int, default=None, help="bound the text cache to this many tokens")
    args = parser.parse_args()

    model, processor = load(args.model, args.image_size)
    if args.video:
        from casa_hf.video import read_video_frames

        frames = read_video_frames(args.video, fps=args.fps, max_frames=args.frames)
    else:
        frames = (synthetic_frame(i, args.image_size) for i in range(args.frames))
    budget = TextBudget(sink_tokens=4, window_tokens=args.budget) if args.budget else None
    stream = CasaStream(
        model, processor, prompt="Describe what happens.", max_new_tokens=args.new_tokens, text_budget=budget
    )
    print(f"{'frame':>5} {'TTFT ms':>8} {'tok/s':>7} {'cache tok':>9} {'cache MiB':>9} {'RSS MiB':>8}  caption")
    for step in stream.run(frames):
        print(
            f"{step.index:>5} {step.time_to_first_token_s * 1000:>8.1f} {step.decode_tokens_per_s:>7.1f} "
            f"{step.cache_tokens:>9} {step.cache_bytes / 2**20:>9.2f} {rss_mib():>8.0f}  {step.text[:60]}"
        )


if __name__ == "__main__":
    main()
