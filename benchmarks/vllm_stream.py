"""One video stream through vLLM as a single session (vLLM's streaming input: each frame and its question extend the
same request, whose blocks and CASA windows stay), run in vLLM's environment by bench_vllm.py:

    $CASA_VLLM_PYTHON benchmarks/vllm_stream.py --model FOLDER --frames 64 --out stream.json

Writes each frame's latency (its input sent to its answer's last token), its answer and the session's prompt length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from common import synthetic_frame

TURN = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


async def stream(model: str, frames: int, size: int, question: str, max_tokens: int) -> list[dict]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(model=model, enforce_eager=True, dtype="float32", limit_mm_per_prompt={"image": 1})
    llm = AsyncLLM.from_engine_args(args)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA)
    answered = asyncio.Event()
    sent: list[float] = []

    async def inputs():
        for index in range(frames):
            answered.clear()
            sent.append(time.perf_counter())
            prompt = {
                "prompt": TURN.format(question=question),
                "multi_modal_data": {"image": [synthetic_frame(index, size)]},
            }
            yield StreamingInput(prompt=prompt, sampling_params=params)
            await answered.wait()

    turns, tokens = [], []
    async for output in llm.generate(inputs(), params, request_id="stream"):
        tokens += output.outputs[0].token_ids
        if output.outputs[0].finish_reason is not None:  # this frame's answer is complete
            latency = (time.perf_counter() - sent[len(turns)]) * 1000
            turns.append(
                {
                    "frame": len(turns),
                    "latency_ms": latency,
                    "tokens": tokens,
                    "prompt_tokens": len(output.prompt_token_ids or []),
                }
            )
            tokens = []
            answered.set()
    llm.shutdown()
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--question", default="What colour is the square?")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    turns = asyncio.run(stream(args.model, args.frames, args.image_size, args.question, args.max_tokens))
    with open(args.out, "w") as out:
        json.dump(turns, out)


if __name__ == "__main__":
    main()
