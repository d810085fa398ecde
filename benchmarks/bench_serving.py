"""Serving-load benchmark: workload W4 of ../shared/bench/WORKLOADS.md through the HTTP API.

    python benchmarks/bench_serving.py --out benchmarks/results/DATE-DEVICE.json [--skip-baseline]
        [--shared DIR] [--model DIR] [--requests 64] [--new-tokens 128] [--image-size 672] [--num-crops 4]
        [--server-arg=--max-num-seqs --server-arg=64 ...]

A random real-shape bf16 checkpoint (as bench_latency.py writes one; or `--model DIR`) is served by
`python -m phivision serve` in a subprocess. After a warm-up (by default a burst of as many
short requests of the same shape, other images: first-call costs of the batched prefill shapes,
e.g. Triton compiles, stay out of the measurement; `--warmup one` sends a single one), `--requests` distinct
requests (each its own deterministic PNG as a data: URI + a ~30-token question, greedy,
`ignore_eos`, streamed with usage) are sent at once by a standard-library HTTP/1.1 client (asyncio
streams, chunked transfer decoding: no dependency beyond the Python standard library). Every body
is encoded before the clock starts.

Per request: TTFT = arrival of the first SSE chunk with content - the moment the request was sent
(connection opened); the gaps between consecutive content chunks give the inter-token latency (a
chunk can carry more than one token when the detokenizer holds bytes back). Aggregate output
tokens/s = all completion tokens (from the usage chunks) / (last answer's end - first send).

Peak GPU memory comes from the server's `phivision_gpu_memory_peak_bytes` gauge (torch's peak
allocation since the server started) or, without it, from polling nvidia-smi during the run.
After the run, the server's KV blocks must all be free again.

Then (after the server has stopped, GPU only): the ceilings (from the results file when it holds
them for this device, else measured), the W4 floors, and the plain-transformers baseline of
bench_latency.py for ONE W4-shaped request, from which the sequential figures are derived (the
baseline answers one request at a time). Results are merged into `--out` under W4, floors.W4 and
baseline.W4, keeping the file's other keys.

Runs on the CPU at small scale too (no ceilings, floors, GPU memory or baseline there), e.g.
    python benchmarks/bench_serving.py --model ../shared/golden/tiny-model/checkpoint --requests 8 \\
        --new-tokens 16 --image-size 336 --skip-baseline --out /tmp/w4.json \\
        --server-arg=--max-num-seqs --server-arg=8
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_latency
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # phivision, when it is not installed
import bench_latency  # noqa: E402
from bench_latency import make_png  # noqa: E402
from make_checkpoint import write_bench_checkpoint  # noqa: E402

from phivision.config import ModelConfig  # noqa: E402
from phivision.generation.engine import EngineConfig  # noqa: E402
from phivision.processing.image import hd_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "w4"
PEAK_GAUGE = "phivision_gpu_memory_peak_bytes"
IMAGE_SEED_BASE = 1000  # request i uses seed IMAGE_SEED_BASE + i
WARMUP_SEED_BASE = 5000  # the warm-up's images: never the measured ones (the server caches image features)
WARMUP_TOKENS = 4
# The base question (30 tokens with the stand-in tokenizer) and small per-request variations.
QUESTION = bench_latency.WORKLOADS["W4"]["text"]
SUBJECTS = ("the houses, the trees, the sky and the sun", "the trees, the houses, the sun and the sky",
            "the sky, the sun, the houses and the trees", "the sun, the sky, the trees and the houses")


def question(i: int) -> str:
    """About 30 tokens, different for every request (so no two prompts are the same)."""
    base = QUESTION.replace(SUBJECTS[0], SUBJECTS[i % len(SUBJECTS)])
    return f"Picture {i + 1}. {base}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


# ------------------------------------------------------------------ a tiny standard-library HTTP client


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def parse_metrics(text: str) -> dict[str, float]:
    """The samples of a Prometheus text page as name (with its labels, if any) -> value."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            parts = line.split()
            if len(parts) == 2:
                try:
                    values[parts[0]] = float(parts[1])
                except ValueError:
                    pass
    return values


