"""Experiment: three cuts in a decode step's fixed cost, each switchable, timed on whole steps.

1. Block numbers before the PDL wait (`paged_attention.DECODE_PRELOAD_BLOCKS`): the decode
   attention reads its context length and its split's first block numbers while the qkv product
   still runs, so that its first key/value loads go out as soon as the product is done.
2. Rotary rows looked up (`ModelRunner.rope_tables`): the step's embedding and rotary rows in one
   kernel (`kernels.fused.decode_inputs`) instead of ~12 small kernels without PDL at its start.
3. A greedy step queued ahead reads its tokens where the step before left them (the graph's own
   argmax over its input ids, `_DecodeGraph.feeds_itself`); off = copied there by a kernel of its
   own between the two replays, as before (the argmax stays in the graph either way).

    python benchmarks/exp_decode_prologue.py [--settings 8:1:1,0:1:1,...] [--out FILE.json]

A setting is preload_blocks:tables:feed (tables 1 = looked up, 0 = computed; feed 1 = in place).
Each setting's graphs are captured afresh, in the order given (repeat the first as a drift check).
Before each setting the KV pool is refilled from one seed, and every setting's logits must equal
the first's bit for bit (no cut changes any arithmetic). Real shapes, random weights. Prints a row
per setting, in ms: the host-driven step (`time_decode`: inputs, replay, tokens read back), the
graph replayed alone (`time_graph_only`) and steps queued one ahead as the engine's lookahead
decode runs them (`time_queued`).

Result (one H100, 2026-12-07, benchmarks/RESULTS.md): all three on against all off, the batch-1
step queued one ahead 30-37 us shorter (0.8-1.1%) from 2.5K to 8.1K context, batch 8 15-20 us,
batch 64 unchanged; logits equal bit for bit. Kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gpu_kernel_check import ROOT, block_tables, random_real_model, time_decode, time_graph_only  # benchmarks/, beside this script
from phivision.generation import runner as runner_module
from phivision.generation.runner import ModelRunner, RunnerConfig
from phivision.kernels import paged_attention

SHAPES = {"B1_ctx2534": (1, 2534), "B1_ctx2790": (1, 2790), "B1_ctx6100": (1, 6100), "B1_ctx8128": (1, 8128),
          "B8_ctx2534": (8, 2534), "B64_ctx800": (64, 800)}


def time_queued(runner: ModelRunner, batch: int, context: int, steps: int = 50) -> float:
    """Per step: each greedy step queued before the previous one's tokens are read, fed them on the
    device (the engine's lookahead decode, without its scheduler)."""
    tables = block_tables(runner, batch, context + steps + 8)
    tokens = runner.decode_queued([100] * batch, [context] * batch, tables)
    for step in range(3):
        tokens = runner.decode_queued(tokens, [context + 1 + step] * batch, tables)
    tokens.tolist()
    t0 = time.perf_counter()
    for step in range(steps):
        queued = runner.decode_queued(tokens, [context + 4 + step] * batch, tables)
        tokens.tolist()  # the host reads the previous step's tokens while this one runs
        tokens = queued
    tokens.tolist()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--settings", default="8:1:1,0:1:1,8:0:1,8:1:0,0:0:0,8:1:1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",")]
    model = random_real_model(args.shared)
    runner = ModelRunner(model, RunnerConfig(num_blocks=2 * 64 * 16 + 8, block_size=64, max_num_seqs=64, max_model_len=8192))
    # (getattr: the script also runs on a tree from before these cuts, with the setting 0:0:0.)
    tables = getattr(runner, "rope_tables", None)
    feeds_itself = getattr(runner_module._DecodeGraph, "feeds_itself", None)
    rows, reference = [], {}
    try:
        for preload, lookup, feed in settings:
            paged_attention.DECODE_PRELOAD_BLOCKS = preload
            runner.rope_tables = tables if lookup else None
            if feeds_itself is not None:
                runner_module._DecodeGraph.feeds_itself = feeds_itself if feed else (lambda self, tokens, batch: False)
            runner._graphs = {b: runner_module._DecodeGraph(runner, b) for b in runner._graphs}
            runner.capture_graphs()
            gen = torch.Generator(device="cuda").manual_seed(1)
            runner.pool.keys.normal_(0, 1, generator=gen)
            runner.pool.values.normal_(0, 1, generator=gen)
            equal = True
            for key, (batch, context) in SHAPES.items():
                out = runner.decode([100] * batch, [context] * batch, block_tables(runner, batch, context + 1)).float().clone()
                equal &= torch.equal(out, reference.setdefault(key, out))
            row = {"preload": preload, "tables": bool(lookup), "feed_in_place": bool(feed), "logits_equal_to_first": equal,
                   "step_ms": {key: time_decode(runner, b, c) * 1e3 for key, (b, c) in SHAPES.items()},
                   "graph_only_ms": {key: time_graph_only(runner, b, c) * 1e3 for key, (b, c) in SHAPES.items()},
                   "queued_ms": {key: time_queued(runner, b, c) * 1e3 for key, (b, c) in SHAPES.items()}}
            rows.append(row)
            print(f"preload {preload} tables {lookup} feed {feed}: step " + " ".join(f"{k} {v:.3f}" for k, v in row["step_ms"].items())
                  + " | graph only " + " ".join(f"{v:.3f}" for v in row["graph_only_ms"].values())
                  + " | queued " + " ".join(f"{v:.3f}" for v in row["queued_ms"].values()) + f" | equal {equal}", flush=True)
    finally:
        paged_attention.DECODE_PRELOAD_BLOCKS = 8
        runner.rope_tables = tables
        if feeds_itself is not None:
            runner_module._DecodeGraph.feeds_itself = feeds_itself
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
