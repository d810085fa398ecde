"""A server's prefill steps with and without the packed attention call for steps that hold a
continued chunk: engine only, text prompts of W4's length, on one GPU.

    python benchmarks/exp_packed_prefill.py --model CKPT_DIR [--rounds 3]

With `max_num_batched_tokens` 8192 (as `phivision serve`), ten ~800-token prompts fill a step and the
eleventh's first part takes the rest, so every later step holds one chunk that continues its
prompt. Before 2026-12-03's sixth session such a step ran one attention call per chunk; now all its
chunks go through one packed call and only the continued chunk is redone over the pool. Each round
times every prefill step of 31 prompts (synchronised, ms) under both rules, in turn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phivision.generation import runner as runner_module  # noqa: E402
from phivision.generation.engine import Engine, EngineConfig, PromptRequest  # noqa: E402
from phivision.generation.sampling import SamplingParams  # noqa: E402
from phivision.processing.prompt import Processor  # noqa: E402
from phivision.weights import load_model  # noqa: E402

PACKED_WITH_CONTINUED = runner_module.ModelRunner._packed_offsets


def packed_only_from_starts(self, segments):
    """The rule before: no packed call when any chunk continues its sequence."""
    if any(start for _, _, start in segments):
        return None
    return PACKED_WITH_CONTINUED(self, segments)


def prefill_steps(engine: Engine, seed: int, n: int) -> list[float]:
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    # Each prompt's first block differs, so the prefix cache reuses nothing.
    engine.add_prompts([PromptRequest(f"<|user|>\nrequest {seed + i}: " + "word " * 790 + "<|end|>\n<|assistant|>\n", [],
                                      params) for i in range(n)])
    times = []
    while engine.has_unfinished():
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        if engine._last_kind == "prefill":
            times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=31)
    args = parser.parse_args()
    model = load_model(args.model, device="cuda", dtype=torch.bfloat16, progress=False)
    engine = Engine(model, Processor.from_pretrained(args.model, num_crops=4),
                    EngineConfig(max_num_seqs=64, kv_cache_tokens=65536, max_num_batched_tokens=8192,
                                 prefill_chunk_size=8192))
    prefill_steps(engine, 0, args.prompts)  # warm-up
    results: dict[str, list[list[float]]] = {"packed with continued chunks": [], "per chunk when one continues": []}
    seed = 1000
    for _ in range(args.rounds):
        for name, rule in (("packed with continued chunks", PACKED_WITH_CONTINUED),
                           ("per chunk when one continues", packed_only_from_starts)):
            runner_module.ModelRunner._packed_offsets = rule
            results[name].append(prefill_steps(engine, seed, args.prompts))
            seed += 1000
    runner_module.ModelRunner._packed_offsets = PACKED_WITH_CONTINUED
    for name, rounds in results.items():
        print(f"{name}: steps (ms) {[[round(t, 1) for t in r] for r in rounds]}")
        print(f"  total per round {[round(sum(r), 1) for r in rounds]}, median {statistics.median(sum(r) for r in rounds):.1f} ms")


if __name__ == "__main__":
    main()
