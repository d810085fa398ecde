"""Compiles the decode step's newest kernels (the embedding and rotary lookup, the float32-out
product, the attention with its block numbers read early) for sm_90 (H100/H200) without a GPU, and
counts the global loads each issues before its PDL wait: a check for when no device machine starts.

    pip install triton==3.6.0   # the device's version; ptxas comes with it
    python benchmarks/sm90_compile_check.py

It proves the kernels build (ptxas included) at the launch settings the engine uses; it times
nothing and runs nothing (gpu_kernel_check.py and exp_decode_prologue.py do, on the device).
"""

from __future__ import annotations

import inspect

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from phivision.kernels import fused, gemv, paged_attention

TARGET = GPUTarget("cuda", 90, 32)


def build(fn, constants: dict, pointers: dict, num_warps: int) -> dict:
    """Compile `fn` with its remaining arguments typed i32 (sm_scale fp32) -> PTX facts."""
    names = inspect.signature(fn.fn).parameters
    signature = {n: pointers.get(n, "constexpr" if n in constants else ("fp32" if n == "sm_scale" else "i32")) for n in names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=TARGET,
                            options={"num_warps": num_warps})
    ptx = kernel.asm["ptx"]
    before = ptx.split("griddepcontrol.wait")[0] if "griddepcontrol.wait" in ptx else ""
    return {"cubin_bytes": len(kernel.asm["cubin"]), "pdl_waits": ptx.count("griddepcontrol.wait"),
            "loads_before_wait": before.count("ld.global")}


def main() -> None:
    rows = {}
    rows["decode_inputs"] = build(
        fused._decode_inputs_kernel,
        {"BLOCK_H": triton.next_power_of_2(3072), "BLOCK_D": triton.next_power_of_2(96), "USE_PDL": True},
        {"IDS": "*i64", "POS": "*i64", "LONG": "*i1", "EMB": "*bf16", "COS_T": "*bf16", "SIN_T": "*bf16", "X": "*bf16",
         "COS": "*bf16", "SIN": "*bf16"}, num_warps=4)
    rows["gemv, float32 out"] = build(
        gemv._gemv_kernel, {"BLOCK_N": gemv.GEMV_BLOCK_N, "BLOCK_K": gemv.GEMV_BLOCK_K, "NUM_STAGES": gemv.GEMV_NUM_STAGES,
                            "GATED": False, "USE_PDL": True},
        {"X": "*bf16", "W": "*bf16", "Y": "*fp32"}, num_warps=gemv.GEMV_NUM_WARPS)
    # A batch-1 launch on an H100 (132 SMs), as paged_decode_attention derives it: 32 heads of 96 with
    # one kv head each, 64-token blocks, several splits (so 2 stages).
    splits = paged_attention.decode_splits(1, 32, 132)
    part_a, part_b = paged_attention._head_parts(96)
    split = {"NUM_SPLITS": splits, "SPLITS_P2": triton.next_power_of_2(splits), "KV_GROUP": 1, "BLOCK_SIZE": 64,
             "HEAD_DIM": 96, "D_A": part_a, "D_B": part_b, "NUM_STAGES": 2,
             "FUSED_COMBINE": paged_attention.DECODE_FUSED_COMBINE, "USE_PDL": True}
    pointers = {"QKV": "*bf16", "K_POOL": "*bf16", "V_POOL": "*bf16", "BLOCK_TABLES": "*i32", "CONTEXT_LENS": "*i32",
                "ACC": "*fp32", "M": "*fp32", "L": "*fp32", "COUNTS": "*i32", "OUT": "*bf16"}
    for preload in (0, 2, paged_attention.DECODE_PRELOAD_BLOCKS):
        rows[f"decode split, PRELOAD {preload}"] = build(paged_attention._decode_split_kernel, dict(split, PRELOAD=preload),
                                                         pointers, num_warps=paged_attention.DECODE_NUM_WARPS)
    print(f"Triton {triton.__version__}, target sm_90")
    for name, row in rows.items():
        print(f"{name:26s} cubin {row['cubin_bytes']:7d} B, PDL waits {row['pdl_waits']}, "
              f"global loads before the wait {row['loads_before_wait']}")


if __name__ == "__main__":
    main()
