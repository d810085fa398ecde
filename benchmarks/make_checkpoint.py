"""Writes a random real-shape bf16 checkpoint (with the stand-in tokenizer) for the GPU scripts.

    python benchmarks/make_checkpoint.py OUT_DIR [--shared ../shared]

The same checkpoint bench_latency.py and bench_serving.py write for themselves (through
write_bench_checkpoint); the engine-only
and profiling scripts (w4_engine_only.py, profile_prefill.py) take it as --model, and
bench_latency.py and exp_ttft_parts.py as --checkpoint (`bench_checkpoint`: written there once,
reused by later processes; writing it takes ~45 s of a device call).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from phivision.weights import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def write_bench_checkpoint(shared: Path, out: Path) -> Path:
    """The real config (shared/spec) with random bf16 weights in two shards, plus shared/tokenizer's files."""
    start = time.perf_counter()
    spec = json.loads((shared / "spec" / "phi35v-config.json").read_text())
    ckpt = Path(write_random_checkpoint(spec, out, dtype=torch.bfloat16, num_shards=2, seed=0))
    for f in (shared / "tokenizer").iterdir():
        if f.is_file():
            shutil.copyfile(f, ckpt / f.name)
    print(f"random real-shape bf16 checkpoint written in {time.perf_counter() - start:.1f} s: {ckpt}", flush=True)
    return ckpt


@contextlib.contextmanager
def bench_checkpoint(shared: Path, folder: Path | None):
    """The checkpoint's folder: `folder` as an earlier process left it, else written there (under a
    temporary name renamed when complete, so a killed writer leaves nothing that looks whole), or
    written in a temporary folder removed on exit when `folder` is None."""
    if folder is None:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            yield write_bench_checkpoint(shared, Path(tmp) / "ckpt")
        return
    if not (folder / "config.json").is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        written = write_bench_checkpoint(shared, partial)
        written.rename(folder)
    yield folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="folder with spec/ and tokenizer/")
    args = parser.parse_args()
    write_bench_checkpoint(args.shared, args.out)


if __name__ == "__main__":
    main()
