"""Experiment: two cuts in a captured decode step's fixed cost, each switchable, timed on whole steps.

1. Block numbers before the PDL wait (`paged_attention.DECODE_PRELOAD_BLOCKS`): the decode
   attention reads its context length and its split's first block numbers while the qkv product
   still runs, so that its first key/value loads go out as soon as the product is done.
2. Rotary rows looked up (`ModelRunner.rope_tables`): the step's embedding and rotary rows in one
   kernel (`kernels.fused.decode_inputs`) instead of ~12 small kernels without PDL at its start.

    python benchmarks/exp_decode_prologue.py [--settings 8:1,0:1,8:0,0:0,8:1] [--out FILE.json]

A setting is preload_blocks:tables (tables 1 = looked up, 0 = computed). Each setting's graphs
are captured afresh, in the order given (repeat the first as a drift check). Before each setting
the KV pool is refilled from one seed, and every setting's logits must equal the first's bit for
bit (neither cut changes any arithmetic). Real shapes, random weights. Prints a row per setting:
the host-driven step (`time_decode`) and the graph replayed alone (`time_graph_only`), in ms.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gpu_kernel_check import ROOT, block_tables, random_real_model, time_decode, time_graph_only  # benchmarks/, beside this script
from phivision.generation import runner as runner_module
from phivision.generation.runner import ModelRunner, RunnerConfig
from phivision.kernels import paged_attention

SHAPES = {"B1_ctx2534": (1, 2534), "B1_ctx2790": (1, 2790), "B1_ctx6100": (1, 6100), "B1_ctx8128": (1, 8128),
          "B8_ctx2534": (8, 2534), "B64_ctx800": (64, 800)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--settings", default="8:1,0:1,8:0,0:0,8:1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",")]
    model = random_real_model(args.shared)
    runner = ModelRunner(model, RunnerConfig(num_blocks=2 * 64 * 16 + 8, block_size=64, max_num_seqs=64, max_model_len=8192))
    tables = runner.rope_tables
    rows, reference = [], {}
    try:
        for preload, lookup in settings:
            paged_attention.DECODE_PRELOAD_BLOCKS = preload
            runner.rope_tables = tables if lookup else None
            runner._graphs = {b: runner_module._DecodeGraph(runner, b) for b in runner._graphs}
            runner.capture_graphs()
            gen = torch.Generator(device="cuda").manual_seed(1)
            runner.pool.keys.normal_(0, 1, generator=gen)
            runner.pool.values.normal_(0, 1, generator=gen)
            equal = True
            for key, (batch, context) in SHAPES.items():
                out = runner.decode([100] * batch, [context] * batch, block_tables(runner, batch, context + 1)).float().clone()
                equal &= torch.equal(out, reference.setdefault(key, out))
            row = {"preload": preload, "tables": bool(lookup), "logits_equal_to_first": equal,
                   "step_ms": {key: time_decode(runner, b, c) * 1e3 for key, (b, c) in SHAPES.items()},
                   "graph_only_ms": {key: time_graph_only(runner, b, c) * 1e3 for key, (b, c) in SHAPES.items()}}
            rows.append(row)
            print(f"preload {preload} tables {lookup}: step " + " ".join(f"{k} {v:.3f}" for k, v in row["step_ms"].items())
                  + " | graph only " + " ".join(f"{v:.3f}" for v in row["graph_only_ms"].values()) + f" | equal {equal}",
                  flush=True)
    finally:
        paged_attention.DECODE_PRELOAD_BLOCKS = 8
        runner.rope_tables = tables
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