@dataclass
class Result:
    index: int
    sent: float = 0.0
    end: float = 0.0
    status: int = 0
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival, raw body bytes)
    error: str | None = None
    # Filled in by parse():
    content_times: list[float] = field(default_factory=list)
    text: str = ""
    usage: dict | None = None
    finish_reason: str | None = None

    def parse(self) -> None:
        """Splits the SSE stream into events; an event's time is that of the chunk that completed it."""
        buffer = b""
        for arrival, data in self.chunks:
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    try:
                        body = json.loads(payload)
                    except json.JSONDecodeError:
                        self.error = self.error or f"bad SSE payload: {payload[:200]!r}"
                        continue
                    if "error" in body:
                        self.error = self.error or json.dumps(body["error"])
                    if body.get("usage"):
                        self.usage = body["usage"]
                    for choice in body.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            self.content_times.append(arrival)
                            self.text += content
                        if choice.get("finish_reason"):
                            self.finish_reason = choice["finish_reason"]
        if self.status != 200 and self.error is None:
            self.error = f"HTTP {self.status}: " + b"".join(d for _, d in self.chunks)[:500].decode("utf-8", "replace")


async def post_stream(host: str, port: int, path: str, body: bytes, result: Result) -> None:
    """POSTs `body` and records every piece of the (chunked) response body with its arrival time."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    result.sent = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + body)
        await writer.drain()
        status_line = await reader.readline()
        result.status = int(status_line.split()[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readline()
                if not size_line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    break
                data = await reader.readexactly(size)
                result.chunks.append((time.perf_counter(), data))
                await reader.readexactly(2)
        elif "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
            result.chunks.append((time.perf_counter(), data))
        else:
            while data := await reader.read(65536):
                result.chunks.append((time.perf_counter(), data))
    except Exception as exc:  # recorded, not raised: one failure must not hide the others' figures
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.end = time.perf_counter()
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:
                pass


async def send_all(host: str, port: int, bodies: list[bytes]) -> list[Result]:
    results = [Result(i) for i in range(len(bodies))]
    await asyncio.gather(*(post_stream(host, port, "/v1/chat/completions", body, r) for body, r in zip(bodies, results)))
    return results


def request_body(png: bytes, text: str, new_tokens: int, num_crops: int) -> bytes:
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return json.dumps({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                  {"type": "text", "text": text}]}],
        "max_tokens": new_tokens, "temperature": 0, "num_crops": num_crops, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }).encode()


# ------------------------------------------------------------------ the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, extra_args: list[str], log_path: Path, startup_timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [sys.executable, "-m", "phivision", "serve", "--model", str(model), "--port", str(self.port),
                        "--quiet", "--served-model-name", MODEL_NAME, *extra_args]
        print("server: " + " ".join(self.command), flush=True)
        self._log = log_path.open("w")
        t0 = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if http_get(self.url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"the server did not start within {startup_timeout:.0f} s:\n{self.log()}")
            time.sleep(0.25)
        self.startup_s = time.perf_counter() - t0

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(http_get(self.url + "/metrics")[1])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class Poller(threading.Thread):
    """During the run: the most KV blocks in use (from /metrics) and, when asked, nvidia-smi's memory.used."""

    def __init__(self, server: Server, nvidia_smi: bool, interval: float = 0.25):
        super().__init__(daemon=True)
        self.server, self.nvidia_smi, self.interval = server, nvidia_smi, interval
        self.stop_event = threading.Event()
        self.max_blocks_used = 0.0
        self.max_running = 0.0
        self.max_smi_mib: float | None = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                m = self.server.metrics()
                if "phivision_kv_blocks_total" in m:
                    used = m["phivision_kv_blocks_total"] - m["phivision_kv_blocks_free"]
                    self.max_blocks_used = max(self.max_blocks_used, used)
                self.max_running = max(self.max_running, m.get("phivision_requests_running", 0.0))
            except OSError:
                pass
            if self.nvidia_smi:
                mib = nvidia_smi_used_mib()
                if mib is not None:
                    self.max_smi_mib = mib if self.max_smi_mib is None else max(self.max_smi_mib, mib)
            self.stop_event.wait(self.interval)


