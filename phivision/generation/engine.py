"""The batched engine: requests in, one token per request per step out.

    engine = Engine(model, processor, EngineConfig(max_num_seqs=64))
    rid = engine.add_prompt("<|user|>\\n<|image_1|>\\nDescribe.<|end|>\\n<|assistant|>\\n", [png_bytes], params)
    while engine.has_unfinished():
        for out in engine.step(): ...

The scheduler (integers) decides what runs; the runner (tensors) runs it on the paged KV pool with
CUDA graphs for decode steps; this module glues them, samples, and keeps each request's image
features until it finishes (a preempted or LongRoPE-re-prefilled request needs them again).
Batch 1 is the smallest batch of the same path.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from concurrent.futures import ThreadPoolExecutor
import math
import os
import time
import warnings
from collections.abc import Sequence as Ids
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..errors import PhiVisionError, PromptError
from ..kernels import flash4
from ..processing.image import hd_grid, image_size, num_image_tokens_for_size, staged_rgb
from ..processing.loading import load_image, load_image_or_pixels
from ..processing.prompt import Processor, tokenize_prompt
from .block_manager import BlockManager
from .generate import default_stop_token_ids
from .image_cache import ImageFeatureCache, encode_images, source_key
from .kv_cache import PagedKVCache
from .runner import DeviceTokens, ModelRunner, PrefillChunk, RunnerConfig
from .sampling import SamplingParams, make_generator, sample
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .vision_graphs import VisionTowerGraphs


# Crops one vision-tower call may take across requests (~1.5 GiB of activations in bf16 at this
# size); a single request with more still goes in one call, as it would alone.
MAX_VISION_BATCH_CROPS = 160
# Threads decoding, hashing and resizing images while requests are prepared.
MAX_PREPARE_THREADS = min(16, os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineConfig:
    """Runtime limits (the architecture lives in ModelConfig)."""

    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: the model's context, capped at 32768
    block_size: int = 64
    kv_cache_tokens: int | None = None  # KV pool size in tokens; default: gpu_memory_utilization
    gpu_memory_utilization: float = 0.85  # of the GPU's memory, weights included (CUDA only)
    # Prefill tokens per step, and per sequence per step. One user's prompt of up to 16K tokens goes
    # in one step (W3's 8,196 tokens on an H200: 127 ms in one step, 149 ms as 8,192 + 4); a server
    # that wants decodes to keep flowing between long prefills uses less (`serve` defaults to 8192).
    max_num_batched_tokens: int = 16384
    prefill_chunk_size: int = 16384
    enable_prefix_caching: bool = True
    use_cuda_graphs: bool = True
    # Capture the vision tower's graph of every crop-count bucket when the engine starts (~17 s on
    # an H200) instead of when a bucket is first needed (tens to hundreds of ms each, while other
    # requests wait): what a server wants, so that no burst pays for captures. `phivision serve` sets it.
    capture_vision_graphs_at_start: bool = False
    image_cache_entries: int = 64
    # Queue a decode step before the previous step's tokens are read, feeding them on the device
    # (see Engine._decode_ahead). None: on CUDA only, where the GPU runs ahead of the host.
    lookahead_decode: bool | None = None
    # One long prompt from its start gets cuDNN's attention, padded to a length bucket whose plan is
    # built at start (see runner.CUDNN_PREFILL_*; once per thread: 31 buckets of 512 up to 16K added
    # ~0.6 s to the first engine's start on an H200, and there are now 61 of 256). None: on CUDA in
    # half precision, with cuDNN.
    cudnn_prefill: bool | None = None
    # One long prompt from its start gets FlashAttention-4's attention (kernels/flash4.py, see
    # runner.FLASH4_PREFILL_MIN_TOKENS), compiled when the engine starts; cuDNN's then covers shorter
    # prompts only. None: when flash-attn-4 is installed and supports the GPU (Hopper, Blackwell)
    # in half precision.
    flash4_prefill: bool | None = None
    # A prefill's last decoder layer runs its attention, output product and MLP at each prompt's
    # last token only: the other rows' outputs would feed nothing (their keys and values are still
    # computed). False = every row, the reference's order of work (for measurement).
    prefill_last_rows_only: bool = True


@dataclass(frozen=True)
class PromptRequest:
    """A prompt with `<|image_N|>` tags and its images (any source load_image takes)."""

    prompt: str
    images: Ids[Any]
    params: SamplingParams
    num_crops: int | None = None  # default: the processor's
    request_id: str | None = None
    image_keys: Ids[str | None] | None = None  # cache keys per image, if the caller has them (None: computed here)


@dataclass(frozen=True)
class PreparedPrompt:
    """A request after the CPU half of preparation: decoded images, their cache keys, prompt ids."""

    request: PromptRequest
    images: list[Any]  # PIL images
    image_keys: list[str]
    prompt_ids: list[int]  # -g = image g's placeholders
    num_crops: int
    load_s: float  # decoding and hashing the images of the batch it came in
    started: float  # perf_counter() when preparation began
    # staged_rgb of each image (GPU engines, images not cached when prepared; else None entries)
    staged: list[Any] | None = None


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int | None  # None when the request ended without a new token (aborted)
    finished: bool
    finish_reason: str | None = None  # "stop", "length" or "abort"
    error: str | None = None
    cached_prompt_tokens: int | None = None  # on a request's first token: prompt tokens the prefix cache supplied


@dataclass
class RequestState:
    seq: Sequence
    params: SamplingParams
    image_features: list[torch.Tensor] | None
    generator: torch.Generator | None
    num_image_tokens: int = 0
    num_crops_run: int = 0
    cached_prompt_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache
    load_s: float = 0.0  # add_prompt's image decoding
    prepare_s: float = 0.0  # add_prompt's whole time: decoding, tokenising, preprocessing, vision tower
    arrival_s: float = field(default_factory=time.perf_counter)

    @property
    def num_prompt_tokens(self) -> int:
        return self.seq.num_prompt_tokens


def _pool_tokens(model: torch.nn.Module, config: EngineConfig, max_model_len: int) -> int:
    if config.kv_cache_tokens is not None:
        return config.kv_cache_tokens
    device = next(model.parameters()).device
    if device.type != "cuda":
        return max_model_len * min(config.max_num_seqs, 4)
    vision, prefill = _peak_activation_bytes(model, config, max_model_len)
    # With the vision tower in CUDA graphs, their pool keeps up to a full vision batch's
    # activations for good, beside the prefill's; without, the two peaks take turns.
    activations = vision + prefill if config.use_cuda_graphs else max(vision, prefill)
    free, total = torch.cuda.mem_get_info(device)
    # The largest forwards' peak (with a quarter more for the allocator's rounding and splitting),
    # plus 1 GiB for the decode graphs and the sampler, instead of a fixed guess: the activations
    # grow with max_num_batched_tokens and max_model_len, and a guess too small for them would
    # leave the largest steps to fail for memory under load.
    budget = total * config.gpu_memory_utilization - (total - free) - 1.25 * activations - 2**30
    per_token = PagedKVCache.bytes_per_block(model.config, 1, next(model.parameters()).dtype)
    return max(max_model_len, int(budget // per_token))


@torch.inference_mode()
def _peak_activation_bytes(model: torch.nn.Module, config: EngineConfig, max_model_len: int) -> tuple[int, int]:
    """Peak memory of the largest forwards the engine runs, measured before the KV pool exists:
    (a full vision batch of MAX_VISION_BATCH_CROPS crops, a full prefill step of
    max_num_batched_tokens plus what a chunk continuing a max_model_len prompt gathers on top: its
    whole context's keys and values, twice, gathered and repeated per head group)."""
    param = next(model.parameters())
    device = param.device
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    size = model.config.vision.image_size
    images = max(1, MAX_VISION_BATCH_CROPS // 5)  # 2x2 tiles + the global view per image
    pixels = torch.zeros((images, 5, 3, size, size), dtype=torch.float32, device=device)  # as preprocessing makes them
    model.encode_images(pixels.to(param.dtype), torch.tensor([[2 * size, 2 * size]] * images))
    del pixels
    torch.cuda.synchronize(device)
    vision = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.reset_peak_memory_stats(device)
    tokens = min(config.max_num_batched_tokens, max_model_len)
    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
    model(ids, positions=torch.arange(tokens, device=device)[None], logits_to_keep=1, has_images=False)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    text = model.config.text
    gathered = 2 * 2 * max_model_len * text.num_attention_heads * text.head_dim * param.element_size()
    return vision, peak + gathered


@dataclass(frozen=True)
class _Lookahead:
    """A decode step queued before its inputs were confirmed: for these sequences at these context
    lengths, fed the previous step's tokens on the device."""

    seqs: tuple[Sequence, ...]
    lens: tuple[int, ...]
    tokens: DeviceTokens

    def rows_of(self, seqs: Ids[Sequence], lens: Ids[int]) -> list[int] | None:
        """The row of each of `seqs` (at context lengths `lens`) in this step, or None if one is not in it."""
        index = {id(seq): row for row, seq in enumerate(self.seqs)}
        rows = [index.get(id(seq)) for seq in seqs]
        if any(row is None or self.lens[row] != n for row, n in zip(rows, lens)):
            return None
        return rows  # type: ignore[return-value]


def _use_flash4_prefill(model: torch.nn.Module, config: EngineConfig) -> bool:
    """An explicit setting, else: flash-attn-4 installed, supporting this GPU, dtype and head size,
    and its kernel compiled and run once (a broken install falls back to SDPA, with a warning)."""
    if config.flash4_prefill is not None:
        return config.flash4_prefill
    param = next(model.parameters())
    text = model.config.text
    if not flash4.supported(param.device, param.dtype, text.head_dim):
        return False
    try:
        flash4.warm_up(param.device, param.dtype, text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    except Exception as exc:  # noqa: BLE001 - whatever the optional package raises, SDPA still works
        warnings.warn(f"flash-attn-4 is installed but its attention kernel failed ({type(exc).__name__}: {exc}); "
                      "prompts' attention runs through PyTorch's SDPA instead", RuntimeWarning, stacklevel=3)
        return False
    return True


def _use_cudnn_prefill(model: torch.nn.Module, config: EngineConfig) -> bool:
    if config.cudnn_prefill is not None:
        return config.cudnn_prefill
    param = next(model.parameters())
    return (param.device.type == "cuda" and param.dtype in (torch.float16, torch.bfloat16)
            and torch.backends.cudnn.is_available())


class Engine:
    def __init__(self, model: torch.nn.Module, processor: Processor | None, config: EngineConfig = EngineConfig()):
        """`processor` may be None for an engine fed token ids only (add_request); the default stop
        tokens are then the config's eos id."""
        start = time.perf_counter()
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer if processor is not None else None
        self.config = config
        text = model.config.text
        max_model_len = min(config.max_model_len or min(text.max_position_embeddings, 32768), text.max_position_embeddings)
        self.max_model_len = max_model_len
        num_blocks = math.ceil(_pool_tokens(model, config, max_model_len) / config.block_size) + 1  # + reserved block 0
        self.runner = ModelRunner(model, RunnerConfig(num_blocks=num_blocks, block_size=config.block_size,
                                                      max_num_seqs=config.max_num_seqs, max_model_len=max_model_len,
                                                      use_cuda_graphs=config.use_cuda_graphs,
                                                      cudnn_prefill=_use_cudnn_prefill(model, config),
                                                      flash4_prefill=_use_flash4_prefill(model, config),
                                                      prefill_last_rows_only=config.prefill_last_rows_only,
                                                      max_prefill_tokens=min(config.prefill_chunk_size,
                                                                             config.max_num_batched_tokens)))
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(num_blocks=num_blocks, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                            max_num_batched_tokens=config.max_num_batched_tokens,
                            prefill_chunk_size=config.prefill_chunk_size, max_model_len=max_model_len,
                            original_max_position_embeddings=text.original_max_position_embeddings,
                            default_stop_token_ids=default_stop_token_ids(self.tokenizer) if self.tokenizer is not None
                            else (text.eos_token_id,)),
            self.block_manager,
        )
        self.image_cache = ImageFeatureCache(config.image_cache_entries)
        # The threads that decode a request's images side by side: kept, because starting a pool of
        # 8 for every request cost ~0.6 ms (on a 2-core machine) on the way to the first token. Its
        # threads start on first use and end when the engine is collected.
        self._prepare_pool = ThreadPoolExecutor(MAX_PREPARE_THREADS, thread_name_prefix="phivision-decode")
        # On a GPU the vision half sends each image's RGB pixels to the device (which resizes them);
        # the preparing half copies them into pinned memory beside the decoding, in parallel.
        on_cuda = next(model.parameters()).device.type == "cuda"
        self.stage_when_preparing = on_cuda
        # Vision-tower batches replay CUDA graphs (per crop-count bucket, captured when first seen
        # or all at start).
        use_graphs = config.use_cuda_graphs and on_cuda
        self.vision_graphs = VisionTowerGraphs(model.vision_tower, MAX_VISION_BATCH_CROPS) if use_graphs else None
        if self.vision_graphs is not None and config.capture_vision_graphs_at_start:
            self.vision_graphs.capture_all()
        self._requests: dict[str, RequestState] = {}
        self.lookahead_decode = on_cuda if config.lookahead_decode is None else config.lookahead_decode
        self._ahead: _Lookahead | None = None
        self.num_lookahead_steps = {"queued": 0, "used": 0}  # the difference: queued, then dropped
        self._ids = itertools.count()
        self.num_generated_tokens = 0
        # Wall time spent per phase (preparing prompts and images, prefill steps, decode steps) and
        # step counts: where a server's time goes, exported as metrics.
        self.time_s = {"prepare": 0.0, "prefill": 0.0, "decode": 0.0}
        self._last_kind: str | None = None
        self.num_steps = {"prefill": 0, "decode": 0}
        self.setup_s = time.perf_counter() - start

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: Ids[int], params: SamplingParams, *, image_features: list[torch.Tensor] | None = None,
                    image_keys: Ids[str] = (), request_id: str | None = None) -> str:
        """Queues tokenised prompt ids (-N = image N's placeholders) with their image features."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise PromptError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        seq = Sequence(seq_id=next(self._ids), request_id=request_id, token_ids=list(prompt_ids), params=params,
                       image_key=tuple(image_keys))
        device = self.runner.device
        self._requests[request_id] = RequestState(seq, params, image_features, make_generator(params.seed, device),
                                                  num_image_tokens=sum(1 for t in prompt_ids if t < 0))
        try:
            self.scheduler.add(seq)
        except PromptError:
            del self._requests[request_id]
            raise
        return request_id

    def check_request(self, prompt_ids: Ids[int], params: SamplingParams) -> None:
        """Raises PromptError if `add_request` would refuse these prompt ids for their length (nothing
        is queued). `prepare_prompts` checks with it, so a prepared request is accepted or refused
        before its vision tower runs or its turn to be queued comes."""
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise PromptError(
                f"the prompt ({len(prompt_ids)} tokens, images included) plus max_new_tokens "
                f"({params.max_new_tokens}) is over the engine's limit of {self.max_model_len} tokens"
            )
        reason = self.scheduler.refusal(len(prompt_ids))
        if reason is not None:
            raise PromptError(reason)

    def add_prompt(self, prompt: str, images: Ids[Any], params: SamplingParams, *, num_crops: int | None = None,
                   use_image_cache: bool = True, request_id: str | None = None) -> str:
        """Tokenises `prompt`, preprocesses its images and runs the vision tower (for images not cached)."""
        (result,) = self.add_prompts([PromptRequest(prompt, images, params, num_crops, request_id)],
                                     use_image_cache=use_image_cache)
        if isinstance(result, Exception):
            raise result
        return result

    def add_prompts(self, requests: Ids[PromptRequest], *, use_image_cache: bool = True) -> list[str | Exception]:
        """Adds several prompts at once: their new images go through the vision tower in one batch
        per crop count (a server receiving many requests together fills the GPU better that way).

        Returns, per request, its id or the exception that refused it (others are unaffected).
        """
        started = time.perf_counter()
        prepared = self.prepare_prompts(requests)
        self.time_s["prepare"] += time.perf_counter() - started
        return self.add_prepared(prepared, use_image_cache=use_image_cache)

    def prepare_prompts(self, requests: Ids[PromptRequest]) -> list[PreparedPrompt | Exception]:
        """The CPU half of adding prompts: decodes and hashes every image (all requests' images side
        by side: PIL and hashlib release the GIL), copies the RGB pixels of those not cached into
        pinned memory (GPU engines, which resize on the device), tokenises, checks lengths.

        Changes no engine state (it only asks the feature cache which keys it holds, a hint), so a
        server may run it on another thread while the engine steps; `add_prepared` then runs the
        vision tower and queues the requests.
        """
        started = time.perf_counter()
        results: list[PreparedPrompt | Exception | None] = [None] * len(requests)
        crops_of = [request.num_crops if request.num_crops is not None else self.processor.num_crops for request in requests]
        jobs = [(index, position, image) for index, request in enumerate(requests)
                for position, image in enumerate(request.images)]
        stage = self.stage_when_preparing

        def load(job: tuple[int, int, Any]) -> tuple[Any, str, Any] | Exception:
            index, position, source = job
            try:
                # A PIL image, or the fast decoder's RGB array (staged as it is). Several images
                # decode on threads, through a binding that releases the GIL (png.py): on an H200's
                # host, W2's eight frames took 3.7 ms through pywuffs, 6.4 through imagecodecs, 17.3
                # through Pillow, 32.0 through pyspng.
                image = load_image_or_pixels(source, allow_urls=self.processor.allow_urls, side_by_side=len(jobs) > 1)
            except PhiVisionError as exc:
                return exc
            keys = requests[index].image_keys
            crops = crops_of[index]
            key = keys[position] if keys is not None and keys[position] is not None else source_key(source, image, crops)
            staged = None
            if stage and key not in self.image_cache:
                # A failure here is reported by the vision half, which then stages the image itself.
                with contextlib.suppress(Exception):
                    staged = staged_rgb(image, pin_memory=True)
            return image, key, staged

        # One lazily opened PIL image given to several requests must not be decoded by two threads
        # at once: such images are loaded here first (later loads find them decoded).
        pil = [source for _, _, source in jobs if isinstance(source, Image.Image)]
        uses = collections.Counter(id(source) for source in pil)
        for source in {id(source): source for source in pil if uses[id(source)] > 1}.values():
            with contextlib.suppress(PhiVisionError):  # reported per request by the load below
                load_image(source)
        if len(jobs) > 1:
            loaded_all = list(self._prepare_pool.map(load, jobs))
        else:
            loaded_all = [load(job) for job in jobs]
        loaded_s = time.perf_counter() - started
        per_request: list[list] = [[] for _ in requests]
        for (index, _, _), item in zip(jobs, loaded_all):
            per_request[index].append(item)
        for index, request in enumerate(requests):
            try:
                failed = next((item for item in per_request[index] if isinstance(item, Exception)), None)
                if failed is not None:
                    raise failed
                images = [image for image, _, _ in per_request[index]]
                crops = crops_of[index]
                num_tokens = [num_image_tokens_for_size(*image_size(image), crops) for image in images]
                ids = tokenize_prompt(self.tokenizer, request.prompt, num_tokens)
                self.check_request(ids, request.params)
                results[index] = PreparedPrompt(request, images, [key for _, key, _ in per_request[index]], ids, crops,
                                                loaded_s, started, [pixels for _, _, pixels in per_request[index]])
            except PhiVisionError as exc:
                results[index] = exc
        return results  # type: ignore[return-value]

    def add_prepared(self, prepared: Ids[PreparedPrompt | Exception], *, use_image_cache: bool = True) -> list[str | Exception]:
        """The GPU half: runs the vision tower on the images not cached (batched per crop count, at
        most MAX_VISION_BATCH_CROPS crops a call) and queues the requests; exceptions pass through.

        Returns, per entry, the request id or the exception that refused it: a vision batch that
        fails (out of memory, say) refuses its own requests with a RuntimeError, and the requests
        of other batches are queued all the same.
        """
        started = time.perf_counter()
        results: list[str | Exception | None] = [item if isinstance(item, Exception) else None for item in prepared]
        by_crops: dict[int, list[tuple[int, PreparedPrompt]]] = {}
        for index, item in enumerate(prepared):
            if not isinstance(item, Exception):
                by_crops.setdefault(item.num_crops, []).append((index, item))
        cache = self.image_cache if use_image_cache else None
        batches = []
        for crops, group in by_crops.items():
            batch, batch_crops = [], 0
            for index, item in group:
                n = sum(rows * cols + 1 for rows, cols in (hd_grid(*image_size(im), crops) for im in item.images))
                if batch and batch_crops + n > MAX_VISION_BATCH_CROPS:
                    batches.append((crops, batch))
                    batch, batch_crops = [], 0
                batch.append((index, item))
                batch_crops += n
            batches.append((crops, batch))
        for crops, group in batches:
            images = [image for _, item in group for image in item.images]
            given = [key for _, item in group for key in item.image_keys]
            staged = [pixels for _, item in group for pixels in (item.staged or [None] * len(item.images))]
            try:
                features, keys, crops_run = encode_images(self.model, images, crops, cache, given, tower=self.vision_graphs,
                                                         staged=staged)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: refuse this batch, keep the others
                for index, _ in group:
                    results[index] = RuntimeError(f"could not run the vision tower: {exc}")
                continue
            offset = 0
            for index, item in group:
                mine = slice(offset, offset + len(item.images))
                offset += len(item.images)
                try:
                    request_id = self.add_request(item.prompt_ids, item.request.params, image_features=features[mine] or None,
                                                  image_keys=keys[mine], request_id=item.request.request_id)
                except PhiVisionError as exc:
                    results[index] = exc
                    continue
                state = self._requests[request_id]
                state.num_crops_run = crops_run if len(group) == 1 else 0  # per batch, not per request
                state.prepare_s = time.perf_counter() - item.started
                state.load_s = item.load_s
                results[index] = request_id
        # The engine thread's time: a server preparing requests on another thread counts only this half.
        self.time_s["prepare"] += time.perf_counter() - started
        return results  # type: ignore[return-value]

    def request_info(self, request_id: str) -> RequestState:
        return self._requests[request_id]

    def request_info_or_none(self, request_id: str) -> RequestState | None:
        """The request's state while it is unfinished, else None."""
        return self._requests.get(request_id)

    def abort(self, request_id: str) -> bool:
        """Stops a request at once and frees its KV blocks; False if it was not running."""
        found = self.scheduler.abort(request_id)
        self._requests.pop(request_id, None)
        return found

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ stepping

    @staticmethod
    def _batch_pick(states: list[RequestState]):
        """How to pick every row's token of a decode batch on the device in one go: None for the
        argmax (all greedy), a function of the logits (B, V) when all rows sample with the same
        parameters and no request has its own seeded generator, else False (row by row)."""
        if all(s.params.greedy for s in states):
            return None
        first = states[0].params
        same = all(s.generator is None and (s.params.temperature, s.params.top_k, s.params.top_p)
                   == (first.temperature, first.top_k, first.top_p) for s in states)
        return (lambda logits: sample(logits, first)) if same else False

    def _sample(self, logits: torch.Tensor, states: list[RequestState]) -> list[int]:
        """One token per row of logits (B, V), each with its request's parameters."""
        pick = self._batch_pick(states)
        if pick is None:
            return logits.argmax(dim=-1).tolist()
        if pick is not False:
            # One set of sampling kernels for the batch, not one per row: a server's requests mostly
            # share the default parameters, and 64 rows sampled one by one cost milliseconds of launches.
            return pick(logits).tolist()
        tokens = []
        for row, state in enumerate(states):
            tokens.append(int(sample(logits[row : row + 1], state.params, state.generator)[0]))
        return tokens

    def step(self) -> list[StepOutput]:
        """Runs one scheduled step; returns the new token of every request that got one."""
        started = time.perf_counter()
        outputs = self._step()
        if self._last_kind is not None:
            self.time_s[self._last_kind] += time.perf_counter() - started
            self.num_steps[self._last_kind] += 1
        return outputs

    def _decode_ahead(self, seqs: list[Sequence], ahead: "_Lookahead | None", pick) -> list[int]:
        """A decode step whose tokens are picked on the device (`pick`, see `_batch_pick`: greedy, or
        sampled alike without seeds), leaving the GPU the next step queued while the host reads them.

        Between two decode steps the GPU would idle while the host reads the tokens, updates the
        sequences and prepares the next step (0.1-0.4 ms on an H200's host, against 2.7-8 ms steps).
        So, when the scheduler is sure the next step decodes the same sequences (see
        `Scheduler.next_decode_if_no_stop`), that step is queued now, fed this step's argmax on the
        device, and the host reads this step's tokens while it runs. The next `step` uses it if the
        batch it schedules is the one predicted, or part of it (sequences that stopped or were
        aborted are left out: each row of a step depends on its own sequence only). Otherwise (a
        new request, say) it is dropped: it wrote only KV slots that the step run instead writes
        again, or slots of blocks freed before any later work in the stream, so nothing of it
        remains. Greedy tokens are the same either way; sampled ones are draws from the same
        distributions (seeded requests, whose draws must repeat, never run ahead).
        """
        lens = [s.num_tokens for s in seqs]
        rows = ahead.rows_of(seqs, lens) if ahead is not None else None
        if rows is not None:
            # All of this batch was queued ahead; rows of sequences that ended since are left out.
            full = rows == list(range(len(ahead.seqs)))
            tokens = ahead.tokens if full else self.runner.select_tokens(ahead.tokens, rows)
            self.num_lookahead_steps["used"] += 1
        else:
            tokens = self.runner.decode_queued([s.last_token for s in seqs], lens, [s.block_table for s in seqs], pick)
        next_lens = self.scheduler.next_decode_if_no_stop(seqs)
        if next_lens is not None:
            self._ahead = _Lookahead(tuple(seqs), tuple(next_lens),
                                     self.runner.decode_queued(tokens, next_lens, [s.block_table for s in seqs], pick))
            self.num_lookahead_steps["queued"] += 1
        return tokens.tolist()

    def _step(self) -> list[StepOutput]:
        self._last_kind = None
        ahead, self._ahead = self._ahead, None  # a step queued ahead is good for this step only
        batch = self.scheduler.schedule()
        outputs = [StepOutput(s.request_id, None, True, "abort", s.error) for s in batch.aborted]
        for seq in batch.aborted:
            self._requests.pop(seq.request_id, None)
        if batch.is_empty:
            return outputs
        states = [self._requests[seq.request_id] for seq in batch.seqs]
        self._last_kind = batch.kind
        if batch.kind == "prefill":
            tokens = [None] * len(batch.seqs)
            rows_by_rope: dict[bool, list[int]] = {}
            for row, (seq, state, (start, _)) in enumerate(zip(batch.seqs, states, batch.chunks)):
                if state.cached_prompt_tokens is None:
                    state.cached_prompt_tokens = start  # the first chunk starts after the reused blocks
                rows_by_rope.setdefault(bool(seq.long_rope), []).append(row)
            logits_of: dict[int, torch.Tensor] = {}
            for long_rope, rows in rows_by_rope.items():
                chunks = [PrefillChunk(batch.seqs[r].token_ids[batch.chunks[r][0] : batch.chunks[r][1]], batch.chunks[r][0],
                                       batch.seqs[r].block_table, states[r].image_features) for r in rows]
                logits = self.runner.prefill_many(chunks, long_rope)  # (len(rows), V)
                logits_of.update({r: logits[i] for i, r in enumerate(rows)})
            sampled = [r for r, last in enumerate(batch.is_last_chunk) if last]
            if sampled:
                new = iter(self._sample(torch.stack([logits_of[r] for r in sampled]), [states[r] for r in sampled]))
                tokens = [next(new) if last else None for last in batch.is_last_chunk]
        elif self.lookahead_decode and (pick := self._batch_pick(states)) is not False:
            tokens = self._decode_ahead(batch.seqs, ahead, pick)
        else:
            logits = self.runner.decode([s.last_token for s in batch.seqs], [s.num_tokens for s in batch.seqs],
                                        [s.block_table for s in batch.seqs])
            tokens = self._sample(logits, states)
        finished = {id(s) for s in self.scheduler.postprocess(batch.seqs, tokens)}
        for seq, token in zip(batch.seqs, tokens):
            if token is None or self._requests.get(seq.request_id) is None:
                continue  # a prefill chunk that is not the last, or a request aborted since scheduling
            self.num_generated_tokens += 1
            done = id(seq) in finished
            first = seq.num_generated == 1
            outputs.append(StepOutput(seq.request_id, token, done, seq.finish_reason if done else None,
                                      cached_prompt_tokens=(self._requests[seq.request_id].cached_prompt_tokens or 0)
                                      if first else None))
            if done:
                self._requests.pop(seq.request_id, None)
        return outputs

    def generate(self, prompts: Ids[tuple[str, Ids[Any]]], params: SamplingParams, *, num_crops: int | None = None) -> list[list[int]]:
        """Convenience: runs (prompt, images) pairs to completion; the new token ids of each."""
        ids = [self.add_prompt(prompt, images, params, num_crops=num_crops) for prompt, images in prompts]
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.token_id is not None and out.request_id in tokens:
                    tokens[out.request_id].append(out.token_id)
        return [tokens[rid] for rid in ids]

    def stats(self) -> dict[str, Any]:
        return {
            "waiting": self.scheduler.num_waiting,
            "running": self.scheduler.num_running,
            "kv_blocks_total": self.block_manager.num_usable_blocks,
            "kv_blocks_free": self.block_manager.num_free_blocks,
            "kv_usage": self.block_manager.usage,
            "generated_tokens": self.num_generated_tokens,
            "time_s": dict(self.time_s),
            "steps": dict(self.num_steps),
            "lookahead_steps": dict(self.num_lookahead_steps),
        }
