"""The public API for applications: prompt in, video frames out, chunk by chunk.

Owns: `Pipeline` (config + DiT backend + text encoder + VAE + decoder), `Stream` (one
generation: an iterator of uint8 frames with its own cache, noise and timings) and model-folder
loading. Does not own: the loop (`generator.py`), backends (`backends/`), decoders
(`decoders/`), the VAE or text encoders.

Pipelining (`pipelined=True`, the default): a worker thread runs the DiT one chunk ahead, so
chunk n+1 is denoised while chunk n is decoded; chunks still come out in order. On CPU the two
threads split torch's intra-op threads (`threads=(dit, decode)`, default half each, the decoder
taking the odd one) so they do not oversubscribe the cores; ONNX Runtime keeps its own pool.
The frames are those of the sequential path run with the same per-stage threads
(`pipelined=False, threads=(dit, decode)`): the same ops on the same inputs. (fp32 kernels may
round differently at another thread count, so sequential at all threads can differ by a uint8
step.) On CUDA the worker runs on its own stream and hands each chunk over with an event
(written, NOT RUN: no GPU here).

Model folder layout (`Pipeline.from_pretrained(DIR)`):
    config.json        {"model": {ModelConfig fields}, "text_encoder": "default" | "text_encoder",
                        "fps": 16}
    dit.safetensors    (or any file `load_checkpoint` reads; "checkpoint" in config.json names it)
    vae/               a diffusers AutoencoderKLWan folder
    text_encoder/      a umT5 folder (transformers), unless "text_encoder" is "default"
    tiny_decoder/      optional: a tiny decoder (`python -m training.tiny_decoder`), for decoder="tiny"
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import ModelConfig
from .generator import check_seed, generate, num_chunks_for
from .schedule import Schedule

DEFAULT_FPS = 16
KEEP_CHUNK_TIMINGS = 64     # per-chunk timings a Stream keeps (totals cover every chunk)
PROMPT_CACHE_SIZE = 128     # prompt embeddings a Pipeline keeps, least recently used evicted first


class NonFiniteError(RuntimeError):
    """The model produced NaN or Inf: a damaged checkpoint or engine, or a numerical blow-up."""


@dataclass
class ChunkTiming:
    index: int
    frames: int
    dit_s: float
    vae_s: float
    ready_s: float     # since the stream started (text encoding included)


@dataclass
class StreamStats:
    """Running totals over every chunk plus the timings of the last `keep` chunks (`chunks`), so a
    stream of any length holds a fixed amount of memory."""
    text_s: float = 0.0
    keep: int = KEEP_CHUNK_TIMINGS
    chunks: deque = field(default_factory=deque)   # ChunkTiming, the most recent `keep`
    num_chunks: int = 0
    frames: int = 0
    dit_s: float = 0.0
    vae_s: float = 0.0
    first_frame_s: float = math.nan

    def __post_init__(self):
        self.chunks = deque(self.chunks, maxlen=self.keep)

    def add(self, timing: ChunkTiming) -> None:
        if not self.num_chunks:
            self.first_frame_s = timing.ready_s
        self.num_chunks += 1
        self.frames += timing.frames
        self.dit_s += timing.dit_s
        self.vae_s += timing.vae_s
        self.chunks.append(timing)

    def summary(self, fps_video: int) -> dict:
        dit, vae, n = self.dit_s, self.vae_s, self.frames
        # end to end: wall time from the prompt's encoding to the last frame, minus the text (paid
        # once per prompt); with pipelining it is less than dit + vae
        wall = self.chunks[-1].ready_s - self.text_s if self.chunks else float("nan")
        return {"frames": n, "video_seconds": n / fps_video, "text_s": self.text_s, "dit_s": dit, "vae_s": vae,
                "fps_dit_only": n / dit if dit else float("nan"),
                "fps_with_vae": n / (dit + vae) if dit + vae else float("nan"),
                "fps_end_to_end": n / wall if wall else float("nan"),
                "first_frame_s": self.first_frame_s}


def _check_frames_arg(frames) -> None:
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 1):
        raise ValueError(f"frames must be a positive integer (1 + 4k pixel frames) or None for the default "
                         f"length; got {frames!r}")


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op threads of the calling thread set to `n` inside the block (per thread:
    OpenMP's thread count is a per-thread setting), then restored."""
    if not n:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def split_threads(total: int) -> tuple[int, int]:
    """(DiT, decoder) intra-op threads for two pipelined stages on `total` threads."""
    dit = max(1, total // 2)
    return dit, max(1, total - dit)


class _Ahead:
    """The chunk generator run on a worker thread, one chunk ahead of the consumer: `get()` hands
    over chunk n and at once asks the worker for chunk n+1. Exceptions surface in `get()`."""

    def __init__(self, chunks, num_chunks: int, device: torch.device, threads: int | None):
        self._req: queue.Queue = queue.Queue()
        self._res: queue.Queue = queue.Queue()
        self._left = num_chunks
        self._cuda = device.type == "cuda"
        self._thread = threading.Thread(target=self._work, args=(chunks, device, threads), daemon=True,
                                        name="asd-dit")
        self._thread.start()
        self._ask()

    def _ask(self):
        if self._left > 0:
            self._left -= 1
            self._req.put(True)

    def _work(self, chunks, device, threads):
        side = torch.cuda.Stream(device) if self._cuda else None  # ran on an H200 (tests/test_gpu.py)
        try:
            with _torch_threads(threads), (torch.cuda.stream(side) if side is not None else contextlib.nullcontext()):
                while self._req.get():
                    t0 = time.perf_counter()
                    lat = next(chunks)
                    event = None
                    if side is not None:
                        event = torch.cuda.Event()
                        event.record(side)
                    self._res.put((lat, time.perf_counter() - t0, event))
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._res.put(e)

    def get(self):
        item = self._res.get()
        if isinstance(item, BaseException):
            raise item
        lat, dit_s, event = item
        if event is not None:  # the consumer's stream waits for the worker's chunk (no host sync)
            torch.cuda.current_stream().wait_event(event)
            lat.record_stream(torch.cuda.current_stream())
        self._ask()
        return lat, dit_s

    def close(self):
        self._req.put(False)
        self._thread.join(timeout=60)


class Stream:
    """One generation. Iterate for uint8 frames [T, H, W, 3] per chunk; `stats` fills as it goes.
    Owns its cache, noise generator and decode state, so streams can run in parallel threads.
    Memory stays flat over any length: `latents` collects each chunk's latents only when
    `keep_latents` (default: with `latents_only`); `last_latents` is always the latest chunk's."""

    def __init__(self, pipe: "Pipeline", prompt: str, steps: int, ffe: bool, seed: int, frames: int | None,
                 latents_only: bool = False, init: torch.Tensor | None = None, ffe_steps: int = 4,
                 keep_latents: bool | None = None):
        cfg = pipe.config
        _check_frames_arg(frames)
        check_seed(seed)
        self.pipe, self.schedule = pipe, Schedule(steps=steps, ffe=ffe, ffe_steps=ffe_steps)
        self.frames = cfg.pixel_frames_for(cfg.cache_chunks * cfg.frames_per_chunk) if frames is None else int(frames)
        self.num_chunks = num_chunks_for(cfg, self.frames)
        self.prompt, self.seed, self.latents_only = prompt, seed, latents_only
        self.init = init  # clean latents [1, C, F, h, w] the video continues from (continuation.py)
        self.keep_latents = latents_only if keep_latents is None else keep_latents
        self.stats = StreamStats()
        self.latents: list[torch.Tensor] = []
        self.last_latents: torch.Tensor | None = None
        self._it = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def _run(self) -> Iterator[np.ndarray]:
        t0 = time.perf_counter()
        context = self.pipe.encode_prompt(self.prompt)
        self.stats.text_s = time.perf_counter() - t0
        from .vae import to_uint8_frames

        pipe = self.pipe
        decoder = None if self.latents_only else pipe.decoder.stream(batch_size=1)
        chunks = generate(pipe.step, context, num_chunks=self.num_chunks, schedule=self.schedule, seed=self.seed,
                          prefill=self.init)
        ahead, (dit_threads, dec_threads) = None, pipe.threads or (None, None)
        if pipe.pipelined and decoder is not None and self.num_chunks > 1:
            dit_threads, dec_threads = pipe.threads or split_threads(torch.get_num_threads())
            ahead = _Ahead(chunks, self.num_chunks, torch.device(pipe.step.device), dit_threads)
        try:
            for i in range(self.num_chunks):
                ta = time.perf_counter()
                if ahead is not None:
                    lat, dit_s = ahead.get()
                else:
                    with _torch_threads(dit_threads):
                        lat = next(chunks)
                    if lat.is_cuda:  # the DiT's kernels are queued, not done: time them, not their launch
                        torch.cuda.synchronize(lat.device)
                    dit_s = time.perf_counter() - ta
                tb = time.perf_counter()
                finite = torch.isfinite(lat).all()  # stays on the device; read after decode has synced anyway
                if decoder is None:
                    frames = np.zeros((0,), np.uint8)
                    n = pipe.config.frames_per_chunk
                else:
                    with _torch_threads(dec_threads):
                        frames = to_uint8_frames(decoder.decode_chunk(lat.float().to(decoder.net.device)))
                    n = frames.shape[0]
                if not bool(finite):
                    raise NonFiniteError(f"chunk {i} of {self.num_chunks}: the DiT ({pipe.info.get('backend')}) "
                                         f"produced NaN or Inf latents; its weights or engine are damaged (rebuild "
                                         f"the engine, or check the checkpoint)")
                self.last_latents = lat
                if self.keep_latents:
                    self.latents.append(lat)
                tc = time.perf_counter()
                self.stats.add(ChunkTiming(i, n, dit_s, tc - tb, tc - t0))
                yield frames
        finally:
            if ahead is not None:
                ahead.close()


class Pipeline:
    """config + DiT backend + text encoder + VAE + decoder. Thread-safe for concurrent `stream`s."""

    def __init__(self, config: ModelConfig, step, text_encoder, vae, fps: int = DEFAULT_FPS, info: dict | None = None,
                 prompt_cache_size: int = PROMPT_CACHE_SIZE, decoder=None, pipelined: bool = True,
                 threads: tuple[int, int] | None = None):
        self.config, self.step, self.text_encoder, self.vae, self.fps = config, step, text_encoder, vae, fps
        self.info = info or {}
        if decoder is None:
            from .decoders import make_decoder
            decoder = make_decoder("vae", vae)
        self.decoder = decoder  # a DecodeNet (asd_deploy/decoders): vae, tiny or an engine's
        self.pipelined, self.threads = pipelined, threads
        self._prompt_lock = threading.Lock()
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # LRU, at most prompt_cache_size
        self.prompt_cache_size = prompt_cache_size

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str = "default", backend: str = "eager", engine: str | None = None,
                        checkpoint: str | None = None, vae: str | None = None, text_encoder: str | None = None,
                        device: str = "cpu", batch: int = 1, decoder: str = "vae", tiny_decoder: str | None = None,
                        pipelined: bool = True) -> "Pipeline":
        """`path`: "default" (the embedded model) or a model folder (layout in the module doc).
        `backend`: eager | compile | ort | aoti | trt | auto; engines come from `engine` (a folder
        built by `python -m export.build`) or are looked up in the user's engine cache by their
        manifest. `batch`: the engine's static batch (the server's --max-streams; streams use
        batch 1). `decoder`: "vae" or "tiny" (the model's `tiny_decoder/`, or `tiny_decoder`);
        with an engine backend, the engine's exported decoder runs it when built from the same
        weights."""
        from .registry import ASSETS, default_is_trained, load_dit

        opts = dict(decoder=decoder, tiny=tiny_decoder or ASSETS / "tiny_decoder", pipelined=pipelined)
        if path == "default":
            loaded = load_dit(checkpoint or "default", device=device)
            trained_assets = default_is_trained()
            return cls._assemble(loaded, vae or (ASSETS / "vae" if trained_assets else None),
                                 text_encoder or "default", backend, engine, "default", DEFAULT_FPS, batch, **opts)
        root = Path(path)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"model folder {root} not found or has no config.json; expected 'default' or a "
                                    f"folder with config.json, dit.safetensors, vae/ (and text_encoder/)")
        meta = json.loads((root / "config.json").read_text())
        cfg = ModelConfig.from_dict(meta["model"])
        loaded = load_dit(checkpoint or str(root / meta.get("checkpoint", "dit.safetensors")), cfg, device=device)
        te = text_encoder or meta.get("text_encoder", "text_encoder")
        te = te if te == "default" or Path(te).is_absolute() else str(root / te)
        opts["tiny"] = tiny_decoder or root / "tiny_decoder"
        return cls._assemble(loaded, vae or root / "vae", te, backend, engine, str(root),
                             int(meta.get("fps", DEFAULT_FPS)), batch, **opts)

    @classmethod
    def from_checkpoint(cls, checkpoint: str, config: str | ModelConfig | None = None, backend: str = "eager",
                        engine: str | None = None, vae: str | None = None, text_encoder: str | None = None,
                        device: str = "cpu", batch: int = 1, decoder: str = "vae", tiny_decoder: str | None = None,
                        pipelined: bool = True) -> "Pipeline":
        """A bare DiT checkpoint (or "random") at `config`. Without `vae`, a tiny random-weight VAE
        with Wan's strides decodes (for plumbing and speed checks); without `text_encoder`, the
        default sentence encoder serves configs with text_dim 384, and others need a umT5 folder."""
        from .registry import load_dit

        loaded = load_dit(checkpoint, config, device=device)
        if text_encoder is None and loaded.config.text_dim != 384:
            raise ValueError(f"config {loaded.config.name!r} takes text_dim={loaded.config.text_dim} embeddings; "
                             f"give --text-encoder PATH (a local umT5 folder)")
        return cls._assemble(loaded, vae, text_encoder or "default", backend, engine, str(checkpoint), DEFAULT_FPS,
                             batch, decoder=decoder, tiny=tiny_decoder, pipelined=pipelined)

    @classmethod
    def _assemble(cls, loaded, vae, text_encoder, backend, engine, model_name, fps, batch=1, decoder="vae",
                  tiny=None, pipelined=True) -> "Pipeline":
        from .decoders import pipeline_decoder
        from .text import load_text_encoder
        from .vae import VideoVAE

        cfg = loaded.config
        vae_obj = VideoVAE.from_pretrained(vae) if vae else VideoVAE.tiny(seed=0, z_dim=cfg.in_channels)
        if vae_obj.z_dim != cfg.in_channels:
            raise ValueError(f"VAE has z_dim={vae_obj.z_dim} but the DiT takes in_channels={cfg.in_channels}")
        text = load_text_encoder(text_encoder, cfg.text_len)
        if text.text_dim != cfg.text_dim:
            raise ValueError(f"text encoder gives {text.text_dim}-dim embeddings; the DiT expects text_dim="
                             f"{cfg.text_dim}")
        step = make_step(backend, loaded, engine, **({"batch": batch} if batch != 1 else {}))
        dec, note = pipeline_decoder(decoder, vae_obj, tiny, step)
        info = {"model": model_name, "trained": loaded.trained, "weights_hash": loaded.weights_hash,
                "backend": getattr(step, "name", backend), "vae": str(vae) if vae else "tiny random",
                "decoder": dec.name, "decoder_note": note}
        return cls(cfg, step, text, vae_obj, fps, info, decoder=dec, pipelined=pipelined)

    # ---- use --------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, text_len, text_dim]; the last `prompt_cache_size` prompts are kept (LRU)."""
        with self._prompt_lock:
            if prompt in self._prompt_cache:
                self._prompt_cache.move_to_end(prompt)
                return self._prompt_cache[prompt]
            emb = self.text_encoder.encode(prompt)
            self._prompt_cache[prompt] = emb
            while len(self._prompt_cache) > max(0, self.prompt_cache_size):
                self._prompt_cache.popitem(last=False)
            return emb

    def stream(self, prompt: str, steps: int = 1, ffe: bool = True, seed: int = 0, frames: int | None = None,
               latents_only: bool = False, init=None, ffe_steps: int = 4,
               keep_latents: bool | None = None) -> Stream:
        """One generation, chunk by chunk (see `Stream`). `ffe_steps`: steps on chunk 0 with `ffe`.
        `init`: continue from a video or image (a path, uint8 frames [T, H, W, 3], or clean
        latents [1, C, F, h, w]; see continuation.py); the stream yields only the new frames."""
        if init is not None and not isinstance(init, torch.Tensor):
            init = self.init_latents(init)
        return Stream(self, prompt, steps, ffe, seed, frames, latents_only, init, ffe_steps, keep_latents)

    def init_latents(self, init) -> torch.Tensor:
        """A path or uint8 frames [T, H, W, 3] -> clean latents [1, C, F, h, w] to prefill the cache."""
        from .continuation import init_latents, read_init

        frames = read_init(init) if isinstance(init, (str, Path)) else init
        return init_latents(self.vae, frames, self.config)

    def __call__(self, prompt: str, steps: int = 1, ffe: bool = True, seed: int = 0, frames: int | None = None,
                 ffe_steps: int = 4):
        """The whole video: uint8 [T, H, W, 3] (and the stream, for stats)."""
        s = self.stream(prompt, steps, ffe, seed, frames, ffe_steps=ffe_steps)
        video = np.concatenate(list(s), axis=0)
        return video, s


def make_step(backend: str, loaded, engine: str | None = None, **options):
    """A chunk step for `backend` serving the loaded DiT (engines are validated against it);
    "auto": the engine `python -m export.build --backend auto` picked on this machine."""
    from .backends import make_backend

    if backend == "auto":
        from .backends.auto import make_auto
        return make_auto(loaded, engine=engine, **options)
    return make_backend(backend, loaded, engine=engine, **options)
