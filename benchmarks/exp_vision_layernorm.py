"""The vision tower's LayerNorms: Triton (`add_layer_norm`, residual add fused) against PyTorch's
add then layer_norm, in the tower's CUDA graphs at W1's and W2's crop counts.

    python benchmarks/exp_vision_layernorm.py --model CKPT_DIR [--crops 17 40 160]

For each crop count: the graph replay's median GPU time with each, and how far the features of
the two differ (max relative difference, and the share of elements not bit-equal). Also the
kernels alone at W1's rows: Triton against PyTorch's two kernels, each captured in a graph.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phivision.generation.vision_graphs import VisionTowerGraphs  # noqa: E402
from phivision.kernels import fused  # noqa: E402
from phivision.model import vision  # noqa: E402
from phivision.weights import load_model  # noqa: E402

from gpu_timing import capture, median_gpu_ms  # noqa: E402  (benchmarks/, beside this script)


def pytorch_layer_norm(x, norm):
    return norm(x)


def pytorch_add_layer_norm(x, residual, norm):
    h = residual + x
    return norm(h), h


def graph_ms(fn) -> float:
    """Median GPU time of fn() captured in a CUDA graph (warmed up on a side stream first)."""
    graph, _ = capture(fn)
    return median_gpu_ms(graph.replay, rounds=20)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--crops", type=int, nargs="+", default=[17, 40, 160])
    args = parser.parse_args()
    model = load_model(args.model, device="cuda", dtype=torch.bfloat16, progress=False)
    tower = model.vision_tower
    norm = tower.encoder.layers[0].layer_norm2
    rows = 17 * 577
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    print(f"kernels alone, {rows} rows x 1024 (graph replays of 10 calls; per call): "
          f"Triton add+LN {graph_ms(lambda: [fused.add_layer_norm(x, r, norm) for _ in range(10)]) / 10 * 1e3:.1f} us, "
          f"PyTorch add then LN {graph_ms(lambda: [pytorch_add_layer_norm(x, r, norm) for _ in range(10)]) / 10 * 1e3:.1f} us, "
          f"Triton LN {graph_ms(lambda: [fused.layer_norm(x, norm) for _ in range(10)]) / 10 * 1e3:.1f} us, "
          f"PyTorch LN {graph_ms(lambda: [norm(x) for _ in range(10)]) / 10 * 1e3:.1f} us", flush=True)
    (y, h), (y_ref, h_ref) = fused.add_layer_norm(x, r, norm), pytorch_add_layer_norm(x, r, norm)
    print(f"  sums bit-equal: {torch.equal(h, h_ref)}; LayerNorm outputs not bit-equal: "
          f"{(y != y_ref).float().mean().item():.1e}, max abs difference {(y.float() - y_ref.float()).abs().max().item():.2e}")
    saved = vision.layer_norm, vision.add_layer_norm
    for n in args.crops:
        pixels = torch.randn(n, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
        results = {}
        for label, patch in (("pytorch", (pytorch_layer_norm, pytorch_add_layer_norm)), ("triton", saved)):
            vision.layer_norm, vision.add_layer_norm = patch
            try:
                graphs = VisionTowerGraphs(tower, n)
                features = graphs(pixels).clone()
                results[label] = (median_gpu_ms(graphs.graphs[n].replay, rounds=20), features)
                del graphs
            finally:
                vision.layer_norm, vision.add_layer_norm = saved
        (t_py, f_py), (t_tr, f_tr) = results["pytorch"], results["triton"]
        diff = ((f_tr.float() - f_py.float()).abs().max() / f_py.float().abs().max()).item()
        unequal = (f_tr != f_py).float().mean().item()
        print(f"{n:4d} crops: graph replay PyTorch LN {t_py:.2f} ms, Triton add+LN {t_tr:.2f} ms; features max rel "
              f"difference {diff:.1e}, not bit-equal {unequal:.1e}", flush=True)


if __name__ == "__main__":
    main()
