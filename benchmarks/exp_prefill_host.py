"""Is a batch-1 prefill step bound by the host's kernel launches? Times one prefill of an N-token
text prompt three ways: the host's time to queue it, its GPU time when the GPU starts it at once
(host and GPU in lock-step), and its GPU time when a long matrix product was queued before it (the
host queues the whole step ahead, so the GPU never waits for a launch).

    python benchmarks/exp_prefill_host.py --model CKPT_DIR [--tokens 2531,6077,8190]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phivision.generation.engine import Engine, EngineConfig  # noqa: E402
from phivision.generation.runner import PrefillChunk  # noqa: E402
from phivision.weights import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", default="2531,6077,8190")
    args = parser.parse_args()
    model = load_model(args.model, device="cuda", dtype=torch.bfloat16, progress=False)
    engine = Engine(model, None, EngineConfig(max_num_seqs=1, max_model_len=8400, kv_cache_tokens=8400,
                                              enable_prefix_caching=False))
    runner = engine.runner
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    rng = np.random.default_rng(0)
    for n in (int(t) for t in args.tokens.split(",")):
        ids = rng.integers(1000, 29000, size=n).tolist()
        table = list(range(1, n // runner.config.block_size + 2))
        chunk = [PrefillChunk(ids, 0, table, None)]
        rows = {"host queue ms": [], "GPU ms, started at once": [], "GPU ms, queued behind a product": []}
        for attempt in range(6):
            behind = attempt % 2 == 1
            torch.cuda.synchronize()
            if behind:
                for _ in range(4):
                    a @ a  # ~5-6 ms each on an H200: the host gets ahead
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            runner.prefill_many(chunk, long_rope=n > 4096)
            host = (time.perf_counter() - t0) * 1e3
            end.record()
            torch.cuda.synchronize()
            if attempt >= 2:
                rows["GPU ms, queued behind a product" if behind else "GPU ms, started at once"].append(start.elapsed_time(end))
                if not behind:
                    rows["host queue ms"].append(host)
        print(f"{n} tokens: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in rows.items()), flush=True)


if __name__ == "__main__":
    main()
