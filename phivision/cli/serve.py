"""`phivision serve`: the OpenAI-compatible HTTP server with a chat page (needs `pip install phivision[server]`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import UsageError, check_device, model_name, notice, positive_int, probability

API_KEY_ENV = "PHIVISION_API_KEY"
GPU_MAX_NUM_SEQS = 64
CPU_MAX_NUM_SEQS = 8


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        parents=parents,
        help="serve the model over HTTP (OpenAI chat completions API, chat page at /)",
        description="Serve the model over HTTP: POST /v1/chat/completions (OpenAI's API, streamed or not), "
        "GET /v1/models, /health, /metrics (Prometheus), and a chat page at /.",
    )
    p.add_argument("--model", default=None,
                   help="checkpoint folder or Hugging Face Hub id (default: $PHIVISION_MODEL, else microsoft/Phi-3.5-vision-instruct)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="compute dtype (default: bf16 on GPUs, fp32 on CPU)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=positive_int, default=None,
                        help=f"requests decoded together (default: {GPU_MAX_NUM_SEQS} on a GPU, {CPU_MAX_NUM_SEQS} on the CPU)")
    engine.add_argument("--max-model-len", type=positive_int, default=None, help="longest prompt + answer in tokens (default: the model's, at most 32768)")
    engine.add_argument("--kv-cache-tokens", type=positive_int, default=None, help="KV cache size in tokens (default: from --gpu-memory-utilization on a GPU)")
    engine.add_argument("--gpu-memory-utilization", type=probability, default=0.85, help="fraction of GPU memory to use, weights included (default: %(default)s)")
    engine.add_argument("--max-num-batched-tokens", type=positive_int, default=8192,
                        help="prompt tokens prefilled per step: more is faster in aggregate, fewer keeps answers flowing (default: %(default)s)")
    engine.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (debugging)")
    engine.add_argument("--lookahead-decode", choices=("auto", "on", "off"), default="auto",
                        help="queue each decode step before the previous step's tokens are read (auto: on GPUs)")
    limits = p.add_argument_group("limits and image sources")
    limits.add_argument("--allow-urls", action="store_true", help="let requests name http(s) image URLs (the server fetches them)")
    limits.add_argument("--image-dir", type=Path, default=None, help="let requests name local image files, only under this folder")
    limits.add_argument("--max-images", type=positive_int, default=32, help="images per request (default: %(default)s)")
    limits.add_argument("--max-image-mb", type=float, default=20.0, help="encoded size of one image in MiB (default: %(default)s)")
    limits.add_argument("--max-body-mb", type=float, default=100.0, help="request body size in MiB (default: %(default)s)")
    limits.add_argument("--max-queued", type=int, default=256, help="requests waiting beyond the running ones; more get 503 (default: %(default)s)")
    limits.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to let running requests finish on shutdown (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; warnings only in the access log")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError("the server needs its extra: pip install 'phivision[server]'") from None
    check_device(args.device)
    if args.image_dir is not None and not args.image_dir.is_dir():
        raise UsageError(f"--image-dir {args.image_dir}: not a folder")
    if args.max_queued < 0:
        raise UsageError("--max-queued must be >= 0")

    from .. import api
    from ..generation.engine import EngineConfig
    from ..processing.prompt import Processor
    from ..server.app import ServerSettings, create_app
    from ..server.async_engine import AsyncEngine, EngineSpec
    from ..server.media import ImagePolicy

    model = model_name(args)
    device = args.device or api.default_device()
    dtype = args.dtype or {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(api.default_dtype(device)), "fp32")
    on_gpu = device.startswith("cuda")
    # The server process keeps the checkpoint's tokenizer and template (checks, token counts, text);
    # the engine process loads the weights.
    processor = Processor.from_pretrained(model, allow_urls=args.allow_urls)
    max_len = args.max_model_len
    kv_tokens = args.kv_cache_tokens
    if not on_gpu:
        from ..config import ModelConfig
        from ..hub import resolve_checkpoint

        folder = resolve_checkpoint(model, allow_patterns=["config.json"], required=["config.json"])
        context = ModelConfig.from_file(folder).text.max_position_embeddings
        max_len = max_len or min(context, api.CPU_MAX_MODEL_LEN)
        kv_tokens = kv_tokens or max_len * 2  # CPU memory is shared with everything else: room for two long requests
    max_num_seqs = args.max_num_seqs or (GPU_MAX_NUM_SEQS if on_gpu else CPU_MAX_NUM_SEQS)
    spec = EngineSpec(model=model, device=device, dtype=dtype, allow_urls=args.allow_urls, progress=not args.quiet,
                      engine_config=EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_len, kv_cache_tokens=kv_tokens,
                                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                                 prefill_chunk_size=args.max_num_batched_tokens,
                                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                                 use_cuda_graphs=not args.no_cuda_graphs,
                                                 lookahead_decode={"auto": None, "on": True, "off": False}[args.lookahead_decode],
                                                 capture_vision_graphs_at_start=True))
    notice(args, f"loading {model} on {device} ({dtype}) in the engine process")
    engine = AsyncEngine(spec)
    info = engine.start()
    stats = engine.stats
    settings = ServerSettings(
        model_name=args.served_model_name or model,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_images=args.max_images,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_queued=args.max_queued,
        image_policy=ImagePolicy(allow_urls=args.allow_urls, image_dir=args.image_dir,
                                 max_image_bytes=int(args.max_image_mb * 2**20)),
        graceful_shutdown_s=args.drain_timeout,
    )
    app = create_app(engine, processor, settings)
    notice(args, f"engine ready: {stats['kv_blocks_total'] * info['block_size']:,} KV tokens, "
                 f"{max_num_seqs} requests at once, context {info['max_model_len']:,}"
                 + (f", {stats['gpu_memory_allocated'] / 2**30:.1f} GiB on the GPU" if "gpu_memory_allocated" in stats else ""))
    notice(args, f"serving {settings.model_name!r} on http://{args.host}:{args.port}  (chat page at /, API at /v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                timeout_graceful_shutdown=int(args.drain_timeout))
    return 0
