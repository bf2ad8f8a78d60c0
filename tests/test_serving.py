"""`casa-hf serve` on 127.0.0.1 with the shipped model: the real `openai` client, live sessions, limits and errors.

Every served answer is compared with `generate()` (or a `CasaStream` run alone) on the same inputs, greedy.
"""

import base64
import gc
import io
import json
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import uvicorn
from transformers import AutoModelForImageTextToText, AutoProcessor

import casa_hf  # noqa: F401
from casa_hf.builtin_models import TINY_MODEL, export_model
from casa_hf.serving import Engine, ServeLimits, build_app
from casa_hf.streaming import CasaStream, TextBudget
from casa_hf.training import SyntheticVQA
from casa_hf.training.synthetic_vqa import QUESTIONS, SYSTEM_TEXT, random_scene, render

SESSION_PROMPT = QUESTIONS["colour"]


class Server:
    """A uvicorn server on a free 127.0.0.1 port, in a thread of the test process (so tests can inspect its state)."""

    def __init__(self, app):
        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    """Until `url/health` answers; fails with the server's log if the process exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server never answered (exit code {process.poll()}):\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def engine():
    model = AutoModelForImageTextToText.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    return Engine(model, AutoProcessor.from_pretrained(TINY_MODEL), model_id="tiny")


@pytest.fixture(scope="module")
def server(engine):
    server = Server(build_app(engine, ServeLimits(max_sessions=6)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server decodes the very pixels the reference uses
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(messages: list[dict]) -> list[dict]:
    """SyntheticVQA's processor messages (PIL images inside) as OpenAI chat messages (images as data URLs)."""
    converted = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                {"type": "image_url", "image_url": {"url": data_url(part["image"])}}
                if part["type"] == "image"
                else part
                for part in content
            ]
        converted.append({"role": message["role"], "content": content})
    return converted


def reference_answer(engine, messages: list[dict], max_new_tokens: int) -> tuple[str, int, int]:
    """`generate()` on the same messages: (text, prompt tokens, generated tokens)."""
    inputs = engine.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    generated = out[0, inputs["input_ids"].shape[1] :]
    return engine.tokenizer.decode(generated, skip_special_tokens=True), inputs["input_ids"].shape[1], len(generated)


def questions(n: int, seed: int) -> list[list[dict]]:
    dataset = SyntheticVQA(n, seed=seed, kinds=("colour", "shape", "count", "digit"))
    return [dataset[i]["messages"][:-1] for i in range(n)]


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": content_type}, method="POST")
    return _send(request)


def call(method: str, url: str) -> tuple[int, dict]:
    return _send(urllib.request.Request(url, method=method))


def _send(request) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(request) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        text, status = error.read().decode(), error.code
    return status, (json.loads(text) if not text.startswith("data:") else text)


def test_models_endpoint_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_with_an_image_matches_generate(engine, client):
    messages = questions(1, seed=31_000)[0]
    expected, prompt_tokens, completion_tokens = reference_answer(engine, messages, 4)
    response = client.chat.completions.create(
        model="tiny", messages=openai_messages(messages), max_tokens=4, temperature=0
    )
    assert response.choices[0].message.content == expected
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert response.choices[0].finish_reason == ("length" if completion_tokens == 4 else "stop")


def test_streaming_gives_the_same_text_and_usage(engine, client):
    messages = questions(2, seed=31_001)[1]
    expected, prompt_tokens, completion_tokens = reference_answer(engine, messages, 4)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=openai_messages(messages),
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # it did stream, token by token
    assert chunks[-1].usage.prompt_tokens == prompt_tokens and chunks[-1].usage.completion_tokens == completion_tokens


