"""Experiment: the decode attention's launch settings (context splits per SM, warps, stages) chosen
on whole captured decode steps rather than on the kernel alone (sweep_decode_attention.py): in
the step, the kernel starts under PDL beside the qkv product and hands over to the o projection,
so the best setting alone need not be the best in the chain.

    python benchmarks/exp_decode_splits.py [--settings 6:2:0,4:2:0,...] [--out FILE.json]

A setting is programs_per_sm:warps:stages (stages 0: the default, 3 with one split, 2 with
several). Real shapes, random weights; each setting captured afresh, in the order given (the
default repeats the first as a drift check). Before each setting's logits the KV pool is refilled
from one seed; every setting's logits are compared with the first's (a different split count or
warp count regroups the sums, and after 32 layers of random weights that moves the logits by a few
percent of the largest; the largest difference is printed). Prints the best setting by the
batch-1 graph-only times last, as `best <per_sm> <warps> <stages>`.

Result (2026-12-07, H100, RESULTS.md): the default (6 programs per SM: 25 splits at batch 1, 2
warps) is the fastest batch-1 step; batch 8 was 4% faster with 4 per SM (3 splits) or 4 warps.
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


def logits_at(runner: ModelRunner, batch: int, context: int) -> torch.Tensor:
    return runner.decode([100] * batch, [context] * batch, block_tables(runner, batch, context + 1)).float().clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--settings", default="6:2:0,4:2:0,8:2:0,12:2:0,6:4:0,8:4:0,4:4:0,6:2:3,6:2:0")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",")]
    model = random_real_model(args.shared)
    runner = ModelRunner(model, RunnerConfig(num_blocks=2 * 64 * 16 + 8, block_size=64, max_num_seqs=64, max_model_len=8192))
    original_splits = paged_attention.decode_splits
    defaults = paged_attention.paged_decode_attention.__defaults__  # (scratch, num_warps, num_stages, fused_combine)
    rows, reference = [], {}
    try:
        for per_sm, warps, stages in settings:
            runner_module.decode_splits = lambda b, h, sms, _p=per_sm: original_splits(b, h, sms, _p)
            paged_attention.paged_decode_attention.__defaults__ = (defaults[0], warps, stages or None, defaults[3])
            # New graph objects: each takes its split count when built, not when captured.
            runner._graphs = {b: runner_module._DecodeGraph(runner, b) for b in runner._graphs}
            runner.capture_graphs()
            gen = torch.Generator(device="cuda").manual_seed(1)
            runner.pool.keys.normal_(0, 1, generator=gen)
            runner.pool.values.normal_(0, 1, generator=gen)
            worst = 0.0
            for key, (batch, context) in SHAPES.items():
                out = logits_at(runner, batch, context)
                reference.setdefault(key, out)
                worst = max(worst, ((out - reference[key]).abs().max() / reference[key].abs().max()).item())
            row = {"per_sm": per_sm, "warps": warps, "stages": stages, "max_rel_diff_to_first": worst,
                   "splits_b1": original_splits(1, 32, runner.num_sms, per_sm),
                   "step_ms": {key: time_decode(runner, b, c) * 1e3 for key, (b, c) in SHAPES.items()},
                   "graph_only_ms": {key: time_graph_only(runner, b, c) * 1e3 for key, (b, c) in SHAPES.items()}}
            rows.append(row)
            print(f"per SM {per_sm:2} ({row['splits_b1']:2} splits) warps {warps} stages {stages}: step "
                  + " ".join(f"{k} {v:.3f}" for k, v in row["step_ms"].items())
                  + " | graph only " + " ".join(f"{v:.3f}" for v in row["graph_only_ms"].values())
                  + f" | diff {worst:.1e}", flush=True)
    finally:
        runner_module.decode_splits = original_splits
        paged_attention.paged_decode_attention.__defaults__ = defaults
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    score: dict[tuple, list[float]] = {}
    for row in rows:
        score.setdefault((row["per_sm"], row["warps"], row["stages"]), []).append(
            sum(v for k, v in row["graph_only_ms"].items() if k.startswith("B1_")))
    best = min(score, key=lambda s: max(score[s]))
    print(f"best {best[0]} {best[1]} {best[2]}")


if __name__ == "__main__":
    main()
