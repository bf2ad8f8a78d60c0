"""`python vllm_worker.py SPEC OUT`, in vLLM's environment (`CASA_VLLM_PYTHON`, made by scripts/setup_vllm_cpu.sh).

SPEC lists engines, each a model folder, `LLM(...)` keyword arguments and requests (a prompt, images as PNG paths).
Each engine gets all of its requests in one `generate` call (vLLM batches them continuously) and greedy-decodes
them; OUT gets, per engine, each request's prompt ids, generated ids and their log-probabilities, and the config
vLLM ended up with; an engine's `chats` (OpenAI messages) go through `LLM.chat`, which renders them itself: OUT gets
their prompt ids; an engine marked `refused` gets the error it stopped with instead. Engines run one after another
in this process (vLLM's engine core in process, which halves the start-up).
"""

import gc
import json
import sys


def run_engine(engine: dict) -> dict:
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=engine["model"],
        enforce_eager=True,
        dtype="float32",
        max_model_len=512,
        limit_mm_per_prompt={"image": 4},
        **engine.get("kwargs", {}),
    )
    requests = []
    for request in engine["requests"]:
        prompt = {"prompt": request["prompt"]}
        if request["images"]:
            prompt["multi_modal_data"] = {"image": [Image.open(path).convert("RGB") for path in request["images"]]}
        requests.append(prompt)
    params = SamplingParams(max_tokens=engine["max_tokens"], temperature=0.0, logprobs=0)
    outputs = llm.generate(requests, params, use_tqdm=False)
    chats = engine.get("chats", [])
    chat_outputs = llm.chat(chats, SamplingParams(max_tokens=1), use_tqdm=False) if chats else []
    config = llm.llm_engine.vllm_config
    windows_held = None
    if engine.get("count_windows"):
        # the runner drops finished requests at the next step: one more request makes it drop all of the above
        llm.generate([engine["requests"][0]["prompt"]], SamplingParams(max_tokens=1), use_tqdm=False)
        windows_held = llm.apply_model(lambda model: len(model.request_windows.by_request))[0]
    result = {
        "prompt_ids": [list(output.prompt_token_ids) for output in outputs],
        "tokens": [list(output.outputs[0].token_ids) for output in outputs],
        "logprobs": [
            [
                step[token].logprob
                for step, token in zip(output.outputs[0].logprobs, output.outputs[0].token_ids, strict=True)
            ]
            for output in outputs
        ],
        "chat_prompt_ids": [list(output.prompt_token_ids) for output in chat_outputs],
        "prefix_caching": config.cache_config.enable_prefix_caching,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
        "windows_held": windows_held,  # requests whose CASA windows the model still holds
    }
    del llm
    gc.collect()
    return result


def refusal(engine: dict) -> dict:
    """An engine that must not start: the message it stops with."""
    try:
        run_engine(engine)
    except Exception as error:  # vLLM wraps the model's error: its text is what a user reads
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": None}


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as spec_file:
        spec = json.load(spec_file)
    results = {
        engine["name"]: refusal(engine) if engine.get("refused") else run_engine(engine) for engine in spec["engines"]
    }
    with open(out_path, "w") as out_file:
        json.dump(results, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
