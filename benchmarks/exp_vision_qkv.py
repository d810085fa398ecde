"""The vision tower's q, k and v projections as three products or one, on CUDA.

    python benchmarks/exp_vision_qkv.py

CLIP's checkpoint stores q_proj, k_proj and v_proj separately and the tower runs three (rows x
1024) @ (1024 x 1024) products with bias; one (1024 x 3072) product over the concatenated weights
computes the same columns. Times per layer for W1's 17 crops, W2's 40 and a W4 slice's 160 crops
(577 rows each), bf16, median of 20 rounds of 20 calls; and the largest difference between the two
ways' outputs (the column sums may be reduced in another order by another kernel).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import median_gpu_ms  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    hidden = 1024
    weights = [torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(3)]
    biases = [torch.randn(hidden, device="cuda", dtype=torch.bfloat16) * 0.1 for _ in range(3)]
    fused_w, fused_b = torch.cat(weights), torch.cat(biases)  # (3072, 1024), (3072,)
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for crops in (17, 40, 160):
        x = torch.randn(crops * 577, hidden, device="cuda", dtype=torch.bfloat16)
        three = median_gpu_ms(lambda: [F.linear(x, w, b) for w, b in zip(weights, biases)], 20, 20, warmup=5)
        one = median_gpu_ms(lambda: F.linear(x, fused_w, fused_b), 20, 20, warmup=5)
        split = F.linear(x, fused_w, fused_b).split(hidden, dim=-1)
        diff = max((a - F.linear(x, w, b)).abs().max().item() for a, w, b in zip(split, weights, biases))
        flops = 2 * x.shape[0] * hidden * 3 * hidden
        print(f"{crops:4d} crops: three products {three * 1e3:7.1f} us ({flops / three / 1e9:.0f} TFLOP/s), "
              f"one {one * 1e3:7.1f} us ({flops / one / 1e9:.0f} TFLOP/s), x23 layers saves {(three - one) * 23:.2f} ms; "
              f"max difference {diff:.3g}", flush=True)


if __name__ == "__main__":
    main()