def nvidia_smi_used_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.split()[0])  # the first GPU: the one the server uses by default
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------ floors and the baseline


def serve_dtype(server_args: list[str], cuda: bool) -> str:
    """The compute dtype `phivision serve` runs with: --dtype if passed through, else its default."""
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    for i, arg in enumerate(server_args):
        if arg == "--dtype" and i + 1 < len(server_args):
            return names.get(server_args[i + 1], server_args[i + 1])
        if arg.startswith("--dtype="):
            return names.get(arg.split("=", 1)[1], arg.split("=", 1)[1])
    return "bfloat16" if cuda else "float32"


def kv_bytes_per_token(config: ModelConfig, itemsize: int = 2) -> int:
    text = config.text
    return text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * itemsize  # 384 KiB at the real shapes


def w4_floors(config: ModelConfig, n: int, prompt_tokens: int, new_tokens: int, crops: int, ceilings: dict) -> dict:
    """Floors for n requests arriving together.

    Prefill: bench_latency's floors() for one request (2 x decoder params x tokens + causal attention
    + vision tower x 577 x crops, at the matmul rate); all n need n times that. The k-th request to
    finish its prefill can do so no earlier than k prefills in: TTFT floors = mean / p99 of k x one.
    Decode: one step of all n = (decoder weights without the embedding table + KV of n sequences at
    their context) / copy bandwidth; throughput and e2e at the mid context (prompt + new/2), the
    p99 gap at the final context (prompt + new).
    """
    from phivision.weights import build_meta_model

    model = build_meta_model(config)
    one = bench_latency.floors(model, prompt_tokens, new_tokens, crops, ceilings)
    text_params = sum(p.numel() for name, p in model.language_model.named_parameters() if "embed_tokens" not in name)
    text_params += model.lm_head.weight.numel()
    weight_bytes = 2 * text_params
    all_bytes = 2 * sum(p.numel() for p in model.parameters())
    kv_token = kv_bytes_per_token(config)
    bandwidth = ceilings["copy_bytes_s"]

    def step_s(context: float) -> float:
        return (weight_bytes + kv_token * n * context) / bandwidth

    prefill_one = one["ttft_ms"] / 1e3
    step_mid, step_end = step_s(prompt_tokens + new_tokens / 2), step_s(prompt_tokens + new_tokens)
    e2e = n * prefill_one + (new_tokens - 1) * step_mid
    ttfts = [k * prefill_one for k in range(1, n + 1)]
    return {
        "output_tok_s": n * new_tokens / e2e,
        "ttft_ms_mean": statistics.mean(ttfts) * 1e3,
        "ttft_ms_p99": percentile(ttfts, 99) * 1e3,
        "itl_ms_p99": step_end * 1e3,
        "e2e_s": e2e,
        "peak_gib": (all_bytes + kv_token * n * (prompt_tokens + new_tokens)) / 2**30,
        "prefill_one_ms": prefill_one * 1e3,
        "prefill_all_s": n * prefill_one,
        "decode_step_ms_mid": step_mid * 1e3,
        "decoder_weight_gb": weight_bytes / 1e9,
        "kv_gb_mid": kv_token * n * (prompt_tokens + new_tokens / 2) / 1e9,
        "prompt_tokens": prompt_tokens,
        "crops": crops,
        "how": "prefill of one request as bench_latency.floors(); n requests arriving together: total prefill n x one, "
               "TTFT floors over k x one for k = 1..n; decode step of n sequences = (decoder weights + n x KV at the "
               "context) / copy bandwidth; output_tok_s and e2e_s use the mid context, itl_ms_p99 the final one; "
               "peak = all weights + KV of n whole sequences",
    }


