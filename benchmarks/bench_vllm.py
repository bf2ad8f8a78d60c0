"""vLLM (casa_hf's plugin) against `casa-hf serve`, the same CASA checkpoint on the same CPU, one run:

- image chats: N concurrent clients (1, 8, 32) each posting chat completions with a new image, through each server's
  OpenAI API; requests per second and per-request latency, vLLM's as ratios to `casa-hf serve`'s;
- a video stream: one stream of frames, each frame followed by the same question, as a vLLM streaming-input session
  (vllm_stream.py, in vLLM's environment) and as a `casa-hf serve` live session; each frame's latency against its
  index, which stays flat for both: neither recomputes earlier frames, and CASA's windows keep one image.

    python benchmarks/bench_vllm.py --model casa-smollm2 --out results/vllm_cpu      # about 4 minutes on 2 cores

vLLM runs from `CASA_VLLM_PYTHON` (scripts/setup_vllm_cpu.sh), with this checkout's `src` first on its path. Prints
two tables, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from bench_serve import data_url, post
from tqdm import tqdm

from casa_hf.builtin_models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the square?"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def vllm_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="2")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    return env


def start(server: str, folder: Path, port: int, vllm_python: str, max_clients: int, log) -> subprocess.Popen:
    if server == "vllm":
        command = [
            vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
            "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048", "--served-model-name", "casa",
            "--max-num-seqs", str(max_clients), "--disable-log-stats",
        ]  # fmt: skip
        return subprocess.Popen(command, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT)
    command = [sys.executable, "-m", "casa_hf.cli", "serve", "--model", str(folder), "--port", str(port)]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # = casa-hf serve ...


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"{url}/health")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no server at {url} after {timeout} s") from None
            time.sleep(0.5)


def served_model(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models") as response:
        return json.loads(response.read())["data"][0]["id"]


def chat(url: str, frame: str, max_tokens: int) -> dict:
    """One image chat completion: its latency and answer."""
    image = {"type": "image_url", "image_url": {"url": frame}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}]
    body = {"model": served_model(url), "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    reply = post(f"{url}/v1/chat/completions", body)
    return {
        "latency_ms": (time.perf_counter() - start) * 1000,
        "end": time.perf_counter(),
        "answer": reply["choices"][0]["message"]["content"],
    }


def chat_level(url: str, clients: int, requests: int, size: int, max_tokens: int) -> dict:
    """`clients` threads, each posting `requests` chats in turn, every chat with an image of its own."""
    frames = [[data_url(client * 1000 + i, size) for i in range(requests)] for client in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda mine: [chat(url, frame, max_tokens) for frame in mine], frames))
    done = [result for client in results for result in client]
    elapsed = max(result["end"] for result in done) - start
    latency = np.array([result["latency_ms"] for result in done])
    return {
        "clients": clients,
        "requests": len(done),
        "requests_per_s": len(done) / elapsed,
        "p50_ms": float(np.percentile(latency, 50)),
        "p90_ms": float(np.percentile(latency, 90)),
        "answers": sorted({result["answer"] for result in done}),
    }


def vllm_stream(folder: Path, frames: int, size: int, max_tokens: int, vllm_python: str) -> list[float]:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "stream.json"
        command = [
            vllm_python, str(ROOT / "benchmarks" / "vllm_stream.py"), "--model", str(folder), "--frames", str(frames),
            "--image-size", str(size), "--question", QUESTION, "--max-tokens", str(max_tokens), "--out", str(out),
        ]  # fmt: skip
        subprocess.run(command, env=vllm_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return [turn["latency_ms"] for turn in json.loads(out.read_text())]


def serve_stream(url: str, frames: int, size: int, max_tokens: int) -> list[float]:
    """A `casa-hf serve` live session asked `QUESTION` after each frame: each frame's latency."""
    session = post(f"{url}/v1/sessions", {"prompt": QUESTION, "max_tokens": max_tokens})
    latencies = []
    for index in range(frames):
        start = time.perf_counter()
        post(f"{url}/v1/sessions/{session['id']}/frames", {"image": data_url(index, size), "stream": False})
        latencies.append((time.perf_counter() - start) * 1000)
    urllib.request.urlopen(urllib.request.Request(f"{url}/v1/sessions/{session['id']}", method="DELETE"))
    return latencies


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    for server, colour in (("vllm", "tab:blue"), ("casa-hf serve", "tab:orange")):
        rows = [row for row in report["chats"] if row["server"] == server]
        clients = [row["clients"] for row in rows]
        left.plot(clients, [row["requests_per_s"] for row in rows], "o-", color=colour, label=server)
        middle.plot(clients, [row["p50_ms"] for row in rows], "o-", color=colour, label=f"{server} p50")
        middle.plot(clients, [row["p90_ms"] for row in rows], "o--", color=colour, label=f"{server} p90")
        stream = report["streams"][server]
        right.plot(range(1, len(stream) + 1), stream, ".-", color=colour, label=server)
    left.set(xlabel="concurrent clients", ylabel="requests / s", xscale="log", title="image chats: throughput")
    middle.set(xlabel="concurrent clients", ylabel="latency (ms)", xscale="log", title="image chats: latency")
    right.set(xlabel="frame", ylabel="latency (ms)", title="one video stream: each frame", ylim=(0, None))
    for axis in (left, middle, right):
        axis.legend()
        axis.grid(alpha=0.3)
    for axis in (left, middle):
        levels = sorted({row["clients"] for row in report["chats"]})
        axis.set_xticks(levels, [str(n) for n in levels])
        axis.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="casa-smollm2", help="a built-in name or a CASA checkpoint folder")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=32, help="chat requests per level, spread over its clients")
    parser.add_argument("--frames", type=int, default=48, help="frames of the video stream")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--vllm-python", default=os.environ.get("CASA_VLLM_PYTHON", str(ROOT / ".venv-vllm/bin/python"))
    )
    parser.add_argument("--out", default="results/vllm_cpu")
    args = parser.parse_args()

    folder = resolve_model(args.model)
    report = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "chats": [], "streams": {}}
    for server in tqdm(("vllm", "casa-hf serve"), desc="servers"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tempfile.TemporaryFile("w+")
        process = start(server, folder, port, args.vllm_python, max(args.clients), log)
        try:
            wait_ready(process, url)
            chat_level(url, 1, 2, args.image_size, args.max_tokens)  # warm-up
            for clients in args.clients:
                per_client = max(1, args.requests // clients)
                row = chat_level(url, clients, per_client, args.image_size, args.max_tokens)
                report["chats"].append({"server": server, **row})
                tqdm.write(
                    f"{server}, {clients} clients: {row['requests_per_s']:.2f} requests/s, p50 {row['p50_ms']:.0f} ms"
                )
            if server == "casa-hf serve":
                report["streams"][server] = serve_stream(url, args.frames, args.image_size, args.max_tokens)
        except Exception:
            log.seek(0)
            print(f"{server}'s log, last lines:\n{log.read()[-4000:]}")
            raise
        finally:
            process.terminate()
            process.wait()
            log.close()
        if server == "vllm":  # the stream runs on an engine of its own, once the server has given the CPU back
            stream = vllm_stream(folder, args.frames, args.image_size, args.max_tokens, args.vllm_python)
            report["streams"][server] = stream

    print("| clients | vLLM req/s | serve req/s | vLLM / serve | vLLM p50 | serve p50 | vLLM p90 | serve p90 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for clients in args.clients:
        ours = next(r for r in report["chats"] if r["server"] == "vllm" and r["clients"] == clients)
        base = next(r for r in report["chats"] if r["server"] == "casa-hf serve" and r["clients"] == clients)
        ours["throughput_vs_serve"] = ours["requests_per_s"] / base["requests_per_s"]
        print(
            f"| {clients} | {ours['requests_per_s']:.2f} | {base['requests_per_s']:.2f} | "
            f"x{ours['throughput_vs_serve']:.2f} | {ours['p50_ms']:.0f} | {base['p50_ms']:.0f} | "
            f"{ours['p90_ms']:.0f} | {base['p90_ms']:.0f} |"
        )
    print("| one video stream | frames 2-9, median ms | last 8 frames, median ms | last / first |")
    print("|---|---|---|---|")
    for server, stream in report["streams"].items():
        first, last = float(np.median(stream[1:9])), float(np.median(stream[-8:]))
        report[f"stream_{server}"] = {"first_ms": first, "last_ms": last, "last_vs_first": last / first}
        print(f"| {server} | {first:.0f} | {last:.0f} | x{last / first:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()  # other processes on the machine skew every number: recorded with them
    print(f"machine load average (1, 5, 15 min) at the end: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}")
    report |= {"cpu_count": os.cpu_count(), "load_average_at_end": load}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
