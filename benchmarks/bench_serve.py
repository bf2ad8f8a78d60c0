"""Load test of `casa-hf serve`: N concurrent live sessions posting frames, and N concurrent chat-completion clients,
against one server started as the README says. Requests per second and latency percentiles per N, side by side with
N = 1 (the ratios), server memory after each level; prints a table, writes JSON and a PNG.

    python benchmarks/bench_serve.py --sessions 1 2 4 8 --frames 32 --out results/serve_load
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import synthetic_frame
from tqdm import tqdm


def data_url(index: int, size: int) -> str:
    buffer = io.BytesIO()
    synthetic_frame(index, size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def server_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


def run_session(url: str, frames: list[str], max_tokens: int) -> list[dict]:
    """One client: create a session, post its frames one after the other, delete it; per-frame timings."""
    session = post(f"{url}/v1/sessions", {"max_tokens": max_tokens})
    timings = []
    for frame in frames:
        start = time.perf_counter()
        done = post(f"{url}/v1/sessions/{session['id']}/frames", {"image": frame, "stream": False})
        timings.append({**done, "client_ms": (time.perf_counter() - start) * 1000, "end": time.perf_counter()})
    urllib.request.urlopen(urllib.request.Request(f"{url}/v1/sessions/{session['id']}", method="DELETE"))
    return timings


def run_chat(url: str, frames: list[str], max_tokens: int) -> list[dict]:
    """One client: one stateless chat completion per frame."""
    timings = []
    for frame in frames:
        start = time.perf_counter()
        image = {"type": "image_url", "image_url": {"url": frame}}
        messages = [{"role": "user", "content": [image, {"type": "text", "text": "what colour is the shape ?"}]}]
        post(f"{url}/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens})
        timings.append({"client_ms": (time.perf_counter() - start) * 1000, "end": time.perf_counter()})
    return timings


def level(url: str, kind: str, clients: int, frames: int, size: int, max_tokens: int) -> dict:
    videos = [[data_url(c * 1000 + i, size) for i in range(frames)] for c in range(clients)]
    run = run_session if kind == "session" else run_chat
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda frames: run(url, frames, max_tokens), videos))
    elapsed = max(t["end"] for r in results for t in r) - start
    latency = np.array([t["client_ms"] for r in results for t in r])
    row = {
        "kind": kind,
        "clients": clients,
        "requests": int(latency.size),
        "requests_per_s": latency.size / elapsed,
        "p50_ms": float(np.percentile(latency, 50)),
        "p90_ms": float(np.percentile(latency, 90)),
        "p99_ms": float(np.percentile(latency, 99)),
    }
    if kind == "session":
        ttft = [t["time_to_first_token_ms"] for r in results for t in r]
        row["ttft_p50_ms"] = float(np.percentile(ttft, 50))
        row["cache_kib_first_last"] = [results[0][0]["cache_bytes"] / 1024, results[0][-1]["cache_bytes"] / 1024]
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, colour in (("session", "tab:blue"), ("chat", "tab:orange")):
        mine = [r for r in rows if r["kind"] == kind]
        n = [r["clients"] for r in mine]
        left.plot(n, [r["requests_per_s"] for r in mine], "o-", color=colour, label=f"{kind} requests/s")
        right.plot(n, [r["p50_ms"] for r in mine], "o-", color=colour, label=f"{kind} p50")
        right.plot(n, [r["p99_ms"] for r in mine], "o--", color=colour, label=f"{kind} p99")
    left.set(xlabel="concurrent clients", ylabel="requests / s", xscale="log", title="throughput")
    right.set(xlabel="concurrent clients", ylabel="latency (ms)", xscale="log", title="latency per request")
    levels = sorted({r["clients"] for r in rows})
    for axis in (left, right):
        axis.set_xticks(levels, [str(n) for n in levels], minor=False)
        axis.minorticks_off()
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrency levels")
    parser.add_argument("--frames", type=int, default=32, help="frames (or chat requests) per client")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", default="results/serve_load")
    args = parser.parse_args()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = ["--model", args.model, "--port", str(port), "--max-sessions", str(max(args.sessions))]
    server = subprocess.Popen([sys.executable, "-m", "casa_hf.cli", "serve", *options])  # = casa-hf serve ...
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health")
                break
            except OSError:
                time.sleep(0.2)
        level(url, "session", 1, 4, args.image_size, args.max_tokens)  # warm-up
        rows = []
        plan = [(kind, n) for kind in ("session", "chat") for n in args.sessions]
        for kind, n in tqdm(plan, desc="load levels"):
            rows.append(level(url, kind, n, args.frames, args.image_size, args.max_tokens))
            rows[-1]["server_rss_mib"] = server_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait()

    for row in rows:
        base = next(r for r in rows if r["kind"] == row["kind"] and r["clients"] == args.sessions[0])
        row["throughput_vs_first"] = row["requests_per_s"] / base["requests_per_s"]
        row["p50_vs_first"] = row["p50_ms"] / base["p50_ms"]
    print("| kind | clients | requests | req/s (x vs 1) | p50 ms (x vs 1) | p90 ms | p99 ms | TTFT p50 | RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.1f} "
            f"(x{r['throughput_vs_first']:.2f}) | {r['p50_ms']:.0f} (x{r['p50_vs_first']:.2f}) | {r['p90_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r.get('ttft_p50_ms', float('nan')):.0f} | {r['server_rss_mib']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    load = os.getloadavg()  # other processes on the machine skew every number: recorded with them
    print(f"machine load average (1, 5, 15 min) at the end: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}")
    report = {"settings": settings, "cpu_count": os.cpu_count(), "load_average_at_end": load, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