def sequential_baseline(one: dict, n: int, new_tokens: int) -> dict:
    """The figures of n requests sent at once to a server that answers one at a time, like `one` each."""
    e2e, ttft = one["e2e_s"], one["ttft_ms"] / 1e3
    ttfts = [k * e2e + ttft for k in range(n)]
    return {
        "output_tok_s": n * new_tokens / (n * e2e),
        "ttft_ms_mean": statistics.mean(ttfts) * 1e3,
        "ttft_ms_p99": percentile(ttfts, 99) * 1e3,
        "itl_ms_p99": 1e3 / one["decode_tok_s"],
        "e2e_s": n * e2e,
        "peak_gib": one["peak_gib"],
        "single_request": one,
        "how": f"plain transformers (bench_latency.run_baseline) measured on ONE W4-shaped request; {n} requests "
               f"served one after another: request k (0-based) waits k x its e2e, so TTFT_k = k x e2e + ttft "
               f"(mean and p99 over k); output_tok_s = {n} x {new_tokens} / ({n} x e2e); e2e_s = {n} x e2e; "
               f"itl_ms_p99 = its mean decode time per token (generate gives no per-token times); peak = one request's",
    }


# ------------------------------------------------------------------ main


def summarise(results: list[Result]) -> dict:
    ok = [r for r in results if r.error is None and r.content_times]
    ttfts = [r.content_times[0] - r.sent for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r.content_times, r.content_times[1:])]
    tokens = [int((r.usage or {}).get("completion_tokens", 0)) for r in ok]
    prompt = [int((r.usage or {}).get("prompt_tokens", 0)) for r in ok]
    cached = [int(((r.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0) for r in ok]
    first_send = min(r.sent for r in results)
    last_end = max(r.end for r in results)
    tpot = [(r.content_times[-1] - r.content_times[0]) / (t - 1) for r, t in zip(ok, tokens) if t > 1]
    # What the clients saw of the engine's steps: content arrivals (all requests) grouped where they
    # come within 2 ms of each other, as [ms after the first send, chunks in the group].
    timeline: list[list[float]] = []
    for t in sorted(t for r in ok for t in r.content_times):
        t_ms = (t - first_send) * 1e3
        if timeline and t_ms - timeline[-1][2] <= 2.0:
            timeline[-1][1] += 1
            timeline[-1][2] = t_ms
        else:
            timeline.append([t_ms, 1, t_ms])
    return {
        "output_tok_s": sum(tokens) / (last_end - first_send),
        "ttft_ms_mean": statistics.mean(ttfts) * 1e3 if ttfts else float("nan"),
        "ttft_ms_p50": percentile(ttfts, 50) * 1e3,
        "ttft_ms_p99": percentile(ttfts, 99) * 1e3,
        "ttft_ms_max": max(ttfts) * 1e3 if ttfts else float("nan"),
        "itl_ms_mean": statistics.mean(gaps) * 1e3 if gaps else float("nan"),
        "itl_ms_p50": percentile(gaps, 50) * 1e3,
        "itl_ms_p99": percentile(gaps, 99) * 1e3,
        "itl_ms_max": max(gaps) * 1e3 if gaps else float("nan"),
        "tpot_ms_mean": statistics.mean(tpot) * 1e3 if tpot else float("nan"),
        "e2e_s": last_end - first_send,
        "request_e2e_s_mean": statistics.mean(r.end - r.sent for r in ok) if ok else float("nan"),
        "completion_tokens": sum(tokens),
        "completion_tokens_per_request": sorted(set(tokens)),
        "prompt_tokens": round(statistics.mean(prompt)) if prompt else 0,
        "prompt_tokens_range": [min(prompt), max(prompt)] if prompt else [],
        "cached_prompt_tokens": sum(cached),
        "content_chunks": sum(len(r.content_times) for r in ok),
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "send_spread_ms": (max(r.sent for r in results) - first_send) * 1e3,
        "timeline": [[round(start, 1), count] for start, count, _ in timeline],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="phivision serving-load benchmark (W4) through the HTTP API")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="folder with spec/ and tokenizer/")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (merged into when it exists)")
    parser.add_argument("--model", type=Path, default=None, help="serve this checkpoint instead of a random real-shape one")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=672)
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="passed through to `phivision serve` (repeatable; write --server-arg=--flag for flags)")
    parser.add_argument("--warmup", choices=("burst", "one"), default="burst",
                        help="before the clock: as many short requests of the same shape at once (default), or one")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="record the server's stacks with py-spy during the measured burst (raw format, into DIR)")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health")
    args = parser.parse_args()
    n, new_tokens, size, num_crops = args.requests, args.new_tokens, args.image_size, args.num_crops
    cuda = torch.cuda.is_available()  # no CUDA context is made here: the server must have the GPU to itself

    report = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_serving-", dir="/tmp"))
    try:
        ckpt = args.model if args.model is not None else write_bench_checkpoint(args.shared, tmp / "ckpt")
        model_config = ModelConfig.from_file(ckpt)
        rows, cols = hd_grid(size, size, num_crops)
        crops = rows * cols + 1

        # Every body is encoded before the server starts (and long before the clock).
        bodies = [request_body(make_png(size, size, IMAGE_SEED_BASE + i), question(i), new_tokens, num_crops)
                  for i in range(n)]
        warmup = [request_body(make_png(size, size, WARMUP_SEED_BASE + i), question(i), WARMUP_TOKENS, num_crops)
                  for i in range(n if args.warmup == "burst" else 1)]
        print(f"{n} request bodies ready ({sum(map(len, bodies)) / 2**20:.1f} MiB)", flush=True)

        server = Server(ckpt, args.server_arg, tmp / "server.log", args.startup_timeout)
        try:
            print(f"server up in {server.startup_s:.1f} s on {server.url}", flush=True)
            t0 = time.perf_counter()
            warm = asyncio.run(send_all("127.0.0.1", server.port, warmup))
            for r in warm:
                r.parse()
                if r.error:
                    raise RuntimeError(f"a warm-up request failed: {r.error}\n{server.log()}")
            print(f"warm-up: {len(warm)} request(s) of {WARMUP_TOKENS} tokens in {time.perf_counter() - t0:.2f} s "
                  f"(ended at epoch {time.time():.3f}: files the server writes after it, e.g. Triton's cache, date from the run)",
                  flush=True)

            before = server.metrics()
            use_gauge = PEAK_GAUGE in before
            poller = Poller(server, nvidia_smi=cuda and not use_gauge and shutil.which("nvidia-smi") is not None)
            poller.start()
            spy = None
            if args.py_spy is not None:  # sampled stacks of the server and its engine process, for the burst
                args.py_spy.mkdir(parents=True, exist_ok=True)
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.process.pid), "--subprocesses", "--idle",
                                        "--rate", "250", "--format", "raw", "-o", str(args.py_spy / "server.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                time.sleep(1.0)  # py-spy attaches
            results = asyncio.run(send_all("127.0.0.1", server.port, bodies))
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            poller.stop_event.set()
            poller.join()
            after = server.metrics()
            # The KV blocks of finished requests must all be free again (prefix-cached blocks count as free).
            deadline = time.monotonic() + 10
            while (after.get("phivision_kv_blocks_free") != after.get("phivision_kv_blocks_total")
                   and time.monotonic() < deadline):
                time.sleep(0.2)
                after = server.metrics()
            server_alive = server.alive()
        finally:
            rc = server.stop()
        log = server.log_path.read_text(errors="replace")
        for r in results:
            r.parse()
        failed = [r for r in results if r.error is not None or not r.content_times]
        for r in failed[:3]:
            print(f"request {r.index} failed: {r.error or 'no content'}", flush=True)
        if len(failed) == n:
            raise RuntimeError(f"every request failed; server log:\n{log}")

        ours = summarise(results)
        blocks_total = after.get("phivision_kv_blocks_total")
        blocks_free = after.get("phivision_kv_blocks_free")
        dtype = serve_dtype(args.server_arg, cuda)
        kv_token = kv_bytes_per_token(model_config, 4 if dtype == "float32" else 2)
        block_bytes = EngineConfig().block_size * kv_token  # the server's block size (serve keeps the default)
        if blocks_total is not None and blocks_free != blocks_total:
            print(f"WARNING: after the run {blocks_free:.0f} of {blocks_total:.0f} KV blocks are free: "
                  "finished requests still hold KV blocks", flush=True)
        if use_gauge:
            peak_gib, peak_source = after[PEAK_GAUGE] / 2**30, f"/metrics {PEAK_GAUGE} (torch peak allocation since server start)"
        elif poller.max_smi_mib is not None:
            peak_gib, peak_source = poller.max_smi_mib / 1024, "nvidia-smi memory.used, polled during the run (whole GPU)"
        else:
            peak_gib, peak_source = None, "none (no CUDA)"
        errors_in_log = [line for line in log.splitlines() if "Traceback" in line or "ERROR" in line]
        w4 = {
            **{k: ours[k] for k in ("output_tok_s", "ttft_ms_mean", "ttft_ms_p99", "itl_ms_p99", "e2e_s")},
            "peak_gib": peak_gib,
            "peak_source": peak_source,
            "requests": n,
            "new_tokens": new_tokens,
            "prompt_tokens": ours["prompt_tokens"],
            "image": f"{size}x{size} PNG (make_png, seeds {IMAGE_SEED_BASE}..{IMAGE_SEED_BASE + n - 1}), num_crops={num_crops}, "
                     f"{crops} crops",
            "details": ours,
            "kv": {
                "blocks_total": blocks_total, "blocks_free_after": blocks_free,
                "all_free_after": blocks_total is not None and blocks_free == blocks_total,
                "max_blocks_used": poller.max_blocks_used,
                "pool_gib": blocks_total * block_bytes / 2**30 if blocks_total else None,
                "max_used_gib": poller.max_blocks_used * block_bytes / 2**30,
                "max_running": poller.max_running,
            },
            "server": {
                "startup_s": server.startup_s, "exit_code": rc, "alive_after_run": server_alive,
                "log_error_lines": errors_in_log[:20],
                "generated_tokens_counter": after.get("phivision_generation_tokens_total", 0)
                - before.get("phivision_generation_tokens_total", 0),
                "engine_steps": after.get("phivision_engine_steps_total", 0) - before.get("phivision_engine_steps_total", 0),
                # Where the engine thread's time went during the run (the rest of e2e is idle or GIL waits).
                "engine_time_s": {phase: after.get(f'phivision_engine_seconds_total{{phase="{phase}"}}', 0)
                                  - before.get(f'phivision_engine_seconds_total{{phase="{phase}"}}', 0)
                                  for phase in ("prepare", "prefill", "decode")},
                "engine_steps_by_kind": {kind: after.get(f'phivision_engine_steps_by_kind_total{{kind="{kind}"}}', 0)
                                         - before.get(f'phivision_engine_steps_by_kind_total{{kind="{kind}"}}', 0)
                                         for kind in ("prefill", "decode")},
                "lookahead_steps": {outcome: after.get(f'phivision_lookahead_steps_total{{outcome="{outcome}"}}', 0)
                                    - before.get(f'phivision_lookahead_steps_total{{outcome="{outcome}"}}', 0)
                                    for outcome in ("queued", "used")},
            },
            "settings": {
                "server_args": args.server_arg,
                "dtype": dtype,
                "server_command": " ".join(server.command[1:]),
                "model": str(args.model) if args.model else "random real-shape bf16 checkpoint (spec/phi35v-config.json)",
                "warmup": f"{len(warmup)} request(s) of the same shape (other images), {WARMUP_TOKENS} tokens each, sent at once",
                "client": "stdlib asyncio HTTP/1.1, one connection per request, all sent at once after the warm-up; "
                          "greedy, ignore_eos, streamed with usage",
                "timing": "TTFT = first SSE chunk with content - request sent (connection opened); ITL = gaps between "
                          "consecutive content chunks (a chunk may carry >1 token); output_tok_s = completion tokens "
                          "(usage) / (last answer's end - first send); e2e_s = that same span",
            },
            "per_request": [{"ttft_ms": (r.content_times[0] - r.sent) * 1e3 if r.content_times else None,
                             "e2e_s": r.end - r.sent, "completion_tokens": (r.usage or {}).get("completion_tokens"),
                             "content_chunks": len(r.content_times), "finish_reason": r.finish_reason, "error": r.error}
                            for r in results],
        }
        print(f"ours W4: " + json.dumps({k: w4[k] for k in ("output_tok_s", "ttft_ms_mean", "ttft_ms_p99", "itl_ms_p99",
                                                            "e2e_s", "peak_gib")}), flush=True)
        print(f"engine thread during the run: {json.dumps(w4['server']['engine_time_s'])} s, steps "
              f"{json.dumps(w4['server']['engine_steps_by_kind'])}, lookahead {json.dumps(w4['server']['lookahead_steps'])}",
              flush=True)

        # ---- after the server has gone: device facts, ceilings, floors, baseline (GPU only)
        if cuda:
            device = torch.cuda.get_device_name()
            w4["device"] = device
            if report.get("ceilings") and report.get("device") == device:
                ceilings, source = report["ceilings"], "from the results file (same device)"
            else:
                ceilings, source = bench_latency.measure_ceilings(), "measured in this run"
            w4["ceilings"] = dict(ceilings, source=source)
            prompt_tokens = ours["prompt_tokens"]
            report.setdefault("floors", {})["W4"] = w4_floors(model_config, n, prompt_tokens, new_tokens, crops, ceilings)
        else:
            w4["device"] = "cpu (no CUDA: no ceilings, floors, GPU memory or baseline)"
        w4["torch"] = torch.__version__
        report["W4"] = w4
        report.setdefault("device", w4["device"])
        report.setdefault("torch", torch.__version__)
        report.setdefault("dtype", w4["settings"]["dtype"])
        if args.out:
            args.out.write_text(json.dumps(report, indent=1, default=float))

        if not args.skip_baseline and cuda:
            from phivision.processing.prompt import Processor

            bench_latency.WORKLOADS["W4"] = dict(bench_latency.WORKLOADS["W4"], images=[(size, size)], num_crops=num_crops,
                                                 new_tokens=new_tokens)
            config_dict = json.loads((ckpt / "config.json").read_text())
            try:
                processor = Processor.from_pretrained(str(ckpt), num_crops=num_crops)
                base = bench_latency.run_baseline(config_dict, processor, ["W4"])
                baseline = report.setdefault("baseline", {})
                baseline.setdefault("transformers", base["transformers"])
                baseline["W4"] = sequential_baseline(base["W4"], n, new_tokens)
            except Exception as exc:  # the baseline's failure must not lose our figures
                report["baseline_W4_error"] = repr(exc)
                print(f"baseline failed: {exc!r}", flush=True)
        elif not args.skip_baseline:
            print("baseline skipped: no CUDA", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.out}")

    floor = report.get("floors", {}).get("W4", {})
    base = report.get("baseline", {}).get("W4", {}) if not args.skip_baseline else {}
    print(f"W4: {n} requests at once, {size}x{size} image (num_crops {num_crops}), ~{w4['prompt_tokens']} prompt tokens, "
          f"{new_tokens} new tokens each; device {w4['device']}; server args {' '.join(args.server_arg) or '(defaults)'}")
    if w4["kv"]["blocks_total"] is not None:
        print(f"KV blocks after the run: {w4['kv']['blocks_free_after']:.0f} free of {w4['kv']['blocks_total']:.0f}; "
              f"most in use {w4['kv']['max_blocks_used']:.0f}; most running {w4['kv']['max_running']:.0f}; "
              f"failed requests {ours['failed']}")
    print(f"{'figure':14} {'ours':>10} {'floor':>10} {'base':>10} {'ours:floor':>10} {'ours:base':>10}")
    fmt = lambda v: f"{'-':>10}" if v is None else f"{v:10.2f}"  # noqa: E731
    for key in ("output_tok_s", "ttft_ms_mean", "ttft_ms_p99", "itl_ms_p99", "e2e_s", "peak_gib"):
        o, f, b = w4.get(key), floor.get(key), base.get(key)
        if key == "output_tok_s":  # higher is better: ours / floor (<= 1) and ours / baseline (speed-up)
            r_floor, r_base = (o / f if o and f else None), (o / b if o and b else None)
        else:  # lower is better: floor / ours (<= 1) and baseline / ours (speed-up)
            r_floor, r_base = (f / o if o and f else None), (b / o if o and b else None)
        print(f"{key:14} {fmt(o)} {fmt(f)} {fmt(b)} {fmt(r_floor)} {fmt(r_base)}")


if __name__ == "__main__":
    main()
