"""cuDNN causal attention over a padded prefill buffer: dense on the whole bucket (what the runner
does) against cuDNN's ragged form, which is told the real length and so skips the padding rows.

    python benchmarks/exp_cudnn_ragged.py

For each (real length, bucket): the median time of each form, the first call's wall time (a new
plan, or not), and the largest difference of the real rows from attention at the exact length.
The dense calls' times are bound by the host's launch of one SDPA call (~0.2 ms, more than the
kernel at these lengths); the kernels themselves are timed by profile_prefill.py. What this
settles is the ragged form's cost: in torch 2.11 every call builds a new plan (55-70 ms).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_timing import median_gpu_ms  # benchmarks/, beside this script

H, D = 32, 96
CASES = ((2531, 3072), (2600, 3072), (2990, 3072), (6077, 6144), (8190, 8192), (8211, 8704), (8600, 8704))


def first_call_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def dense(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = (part.view(1, qkv.shape[0], H, D).transpose(1, 2) for part in qkv.split(H * D, dim=-1))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1)  # (T, H, D)


def ragged(qkv: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    q, k, v = (part.view(qkv.shape[0], H, D) for part in qkv.split(H * D, dim=-1))  # (T_pad, H, D)
    bucket = qkv.shape[0]
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cum, cum, bucket, bucket, False, 0.0, True)[0]


def main() -> None:
    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
    torch.manual_seed(0)
    print(f"{'real':>6} {'bucket':>6} {'dense ms':>9} {'ragged ms':>9} {'exact ms':>9} {'ragged 1st':>10} "
          f"{'diff ragged':>11} {'diff dense':>10}")
    for real, bucket in CASES:
        qkv = torch.randn(bucket, 3 * H * D, device="cuda", dtype=torch.bfloat16)
        qkv[real:] = 0
        cum = torch.tensor([0, real], dtype=torch.int32, device="cuda")
        try:
            first = first_call_ms(lambda: ragged(qkv, cum))
            out_r = ragged(qkv, cum)[:real]
            t_r = median_gpu_ms(lambda: ragged(qkv, cum), rounds=15)
        except Exception as exc:  # noqa: BLE001 - an experiment: print what failed
            print(real, bucket, "ragged failed:", repr(exc)[:300])
            first, out_r, t_r = float("nan"), None, float("nan")
        out_d = dense(qkv)[:real]
        t_d = median_gpu_ms(lambda: dense(qkv), rounds=15)
        exact = qkv[:real].contiguous()
        ref = dense(exact)
        t_e = median_gpu_ms(lambda: dense(exact), rounds=15)
        scale = ref.float().abs().max().item()
        diff_r = float("nan") if out_r is None else (out_r.float() - ref.float()).abs().max().item() / scale
        diff_d = (out_d.float() - ref.float()).abs().max().item() / scale
        print(f"{real:6d} {bucket:6d} {t_d:9.3f} {t_r:9.3f} {t_e:9.3f} {first:10.1f} {diff_r:11.2e} {diff_d:10.2e}",
              flush=True)


if __name__ == "__main__":
    main()
