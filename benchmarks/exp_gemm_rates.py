"""The prefill's matrix products at each workload's row count: does cuBLAS run the long prompts'
products slower per FLOP, and would cuBLASLt's choice or rows padded to a tile multiple help?

    python benchmarks/exp_gemm_rates.py [--out FILE]

For the decoder's four products (qkv 9,216, o 3,072, gate_up 16,384 and down 3,072 outputs, bf16)
and the vision tower's fc1 / fc2, at W1's, W2's and W3's row counts and at those rounded up to a
multiple of 256: the median time of F.linear over 7 timings of 10 calls, with PyTorch's default
BLAS and with cuBLASLt preferred (`torch.backends.cuda.preferred_blas_library`), the two
interleaved shape by shape so that a warming GPU favours neither. Each line also shows the SM
clock read right after (`torch.cuda.clock_rate`, when pynvml is installed). CUDA only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_timing import median_gpu_ms  # benchmarks/, beside this script

DECODER = {"qkv": (9216, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}
VISION = {"fc1": (4096, 1024), "fc2": (1024, 4096)}
ROWS = {"W1": 2533, "W2": 6093, "W3": 8196}
VISION_ROWS = {"W1": 17 * 577, "W2": 40 * 577}


def clock() -> str:
    try:
        return f"{torch.cuda.clock_rate()} MHz"
    except Exception:  # noqa: BLE001 - pynvml missing
        return "clock n/a"


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [(f"{w} {name}", m, n, k) for w, m in ROWS.items() for name, (n, k) in DECODER.items()]
    cases += [(f"{w} vision {name}", m, n, k) for w, m in VISION_ROWS.items() for name, (n, k) in VISION.items()]
    rows = []
    totals: dict[str, float] = {}
    for label, m, n, k in cases:
        weight = (torch.randn(n, k, device="cuda") / k**0.5).bfloat16()
        for rows_run in sorted({m, -(-m // 256) * 256}):
            x = torch.randn(rows_run, k, device="cuda", dtype=torch.bfloat16)
            flops = 2 * rows_run * n * k
            result = dict(case=label, rows=rows_run, n=n, k=k)
            line = []
            for library in ("default", "cublaslt"):
                torch.backends.cuda.preferred_blas_library("cublaslt" if library == "cublaslt" else "default")
                ms = median_gpu_ms(lambda: F.linear(x, weight), rounds=7, calls_per_round=10, warmup=3)
                result[library] = ms
                line.append(f"{library} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
                if rows_run == m:
                    totals[f"{label.split()[0]} {library}"] = totals.get(f"{label.split()[0]} {library}", 0.0) + ms
            torch.backends.cuda.preferred_blas_library("default")
            rows.append(result)
            print(f"{label:16s} {rows_run:6d} rows: " + "; ".join(line) + f"; {clock()}", flush=True)
    print("sums over one layer's products at the real row counts: "
          + ", ".join(f"{key} {value:.3f} ms" for key, value in totals.items()))
    if args.out:
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
                                            totals=totals), indent=1))


if __name__ == "__main__":
    main()