def test_stop_strings_and_max_tokens(engine, client):
    messages = questions(1, seed=31_002)[0]
    full, _, _ = reference_answer(engine, messages, 4)
    stop = full[1:3]  # a stop string inside the answer: the output ends just before it
    for stream in (False, True):
        response = client.chat.completions.create(
            model="tiny", messages=openai_messages(messages), max_tokens=4, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(response)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = response.choices[0].message.content, response.choices[0].finish_reason
        assert (text, finish) == (full[: full.index(stop)], "stop")
    one = client.chat.completions.create(model="tiny", messages=openai_messages(messages), max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


def test_sampling_with_a_seed_matches_generate(engine, client):
    messages = questions(1, seed=31_005)[0]
    inputs = engine.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    answers = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = engine.model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=1.8)
        expected = engine.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        response = client.chat.completions.create(
            model="tiny", messages=openai_messages(messages), max_tokens=6, temperature=1.8, seed=seed
        )
        answers.append(response.choices[0].message.content)
        assert answers[-1] == expected
    assert len(set(answers)) > 1  # it did sample


def test_streamed_text_never_shows_a_stop_string():
    from casa_hf.serving.chat import StopHoldBack, trim_at_stop

    rng = np.random.default_rng(0)
    for text, stop in [("the red circle. END of it", ["END", "xyz"]), ("no stop here", ["stop!"]), ("aab", ["ab"])]:
        for _ in range(20):
            cuts = sorted(rng.choice(len(text), size=3, replace=True))
            holdback, sent = StopHoldBack(stop), ""
            for piece in np.split(np.array(list(text)), cuts):
                sent += holdback.push("".join(piece))
                assert sent == trim_at_stop(text, stop)[0][: len(sent)]  # never past the cut, never a partial stop
            sent += holdback.flush()
            assert sent == trim_at_stop(text, stop)[0]


def test_concurrent_requests_get_their_own_answers(engine, client):
    conversations = questions(8, seed=31_003)
    expected = [reference_answer(engine, messages, 3)[0] for messages in conversations]

    def ask(index: int) -> str:
        messages = openai_messages(conversations[index])
        if index % 2:  # half of them stream
            chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=3).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == expected
    assert len(set(expected)) > 2  # different questions, different answers: a mix-up would show


