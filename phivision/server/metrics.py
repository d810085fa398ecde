"""Prometheus text exposition of the server's state and counters (no client library needed for this)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .async_engine import AsyncEngine

TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.total}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """Counters the HTTP layer updates; engine gauges are read when scraped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.responses: Counter[str] = Counter()  # by HTTP status
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.completion_tokens = 0

    def record_response(self, status: int) -> None:
        with self._lock:
            self.responses[str(status)] += 1

    def record_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def record_completion(self, tokens: int) -> None:
        with self._lock:
            self.completion_tokens += tokens

    def render(self, engine: AsyncEngine) -> str:
        stats, counters = engine.stats, engine.counters

        def metric(name: str, kind: str, help_text: str, value: float | int) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]

        waiting, running = stats.get("waiting", 0), stats.get("running", 0)
        lines: list[str] = []
        # Requests on their way to the engine (being prepared, or held for their slice) count as waiting too.
        lines += metric("phivision_requests_waiting", "gauge", "Requests waiting for admission (KV memory, a batch slot, or their slice of the vision tower).",
                        waiting + max(0, engine.num_unfinished - waiting - running))
        lines += metric("phivision_requests_running", "gauge", "Requests being prefilled or decoded.", running)
        lines += metric("phivision_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks held by requests.",
                        round(stats.get("kv_usage", 0.0), 6))
        lines += metric("phivision_kv_blocks_total", "gauge", "Usable KV cache blocks.", stats.get("kv_blocks_total", 0))
        lines += metric("phivision_kv_blocks_free", "gauge", "KV cache blocks free (prefix-cached ones included).",
                        stats.get("kv_blocks_free", 0))
        lines += metric("phivision_generation_tokens_per_second", "gauge",
                        "Tokens generated per second over the last 10 seconds.", round(engine.tokens_per_second(), 3))
        lines += metric("phivision_generation_tokens_total", "counter", "Tokens generated.", stats.get("generated_tokens", 0))
        lines += metric("phivision_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", counters.prompt_tokens)
        lines += metric("phivision_requests_aborted_total", "counter", "Requests cancelled (client gone or stop string).",
                        counters.requests_aborted)
        steps = stats.get("steps", {})
        lines += metric("phivision_engine_steps_total", "counter", "Engine steps run.", sum(steps.values()))
        lines += metric("phivision_image_cache_hits_total", "counter", "Images whose features came from the cache.",
                        stats.get("image_cache_hits", 0))
        lines += metric("phivision_image_cache_misses_total", "counter", "Images run through the vision tower.",
                        stats.get("image_cache_misses", 0))
        lines += ["# HELP phivision_engine_seconds_total Engine time by phase (prepare: images and prompts).",
                  "# TYPE phivision_engine_seconds_total counter"]
        lines += [f'phivision_engine_seconds_total{{phase="{k}"}} {round(v, 6)}' for k, v in stats.get("time_s", {}).items()]
        lines += ["# HELP phivision_engine_steps_by_kind_total Engine steps by kind.",
                  "# TYPE phivision_engine_steps_by_kind_total counter"]
        lines += [f'phivision_engine_steps_by_kind_total{{kind="{k}"}} {v}' for k, v in steps.items()]
        lines += ["# HELP phivision_lookahead_steps_total Decode steps queued before the previous step's "
                  "tokens were read, and those used (the rest were dropped).",
                  "# TYPE phivision_lookahead_steps_total counter"]
        lines += [f'phivision_lookahead_steps_total{{outcome="{k}"}} {v}' for k, v in stats.get("lookahead_steps", {}).items()]
        if "gpu_memory_peak" in stats:
            lines += metric("phivision_gpu_memory_allocated_bytes", "gauge", "GPU memory held by tensors now.",
                            stats["gpu_memory_allocated"])
            lines += metric("phivision_gpu_memory_peak_bytes", "gauge", "Most GPU memory held by tensors since start.",
                            stats["gpu_memory_peak"])
        with self._lock:
            lines += ["# HELP phivision_http_responses_total Chat completion responses by HTTP status.",
                      "# TYPE phivision_http_responses_total counter"]
            lines += [f'phivision_http_responses_total{{status="{code}"}} {n}' for code, n in sorted(self.responses.items())]
            lines += ["# HELP phivision_time_to_first_token_seconds Time from request to first token.",
                      "# TYPE phivision_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("phivision_time_to_first_token_seconds")
        return "\n".join(lines) + "\n"