def test_a_broken_image_is_refused_and_does_not_disturb_others(engine, client):
    messages = questions(1, seed=31_004)[0]
    expected, _, _ = reference_answer(engine, messages, 3)
    good = openai_messages(messages)
    png = base64.b64decode(good[1]["content"][0]["image_url"]["url"].partition(",")[2])
    truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()  # a PNG cut short
    broken = [good[0], {"role": "user", "content": [{"type": "image_url", "image_url": {"url": truncated}}]}]

    def ask(messages) -> str:
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=3).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, broken if i % 2 else good) for i in range(4)]
    for i, future in enumerate(futures):
        if i % 2:
            with pytest.raises(openai.BadRequestError, match="cannot decode the image"):
                future.result()
        else:
            assert future.result() == expected


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize(
    "messages, status, message",
    [
        (_user(_image("https://example.com/cat.png")), 400, "remote image URLs are not fetched"),
        (_user(_image("data:text/plain;base64,aGVsbG8=")), 415, "not an image/* type"),
        (_user(_image("data:image/png;base64,@@@")), 400, "not valid base64"),
        (_user(_image("/no/such/image.png")), 400, "no image file"),
        (_user(*[_image("x")] * 9), 400, "too many images"),
        (_user({"type": "input_audio", "input_audio": {}}), 400, "unsupported content part 'input_audio'"),
        (_user({"type": "text", "text": "red " * 5000}), 400, "exceeds the model's context of 4096"),
        ([{"role": "robot", "content": "hi"}], 400, "role must be one of"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(server, messages, status, message):
    code, body = post(f"{server.url}/v1/chat/completions", {"model": "tiny", "messages": messages})
    assert code == status and message in body["error"]["message"], body


def test_bad_request_shapes(server, tmp_path):
    url = f"{server.url}/v1/chat/completions"
    big = render(random_scene(np.random.default_rng(0), count=1), 112, np.random.default_rng(1)).resize((5000, 5000))
    path = tmp_path / "big.png"
    big.save(path)
    cases = [
        (post(url, b"{}", "text/plain"), 415, "expected Content-Type application/json"),
        (post(url, b"{not json"), 400, "not valid JSON"),
        (post(url, {"model": "gpt-4", "messages": _user()}), 404, "is not served here"),
        (post(url, {"messages": _user({"type": "text", "text": "hi"}), "max_tokens": 10**6}), 400, "max_tokens"),
        (post(url, {"messages": _user(_image(str(path)))}), 413, "over the 16777216 pixel limit"),
    ]
    for (code, body), status, message in cases:
        assert code == status and message in body["error"]["message"], body


PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"


@pytest.mark.parametrize(
    "data, looks_like",
    [
        (PDF, "starts like a PDF file"),
        (b"hello, this is not a picture\n", "looks like plain text ('hello, this is not a picture"),
        (bytes(range(200, 216)), "starts with bytes c8 c9 ca cb cc cd ce cf (no known file type)"),
    ],
)
def test_a_file_that_is_not_an_image_is_named_with_its_size_and_what_it_looks_like(server, tmp_path, data, looks_like):
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    encoded = "data:image/png;base64," + base64.b64encode(data).decode()
    url = f"{server.url}/v1/chat/completions"
    text = {"type": "text", "text": "what is it ?"}
    for sent, source in ((encoded, "the data URL"), (str(path), str(path))):  # a data URL, a path on the server
        code, body = post(url, {"messages": [{"role": "system", "content": "hi"}, _user(text, _image(sent))[0]]})
        message = body["error"]["message"]
        assert code == 400 and body["error"]["param"] == "messages[1].content[1].image_url", body
        assert f"messages[1].content[1].image_url: cannot decode the image in {source}" in message, message
        assert f"({len(data)} bytes, {looks_like}" in message and "BytesIO" not in message, message
    code, session = post(f"{server.url}/v1/sessions", {"max_tokens": 2})
    code, body = post(f"{server.url}/v1/sessions/{session['id']}/frames", {"image": encoded, "stream": False})
    assert code == 400 and body["error"]["param"] == "image", body
    assert (
        f"image: cannot decode the image in the data URL ({len(data)} bytes, {looks_like}" in body["error"]["message"]
    )
    assert call("DELETE", f"{server.url}/v1/sessions/{session['id']}")[0] == 200


def _frame_urls(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 7])
    return [data_url(render(random_scene(rng, count=1), 112, rng)) for _ in range(n)]


def _run_session(url: str, frames: list[str], window: int) -> tuple[str, list[dict]]:
    body = {"system": SYSTEM_TEXT, "prompt": SESSION_PROMPT, "max_tokens": 3, "window_tokens": window}
    code, session = post(f"{url}/v1/sessions", body)
    assert code == 201, session
    steps = []
    for frame in frames:
        code, events = post(f"{url}/v1/sessions/{session['id']}/frames", {"image": frame})
        assert code == 200, events
        payloads = [json.loads(line[6:]) for line in events.split("\n\n") if line and line != "data: [DONE]"]
        assert "".join(p["text"] for p in payloads[:-1]) == payloads[-1]["text"]  # streamed deltas add up
        steps.append(payloads[-1])
    return session["id"], steps


def _alone(engine, frames: list[str], window: int) -> list[str]:
    """The same frames through one `CasaStream` (the chat template's turns) in this process."""
    stream = CasaStream(
        engine.model,
        engine.processor,
        max_new_tokens=3,
        system=SYSTEM_TEXT,
        prompt=SESSION_PROMPT,
        text_budget=TextBudget(sink_tokens=4, window_tokens=window),
    )
    return [stream.feed(base64_image(url)).text for url in frames]


def base64_image(url: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB")


def test_concurrent_sessions_give_the_captions_of_each_alone_with_flat_memory(engine, server):
    window, frames_per_session = 48, 30
    videos = [_frame_urls(frames_per_session, seed) for seed in range(3)]
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda frames: _run_session(server.url, frames, window), videos))
    for frames, (session_id, steps) in zip(videos, runs, strict=True):
        assert [s["text"] for s in steps] == _alone(engine, frames, window)
        assert len({s["text"] for s in steps}) > 2  # captions follow the frames: a mix-up between sessions would show
        assert [s["frame"] for s in steps] == list(range(frames_per_session))
        state = call("GET", f"{server.url}/v1/sessions/{session_id}")[1]
        assert state["frames"] == frames_per_session and state["cache_bytes"] == steps[-1]["cache_bytes"]
        assert state["evicted_tokens"] > 0  # the budget did bound the transcript
        sizes = [s["cache_bytes"] for s in steps]
        assert max(sizes[-10:]) <= max(sizes[5:15])  # flat: the last frames hold no more than earlier ones
        assert max(s["cache_tokens"] for s in steps) <= 4 + window + 24  # sink + window + one turn
        ttft = [s["time_to_first_token_ms"] for s in steps]
        print(
            f"session {session_id[-6:]}: TTFT median frames 1-10 {statistics.median(ttft[:10]):.1f} ms, "
            f"frames 21-30 {statistics.median(ttft[-10:]):.1f} ms; cache {sizes[-1] / 1024:.1f} KiB"
        )
        assert call("DELETE", f"{server.url}/v1/sessions/{session_id}")[0] == 200


def test_the_system_prompt_counts_in_the_first_turn_size_check(server):
    """The first turn the stream feeds is the system prompt and the first frame's: too long together, the session is
    refused when it is created, not at its first frame."""
    body = {"prompt": SESSION_PROMPT, "max_tokens": 3, "window_tokens": 64}
    code, session = post(f"{server.url}/v1/sessions", body)
    assert code == 201, session  # the frame's turn alone fits
    assert call("DELETE", f"{server.url}/v1/sessions/{session['id']}")[0] == 200
    code, refused = post(f"{server.url}/v1/sessions", {**body, "system": "red " * 80})
    assert code == 400 and refused["error"]["code"] == "context_length_exceeded", refused
    assert refused["error"]["param"] == "prompt" and "window of 64 tokens" in refused["error"]["message"], refused
    assert not server.app.state.sessions.sessions


def test_session_text_turns_state_and_errors(server):
    code, session = post(f"{server.url}/v1/sessions", {"prompt": SESSION_PROMPT, "max_tokens": 3})
    frames = f"{server.url}/v1/sessions/{session['id']}/frames"
    assert post(frames, {"text": "what colour is the shape ?", "stream": False})[1]["frame"] is None
    done = post(frames, {"image": _frame_urls(1, 9)[0], "text": QUESTIONS["shape"], "stream": False})[1]
    assert done["frame"] == 0 and done["cache_tokens"] > 0
    state = call("GET", f"{server.url}/v1/sessions/{session['id']}")[1]
    assert (state["frames"], state["turns"]) == (1, 2)
    assert post(frames, {"image": "data:image/png;base64,AAAA"})[0] == 400
    assert post(frames, {})[0] == 400
    too_long = post(frames, {"text": "red " * 600})
    assert too_long[0] == 400 and "window of 512 tokens" in too_long[1]["error"]["message"]
    assert call("GET", f"{server.url}/v1/sessions/{session['id']}")[1]["turns"] == 2  # refused turns left no trace
    assert call("DELETE", f"{server.url}/v1/sessions/{session['id']}")[0] == 200
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/frames")):
        code, body = (
            post(f"{server.url}/v1/sessions/{session['id']}{path}", {"text": "hi"})
            if method == "POST"
            else call(method, f"{server.url}/v1/sessions/{session['id']}")
        )
        assert code == 404 and "no session" in body["error"]["message"]


def test_a_failing_model_call_fails_only_its_own_request(engine, server, client):
    code, broken = post(f"{server.url}/v1/sessions", {"max_tokens": 2})
    code, healthy = post(f"{server.url}/v1/sessions", {"max_tokens": 2})

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    server.app.state.sessions.sessions[broken["id"]].stream.feed = fail  # the model call itself fails, on the worker
    frame = _frame_urls(1, 5)[0]
    code, body = post(f"{server.url}/v1/sessions/{broken['id']}/frames", {"image": frame, "stream": False})
    assert code == 500 and "the frame failed: RuntimeError: boom" in body["error"]["message"]
    code, body = post(f"{server.url}/v1/sessions/{healthy['id']}/frames", {"image": frame, "stream": False})
    assert code == 200 and body["frame"] == 0
    messages = questions(1, seed=31_006)[0]
    answer = client.chat.completions.create(model="tiny", messages=openai_messages(messages), max_tokens=3)
    assert answer.choices[0].message.content == reference_answer(engine, messages, 3)[0]
    for session in (broken, healthy):
        assert call("DELETE", f"{server.url}/v1/sessions/{session['id']}")[0] == 200


def test_session_cap_expiry_and_deletion_free_memory(engine):
    server = Server(build_app(engine, ServeLimits(max_sessions=2, session_ttl_s=1.0)))
    try:
        store = server.app.state.sessions
        ids = [post(f"{server.url}/v1/sessions", {"max_tokens": 2})[1]["id"] for _ in range(2)]
        code, body = post(f"{server.url}/v1/sessions", {})
        assert code == 429 and "too many live sessions (2" in body["error"]["message"]
        for session_id in ids:
            post(f"{server.url}/v1/sessions/{session_id}/frames", {"image": _frame_urls(1, 3)[0], "stream": False})
        streams = [weakref.ref(store.sessions[i].stream) for i in ids]
        assert call("GET", f"{server.url}/health")[1]["cache_bytes"] > 0
        assert call("DELETE", f"{server.url}/v1/sessions/{ids[0]}")[0] == 200
        deadline = time.monotonic() + 10
        while store.sessions and time.monotonic() < deadline:  # the other one expires after 1 s idle
            time.sleep(0.1)
        gc.collect()
        assert [ref() for ref in streams] == [None, None]  # caches and streams are freed, not just forgotten
        health = call("GET", f"{server.url}/health")[1]
        assert (health["sessions"], health["cache_bytes"]) == (0, 0)
        assert call("GET", f"{server.url}/v1/sessions/{ids[1]}")[0] == 404
        assert post(f"{server.url}/v1/sessions", {})[0] == 201  # room again
    finally:
        server.stop()


def test_casa_hf_serve_says_where_it_listens_once_it_does(tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "casa_hf", "serve", "--model", "tiny", "--port", str(port)]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        try:
            line = lines.get(timeout=240)
        except queue.Empty:
            pytest.fail(f"casa-hf serve printed nothing (exit code {process.poll()}):\n{log.read_text()[-4000:]}")
        url = f"http://127.0.0.1:{port}/"
        assert url in line and f"{url}v1" in line and "tiny" in line, line
        assert call("GET", f"{url}health")[1]["model"] == "tiny"  # it listens by the time it says so
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_transformers_serve_serves_casa_through_the_launcher(engine, tmp_path):
    """Transformers' own server loads the model in a spawned process: the launcher registers CASA there too."""
    folder, port, log = export_model("tiny", tmp_path / "tiny"), free_port(), tmp_path / "serve.log"
    launcher = [sys.executable, "-m", "casa_hf.serving.transformers_serve", "serve", str(folder)]
    with log.open("w") as output:
        process = subprocess.Popen(
            [*launcher, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"], stdout=output, stderr=output
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, process, log)
        messages = questions(1, seed=31_007)[0]
        body = {"model": str(folder), "messages": openai_messages(messages), "max_tokens": 3, "temperature": 0}
        code, answer = post(f"{url}/v1/chat/completions", body)
        assert code == 200, f"{answer}\n{log.read_text()[-4000:]}"
        assert answer["choices"][0]["message"]["content"] == reference_answer(engine, messages, 3)[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_serve_extra_installs_the_readme_client():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["serve"]
    assert {requirement.split(">")[0] for requirement in extra} >= {"fastapi", "uvicorn", "openai"}
